"""Offline α replay: a drafter's α, τ and per-position acceptance under GREEDY decoding, from the
target's known output and no target forward (DESIGN §8 "Offline α replay").

Under greedy decoding the speculative trajectory is fixed by the target's greedy output: at each
step the target's argmax at every verified position is the next token of that output. So the
engine loop itself (:func:`fastspec.engine.speculative.speculative_decode`) runs here unchanged,
with a :class:`ReplaySession` in place of the target: its logits put the known token first at each
position (1 there, 0 elsewhere). Beyond a row's known output anything will do, since emission is
cut there (EOS or max_new_tokens) and α counts emitted drafts only. One loop, so the replayed
metrics equal the engine's by construction, to the last accepted token.

A drafter that asks for the target's features (``hidden_state_layers``) needs the target: one
teacher-forced forward per batch over [prompt, output] gives every position's features.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch

from fastspec import introspect
from fastspec.drafters.context import left_align
from fastspec.engine.config import resolve_generation_config, validate_settings
from fastspec.engine.inputs import build_request, split_model_inputs
from fastspec.engine.session import Stopwatch, hand_features
from fastspec.engine.speculative import speculative_decode
from fastspec.errors import UserError
from fastspec.metrics import GenerationMetrics


class ReplaySession:
    """The TargetSession interface over a known output (rows, forward, advance, select,
    take_features, encoder_hidden_states, add_counts).

    known: [B,N] each row's generated tokens (anything past the row's end); prompt_len: [B] real
    tokens of each row's (decoder) prompt; vocab: logit width. features: [B,T,H'] every position's
    features of each row's decoder sequence, or None; encoder_hidden: [B,S,H] or None.
    """

    def __init__(self, known: torch.Tensor, prompt_len: torch.Tensor, vocab: int, features=None, encoder_hidden=None):
        self.known, self.prompt_len, self.vocab = known, prompt_len, vocab
        self.rows = torch.arange(known.shape[0], device=known.device)
        self.all_features, self.encoder_hidden_states = features, encoder_hidden
        self.handed = torch.zeros_like(prompt_len)
        self.calls = 0

    def forward(self, seq: torch.Tensor, seq_len: torch.Tensor, num_positions: int) -> torch.Tensor:
        """[b,num_positions,V] float32: 1 at the known next token of each position, 0 elsewhere."""
        index = (seq_len - self.prompt_len[self.rows])[:, None] + torch.arange(num_positions, device=seq.device)
        known = self.known[self.rows]
        tokens = known.gather(1, index.clamp(max=known.shape[1] - 1)).clamp(min=0)
        logits = torch.zeros(index.shape[0], num_positions, self.vocab, device=seq.device)
        self.calls += 1
        return logits.scatter_(2, tokens[:, :, None], 1.0)

    def advance(self, seq_len: torch.Tensor) -> None:
        pass

    def select(self, index: torch.Tensor) -> None:
        self.rows, self.handed = self.rows[index], self.handed[index]

    def take_features(self, seq_len: torch.Tensor):
        hidden, num = hand_features(self.all_features[self.rows], torch.zeros_like(seq_len), self.handed, seq_len)
        self.handed = seq_len - 1
        return hidden, num

    def add_counts(self, metrics: GenerationMetrics) -> None:
        metrics.verify_calls += self.calls  # steps; no target time


class _ConfigModel(torch.nn.Module):
    """What the engine reads of a target (config, generation config, device) without its weights."""

    def __init__(self, config):
        super().__init__()
        from transformers import GenerationConfig

        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def get_encoder(self):
        raise UserError("replay without a target supports causal targets only; pass the seq2seq target")


def _model_for(target, drafter, tokens: Sequence[torch.Tensor]):
    """The HF model of ``target``; a config-only stand-in for a PretrainedConfig or None (causal, its
    vocabulary the drafter's, else the largest id seen + 1)."""
    from transformers import PretrainedConfig

    if isinstance(target, PretrainedConfig):
        return _ConfigModel(target)
    if target is not None:
        return introspect.hf_model(target)
    vocab = getattr(drafter, "vocab_size", None) or 1 + max(int(t.max()) for t in tokens if t is not None)
    return _ConfigModel(PretrainedConfig(vocab_size=int(vocab), is_encoder_decoder=False))


def _row_lengths(known: torch.Tensor, settings) -> torch.Tensor:
    """[B] tokens each row emits: up to its first EOS, else max_new_tokens (which must be there).
    known: [B,N]; -1 marks the end of a shorter row."""
    limit = min(known.shape[1], settings.max_new_tokens)
    head = known[:, :limit]
    available = (head >= 0).long().cumprod(-1).sum(-1)  # [B] leading real tokens
    lengths = available.clone()
    if settings.eos:
        is_eos = torch.isin(head, torch.tensor(settings.eos, device=known.device))
        is_eos &= torch.arange(limit, device=known.device) < available[:, None]
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, lengths)
        short = ~is_eos.any(-1) & (lengths < settings.max_new_tokens)
    else:
        short = lengths < settings.max_new_tokens
    if bool(short.any()):
        raise UserError(f"rows {short.nonzero().flatten().tolist()} of the outputs end before max_new_tokens="
                        f"{settings.max_new_tokens} without EOS: pass the settings the outputs were generated with")
    return lengths


def _teacher_features(model, request, known: torch.Tensor, lengths: torch.Tensor, layers):
    """One teacher-forced forward: ([B,T,H'] features of every decoder position, encoder states)."""
    prompt, prompt_len = left_align(request.prompt, request.prompt_mask, pad=0)
    total = prompt_len + lengths
    width = int(total.max())
    seq = torch.zeros(known.shape[0], width, dtype=torch.long, device=known.device)
    seq[:, : prompt.shape[1]] = prompt[:, :width]
    columns = torch.arange(width, device=known.device)
    index = (columns - prompt_len[:, None]).clamp(0, known.shape[1] - 1)
    generated = (columns >= prompt_len[:, None]) & (columns < total[:, None])
    seq = torch.where(generated, known.gather(1, index).clamp(min=0), seq)
    mask = (columns < total[:, None]).long()
    with torch.no_grad():
        if introspect.is_encoder_decoder(model):
            encoder = model.get_encoder()(return_dict=True, **request.encoder_inputs)
            out = model(encoder_outputs=encoder, attention_mask=request.encoder_inputs.get("attention_mask"),
                        decoder_input_ids=seq, decoder_attention_mask=mask, output_hidden_states=True)
            states, encoder_hidden = out.decoder_hidden_states, encoder.last_hidden_state
        else:
            out = model(input_ids=seq, attention_mask=mask, output_hidden_states=True)
            states, encoder_hidden = out.hidden_states, None
    return torch.cat([states[i] for i in layers], dim=-1), encoder_hidden


def _replay_known(target, drafter, known: torch.Tensor, input_ids, attention_mask, gamma: int, generation_config,
                  kwargs: dict, feature_cache: Optional[dict] = None) -> GenerationMetrics:
    """The engine loop over ``known`` [B,N] generated tokens per row (-1 or anything past a row's end).
    ``feature_cache``: {layers: (features, encoder states)} of these rows, filled and reused."""
    model = _model_for(target, drafter, [input_ids, known])
    model_inputs, kwargs = split_model_inputs(model, dict(kwargs))
    config, options = resolve_generation_config(model, generation_config, **kwargs)
    request = build_request(model, input_ids, attention_mask, model_inputs, config)
    settings = validate_settings(model, drafter, gamma, config, options, request.prompt.shape[1])
    if drafter is None or settings.sampling.do_sample or settings.num_beams > 1:
        raise UserError("replay scores a drafter under greedy decoding (do_sample=False, num_beams=1)")
    device = request.prompt.device
    known = torch.as_tensor(known, dtype=torch.long).to(device)
    if known.shape[0] != request.batch:
        raise UserError(f"outputs have {known.shape[0]} rows for {request.batch} prompts")
    lengths = _row_lengths(known, settings)
    features = encoder_hidden = None
    layers = getattr(drafter, "hidden_state_layers", None)
    if layers:
        if isinstance(model, _ConfigModel):
            raise UserError("a drafter that reads the target's features needs the target for replay")
        cache = {} if feature_cache is None else feature_cache
        if tuple(layers) not in cache:
            cache[tuple(layers)] = _teacher_features(model, request, known, lengths, layers)
        features, encoder_hidden = cache[tuple(layers)]
    session = ReplaySession(known, request.prompt_mask.sum(-1), introspect.vocab_size(model), features,
                            encoder_hidden)
    metrics = GenerationMetrics()
    stopwatch = Stopwatch(device, False)
    start = stopwatch.now()
    speculative_decode(model, drafter, request, settings, metrics, stopwatch, None, session=session)
    metrics.total_time_s = stopwatch.now() - start
    return metrics


def replay(target, drafter, outputs: torch.Tensor, input_ids=None, attention_mask=None, *, gamma: int = 5,
           generation_config=None, **generate_kwargs) -> GenerationMetrics:
    """The metrics ``fastspec.generate(target, drafter, input_ids, attention_mask, gamma=gamma,
    **generate_kwargs)`` would report under greedy decoding (α, τ, per-position acceptance,
    accepted/drafted tokens, steps), without running the target.

    Args:
        target: the HF target (only its config is read, plus one teacher-forced forward for a
            feature drafter); a ``PretrainedConfig``; or None for a causal target whose vocabulary
            is the drafter's ``vocab_size`` (else the largest id seen + 1).
        outputs: [B,T] the target's greedy sequences as ``generate`` returns them (the prompt in
            the caller's layout, or the seq2seq decoder prompt, then the new tokens, padded).
        input_ids / attention_mask / generate_kwargs: the call's inputs and settings, as for
            ``generate`` (max_new_tokens and eos_token_id must be those of the outputs).
    """
    outputs = torch.as_tensor(outputs)
    prompt_width = _prompt_width(target, input_ids, generate_kwargs)
    return _replay_known(target, drafter, outputs[:, prompt_width:], input_ids, attention_mask, gamma,
                         generation_config, generate_kwargs)


def _prompt_width(target, input_ids, kwargs) -> int:
    """Columns of ``generate``'s sequences before the new tokens."""
    model = None if target is None else getattr(target, "config", None)
    seq2seq = bool(getattr(model, "is_encoder_decoder", False)) if model is not None else False
    if not seq2seq:
        return int(torch.as_tensor(input_ids).reshape(-1, torch.as_tensor(input_ids).shape[-1]).shape[1])
    decoder = kwargs.get("decoder_input_ids")
    return 1 if decoder is None else int(torch.as_tensor(decoder).shape[-1])


def replay_prompts(target, drafters: Mapping[str, object], prompts: Sequence[Sequence[int]],
                   outputs: Sequence[Sequence[int]], *, gamma: int = 5, max_new_tokens: int = 64,
                   batch_size: int = 1, feature_cache: Optional[dict] = None,
                   **generate_kwargs) -> Dict[str, List[GenerationMetrics]]:
    """Replay every drafter over ``prompts`` (token lists: the causal prompt or the seq2seq encoder
    input) and the target's greedy ``outputs`` (its new tokens per prompt, EOS included, as
    ``fastspec eval`` records them). Returns {name: [GenerationMetrics of each chunk of
    ``batch_size`` prompts]}: one per prompt at the default batch_size 1, for per-prompt statistics.

    ``batch_size`` 1 (the default) matches batch-1 engine runs exactly (the γ cap and dynamic γ
    look at the whole batch). ``feature_cache``: a dict kept across calls on the same prompts and
    outputs, so the target's teacher-forced features (for drafters that read them) are computed once.
    """
    if len(prompts) != len(outputs):
        raise UserError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    model = introspect.hf_model(target) if target is not None else None
    seq2seq = model is not None and introspect.is_encoder_decoder(model)
    pad = introspect.pad_token_id(model) if model is not None else 0
    chunks: Dict[str, List[GenerationMetrics]] = {name: [] for name in drafters}
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):  # causal: left padding (HF's); seq2seq: right padding
            begin = 0 if seq2seq else width - len(p)
            ids[row, begin:begin + len(p)], mask[row, begin:begin + len(p)] = torch.tensor(p, dtype=torch.long), 1
        rows = [list(o) for o in outputs[start:start + batch_size]]
        known = torch.full((len(rows), max(1, max(len(o) for o in rows))), -1, dtype=torch.long)
        for row, o in enumerate(rows):
            known[row, : len(o)] = torch.tensor(o, dtype=torch.long)
        for name, drafter in drafters.items():
            cache = None if feature_cache is None else feature_cache.setdefault((start, batch_size), {})
            chunks[name].append(_replay_known(target, drafter, known, ids, mask, gamma, None,
                                              dict(generate_kwargs, max_new_tokens=max_new_tokens), cache))
    return chunks


def replay_runs(target, drafters: Mapping[str, object], prompts: Sequence[Sequence[int]],
                outputs: Sequence[Sequence[int]], *, gamma: int = 5, max_new_tokens: int = 64,
                batch_size: int = 1, **generate_kwargs) -> Dict[str, GenerationMetrics]:
    """:func:`replay_prompts`, merged: {name: GenerationMetrics over all prompts}."""
    chunks = replay_prompts(target, drafters, prompts, outputs, gamma=gamma, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, **generate_kwargs)
    return {name: sum(parts, GenerationMetrics()) for name, parts in chunks.items()}


__all__ = ["ReplaySession", "replay", "replay_prompts", "replay_runs"]
