"""The speculative loop: one verification forward of the target per step, lossless.

Ragged batches keep the target KV cache RECTANGULAR (no holes):

* every row b has ``cached[b]`` of its real tokens in the cache (shared cache length ``L``);
* after a verification, row b has valid KV for all its committed tokens but the newest one;
  the cache is cropped to the MIN over active rows, and each row remembers its *pending*
  tokens (committed, but their KV was cropped away);
* the next block for row b is ``[pending_b, last_b, drafts_b]``, right-padded to a common width.
  Padding at the END of a block is harmless under causal self-attention, and the logits of
  row b are gathered from its own positions.

``drafter=None`` is plain autoregressive decoding through the same loop (γ = 0).
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from fastspec import ops
from fastspec.cache import cache_length, crop_cache, new_cache, select_cache_rows
from fastspec.drafters.base import CommitInfo, DraftRequest, DraftStep, SamplingParams

# Engine options that are not GenerationConfig attributes.
_ENGINE_OPTIONS = ("seed", "dynamic_gamma", "min_gamma", "max_gamma")

# GenerationConfig attributes we cannot honour, with the value that means "off".
_UNSUPPORTED_DEFAULTS = {
    "typical_p": (None, 1.0),
    "min_p": (None,),
    "top_h": (None,),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "renormalize_logits": (None, False),
    "stop_strings": (None,),
    "max_time": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "diversity_penalty": (None, 0.0),
    "num_beam_groups": (None, 1),
    "prompt_lookup_num_tokens": (None,),
    "output_scores": (None, False),
    "output_logits": (None, False),
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
    "return_dict_in_generate": (None, False),
    "token_healing": (None, False),
    "remove_invalid_values": (None, False),
}

_HF_DEFAULTS = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_return_sequences": 1,
}


@dataclass
class GenerationMetrics:
    """Per-request counters. Attribute or item access (``m.acceptance_rate`` / ``m["acceptance_rate"]``)."""

    num_steps: int = 0  # verification steps
    num_draft_tokens: int = 0  # Σ over row-steps of γ
    num_accepted_tokens: int = 0  # Σ over row-steps of accepted drafts
    acceptance_rate: float = 0.0  # α = E[β], β = accepted/γ per row-step
    mean_accepted_length: float = 1.0  # τ = 1 + E[accepted] per row-step
    per_position_acceptance: list = field(default_factory=list)  # P(draft k accepted), len γ
    target_calls: int = 0  # target forwards (encoder, prefill, verifications)
    draft_time_s: float = 0.0
    target_time_s: float = 0.0
    total_time_s: float = 0.0
    engine_time_s: float = 0.0  # total − draft − target: the loop's own overhead
    c: float = 0.0  # one drafter token / one target verification forward, measured
    ideal_speedup: float = 1.0  # (1 − α^(γ+1)) / ((1 − α)(γ·c + 1))
    gamma: int = 0  # γ (mean γ when dynamic)
    num_generated_tokens: int = 0

    def __getitem__(self, key):
        return getattr(self, key)

    def keys(self):
        return asdict(self).keys()

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B·num_return_sequences, T] like HF generate()
    metrics: GenerationMetrics


def ideal_speedup(alpha: float, gamma: float, c: float) -> float:
    """Leviathan et al. 2023: expected speedup of speculative decoding over autoregressive."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


# ----------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------


def _hf_defaults(model) -> dict:
    getter = getattr(getattr(model, "generation_config", None), "_get_default_generation_params", None)
    defaults = dict(_HF_DEFAULTS)
    if getter is not None:
        try:
            defaults.update(getter())
        except Exception:  # older releases: keep ours
            pass
    return defaults


def resolve_generation_config(model, generation_config=None, **kwargs):
    """Merge like HF: kwargs > ``generation_config`` > ``model.generation_config`` > HF defaults.

    Returns (GenerationConfig, engine_options). Unknown kwargs raise ValueError.
    """
    from transformers import GenerationConfig

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _ENGINE_OPTIONS}
    # HF: nobody set max_length -> "20 new tokens" (not 20 in all)
    options["default_max_length"] = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and getattr(getattr(model, "generation_config", None), "max_length", None) is None
    )
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    base = getattr(model, "generation_config", None)
    for source in ((base.to_dict() if base is not None else {}), _hf_defaults(model)):
        for key, value in source.items():
            if key.startswith("_") or key == "transformers_version" or value is None:
                continue
            if hasattr(config, key) and getattr(config, key) is None:
                setattr(config, key, value)
    unknown = sorted(k for k in kwargs if not hasattr(config, k) or k.startswith("_"))
    if unknown:
        raise ValueError(f"fastspec.generate: unsupported keyword argument(s) {unknown}")
    for key, value in kwargs.items():
        setattr(config, key, value)
    for key, off_values in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(config, key, None)
        if value not in off_values and not (isinstance(value, (list, tuple, dict)) and len(value) == 0):
            raise ValueError(f"fastspec.generate does not support {key}={value!r}")
    return config, options


def _eos_list(eos) -> list:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
    if isinstance(eos, int):
        return [eos]
    return [int(x) for x in eos]


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _max_positions(model) -> Optional[int]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class _Settings:
    max_new_tokens: int
    min_new_tokens: int
    min_length: int
    sampling: SamplingParams
    eos: list
    pad_token_id: int
    num_return_sequences: int
    num_beams: int
    length_penalty: float
    early_stopping: object
    seed: Optional[int]
    gamma: int
    dynamic_gamma: bool
    min_gamma: int
    max_gamma: int


def _validate(model, drafter, input_ids, attention_mask, gamma, config, options) -> _Settings:
    is_seq2seq = bool(model.config.is_encoder_decoder)
    vocab = _vocab_size(model)
    if input_ids.numel() == 0 or input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty")
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
            )
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("attention_mask has a row with no real token")
    real = input_ids if attention_mask is None else input_ids[attention_mask.bool()]
    if bool((real < 0).any()) or bool((real >= vocab).any()):
        raise ValueError(f"input_ids hold ids outside [0, {vocab}) (the target's vocabulary)")
    if drafter is not None:
        if not isinstance(gamma, int) or gamma < 1:
            raise ValueError(f"gamma must be an integer >= 1 with a drafter, got {gamma!r}")
        drafter_vocab = getattr(drafter, "vocab_size", None)
        if drafter_vocab is not None and int(drafter_vocab) != vocab:
            raise ValueError(f"drafter vocab_size {drafter_vocab} != target vocab_size {vocab}")
    num_beams = int(config.num_beams or 1)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1:
        if drafter is not None:
            raise ValueError("num_beams > 1 runs autoregressive beam search: pass drafter=None")
        if config.do_sample:
            raise ValueError("num_beams > 1 with do_sample=True (beam sampling) is not supported")
        if config.early_stopping not in (None, True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {config.early_stopping!r}")

    do_sample = bool(config.do_sample)
    temperature = float(config.temperature if config.temperature is not None else 1.0)
    top_k = int(config.top_k or 0)
    top_p = float(config.top_p if config.top_p is not None else 1.0)
    repetition_penalty = float(config.repetition_penalty if config.repetition_penalty is not None else 1.0)
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature} (use do_sample=False for greedy)")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    num_return_sequences = int(config.num_return_sequences or 1)
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if num_return_sequences > 1 and not do_sample and num_beams == 1:
        raise ValueError("greedy decoding (do_sample=False) does not support num_return_sequences > 1")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")

    prompt_width = input_ids.shape[-1]
    if config.max_new_tokens is not None:
        max_new_tokens = int(config.max_new_tokens)
    elif options.get("default_max_length"):  # HF: 20 new tokens, capped by the model's max positions
        max_new_tokens = int(config.max_length)
        max_positions = _max_positions(model)
        if max_positions is not None and not is_seq2seq:
            max_new_tokens = min(max_new_tokens + prompt_width, max_positions) - prompt_width
    else:  # HF: max_length counts the prompt (causal) or the decoder start token (seq2seq)
        max_new_tokens = int(config.max_length) - (1 if is_seq2seq else prompt_width)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    max_positions = _max_positions(model)
    if max_positions is not None and not is_seq2seq:
        if prompt_width > max_positions:
            raise ValueError(f"input length {prompt_width} exceeds the model's max positions {max_positions}")
        if prompt_width + max_new_tokens > max_positions:
            raise ValueError(
                f"input length {prompt_width} + max_new_tokens {max_new_tokens} exceeds the model's "
                f"max positions {max_positions}"
            )
    elif max_positions is not None and prompt_width > max_positions:
        raise ValueError(f"input length {prompt_width} exceeds the model's max positions {max_positions}")

    eos = _eos_list(config.eos_token_id)
    pad = config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    if isinstance(pad, (list, tuple)):
        pad = pad[0]

    dynamic_gamma = bool(options.get("dynamic_gamma", False))
    min_gamma = int(options.get("min_gamma", 1))
    max_gamma = int(options.get("max_gamma", 2 * gamma if drafter is not None else 0))
    if drafter is not None and dynamic_gamma and not 1 <= min_gamma <= gamma <= max_gamma:
        raise ValueError(f"dynamic gamma needs 1 <= min_gamma <= gamma <= max_gamma, got {min_gamma}, {gamma}, {max_gamma}")
    if drafter is None:
        gamma, dynamic_gamma, min_gamma, max_gamma = 0, False, 0, 0
    elif not dynamic_gamma:
        min_gamma = max_gamma = gamma

    return _Settings(
        max_new_tokens=max_new_tokens,
        min_new_tokens=int(config.min_new_tokens or 0),
        min_length=int(config.min_length or 0),
        sampling=SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty),
        eos=eos,
        pad_token_id=int(pad),
        num_return_sequences=num_return_sequences,
        num_beams=num_beams,
        length_penalty=float(config.length_penalty if config.length_penalty is not None else 1.0),
        early_stopping=config.early_stopping if config.early_stopping is not None else False,
        seed=options.get("seed"),
        gamma=gamma,
        dynamic_gamma=dynamic_gamma,
        min_gamma=min_gamma,
        max_gamma=max_gamma,
    )


# ----------------------------------------------------------------------------------------
# the target side: encoder/prefill once, then verification forwards on a rectangular cache
# ----------------------------------------------------------------------------------------


class _TargetSession:
    """Holds the target's cache for the rows still running ("compact" rows).

    Row bookkeeping lives in the caller's full-batch tensors; this class keeps, per compact
    row, its original row index (``rows``), how many of its real tokens are cached
    (``cached``), and the shared cache length.
    """

    def __init__(self, model, input_ids, attention_mask):
        self.model = model
        self.is_seq2seq = bool(model.config.is_encoder_decoder)
        self.device = input_ids.device
        self.cache = new_cache(model)
        self.calls = 0
        self.time_s = 0.0
        self.verify_calls = 0
        self.verify_time_s = 0.0
        self.block_start = 0  # cache length before the last verification block
        batch = input_ids.shape[0]
        self.rows = torch.arange(batch, device=self.device)
        parameters = inspect.signature(model.forward).parameters
        self.keep_logits = "logits_to_keep" in parameters
        self.takes_positions = "position_ids" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
        if not self.is_seq2seq and not self.takes_positions and bool((attention_mask == 0).any()):
            raise ValueError(f"{type(model).__name__} takes no position_ids, so padded batches are unsupported")
        if self.is_seq2seq:
            start = time.perf_counter()
            with torch.no_grad():
                self.encoder_outputs = model.get_encoder()(
                    input_ids=input_ids, attention_mask=attention_mask, return_dict=True
                )
            self._tick(start)
            self.encoder_mask = attention_mask
            self.cached = torch.zeros(batch, dtype=torch.long, device=self.device)
            self.prefix_mask = None
        else:
            # Cache every prompt column before the earliest "last real token" of any row;
            # real tokens after that column become the rows' pending tokens.
            columns = torch.arange(input_ids.shape[1], device=self.device)
            last_real = torch.where(attention_mask.bool(), columns, -1).amax(-1)  # [B]
            prefill = int(last_real.min())
            self.prefix_mask = attention_mask[:, :prefill].clone()  # [B,P]
            self.cached = self.prefix_mask.sum(-1).long()  # [B] real tokens cached
            if prefill > 0:
                position_ids = (self.prefix_mask.long().cumsum(-1) - 1).clamp(min=0)
                start = time.perf_counter()
                with torch.no_grad():
                    model(
                        input_ids=input_ids[:, :prefill],
                        attention_mask=self.prefix_mask,
                        **({"position_ids": position_ids} if self.takes_positions else {}),
                        past_key_values=self.cache,
                        use_cache=True,
                        **({"logits_to_keep": 1} if self.keep_logits else {}),
                    )
                self._tick(start)

    def _tick(self, start) -> float:
        """Count one target call that began at ``start``; returns its seconds."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.time_s += elapsed
        self.calls += 1
        return elapsed

    @property
    def length(self) -> int:
        return cache_length(self.cache)

    def verify_forward(self, block, first_index, num_positions):
        """One target forward on ``block`` [b,W]; returns logits [b,num_positions,V] float32 read at
        block positions first_index[b] + k (k < num_positions) for every compact row b."""
        width = block.shape[1]
        offset = int(first_index.min())
        kwargs = {}
        if self.is_seq2seq:
            kwargs = dict(
                encoder_outputs=self.encoder_outputs,
                attention_mask=self.encoder_mask,
                decoder_input_ids=block,
            )
        else:
            cached_extra = self.length - self.prefix_mask.shape[1]
            ones = torch.ones(block.shape[0], cached_extra + width, dtype=self.prefix_mask.dtype, device=self.device)
            kwargs = dict(
                input_ids=block,
                attention_mask=torch.cat([self.prefix_mask, ones], dim=1),  # [b, L+W]
            )
            if self.takes_positions:
                kwargs["position_ids"] = self.cached[:, None] + torch.arange(width, device=self.device)  # [b,W]
            if self.keep_logits:
                kwargs["logits_to_keep"] = width - offset
        self.block_start = self.length
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model(past_key_values=self.cache, use_cache=True, **kwargs).logits
        self.verify_time_s += self._tick(start)
        self.verify_calls += 1
        kept_from = width - logits.shape[1]  # 0 unless logits_to_keep trimmed the front
        index = first_index - kept_from
        if bool((index == index[0]).all()):
            start_at = int(index[0])
            out = logits[:, start_at : start_at + num_positions]
        else:
            gather = (index[:, None] + torch.arange(num_positions, device=self.device))[:, :, None]
            out = logits.gather(1, gather.expand(-1, -1, logits.shape[-1]))
        return out.float()

    def commit(self, keep: int) -> None:
        """Every compact row keeps ``keep`` more cached positions; the rest of the last block goes."""
        crop_cache(self.cache, self.block_start + keep)
        self.cached = self.cached + keep

    def select(self, keep_rows: torch.Tensor) -> None:
        """Drop finished rows: keep compact rows ``keep_rows`` [b'] int64."""
        select_cache_rows(self.cache, keep_rows)
        self.rows = self.rows[keep_rows]
        self.cached = self.cached[keep_rows]
        if self.is_seq2seq:
            self.encoder_outputs.last_hidden_state = self.encoder_outputs.last_hidden_state[keep_rows]
            if self.encoder_mask is not None:
                self.encoder_mask = self.encoder_mask[keep_rows]
        else:
            self.prefix_mask = self.prefix_mask[keep_rows]


# ----------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------


def generate(
    target,
    drafter=None,
    input_ids=None,
    attention_mask=None,
    *,
    gamma: int = 5,
    generation_config=None,
    **generate_kwargs,
) -> GenerateOutput:
    """Lossless speculative decoding of ``target`` with ``drafter`` (None: autoregressive).

    Args:
        target: a HF ``PreTrainedModel``, seq2seq (T5 family) or causal.
        drafter: a :class:`fastspec.drafters.Drafter`, or None for plain autoregressive decoding.
        input_ids: [B,S] int64 prompt (causal) or encoder input (seq2seq); any padding side.
        attention_mask: [B,S] 1 for real tokens (default: all ones).
        gamma: tokens drafted per step (γ ≥ 1 with a drafter).
        generation_config / generate_kwargs: transformers' names (max_new_tokens, min_new_tokens,
            do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id,
            num_return_sequences, ...), plus ``seed`` and ``dynamic_gamma``/``min_gamma``/``max_gamma``.

    Returns:
        GenerateOutput(sequences [B·n, T] like HF generate(), metrics).
    """
    total_start = time.perf_counter()
    model = target
    if input_ids is None:
        raise ValueError("input_ids is required")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.dim() == 1 and input_ids.shape[0] == 1:
            attention_mask = attention_mask[None]
    config, options = resolve_generation_config(model, generation_config, **generate_kwargs)
    settings = _validate(model, drafter, input_ids, attention_mask, gamma, config, options)

    device = next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    attention_mask = (
        torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    )
    if settings.num_beams > 1:
        return _beam_search(model, input_ids, attention_mask, config, settings, total_start)
    if settings.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(settings.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(settings.num_return_sequences, dim=0)
    batch = input_ids.shape[0]
    is_seq2seq = bool(model.config.is_encoder_decoder)
    vocab = _vocab_size(model)
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(settings.seed))

    # Per-row real sequences, left-aligned: causal = prompt's real tokens + generated,
    # seq2seq = decoder start + generated. Slots past seq_len are scratch (drafts).
    max_gamma = settings.max_gamma
    if is_seq2seq:
        start_id = config.decoder_start_token_id
        if start_id is None:
            start_id = model.config.decoder_start_token_id
        if isinstance(start_id, (list, tuple)):
            start_id = start_id[0]
        if start_id is None:
            raise ValueError("seq2seq target without decoder_start_token_id")
        prompt_len = torch.ones(batch, dtype=torch.long, device=device)
        capacity = 1 + settings.max_new_tokens + max_gamma + 1
        seq = torch.zeros((batch, capacity), dtype=torch.long, device=device)  # scratch: any valid id
        seq[:, 0] = int(start_id)
    else:
        prompt_len = attention_mask.sum(-1)
        capacity = int(prompt_len.max()) + settings.max_new_tokens + max_gamma + 1
        seq = torch.zeros((batch, capacity), dtype=torch.long, device=device)  # scratch: any valid id
        # left-align the real prompt tokens of each row (any padding side)
        order = torch.argsort((attention_mask == 0).long(), dim=1, stable=True)
        aligned = input_ids.gather(1, order)
        width = input_ids.shape[1]
        seq[:, :width] = torch.where(
            torch.arange(width, device=device) < prompt_len[:, None], aligned, 0
        )
    seq_len = prompt_len.clone()
    generated = torch.full((batch, settings.max_new_tokens + max_gamma + 1), -1, dtype=torch.long, device=device)
    num_generated = torch.zeros(batch, dtype=torch.long, device=device)
    eos_tensor = torch.tensor(settings.eos, dtype=torch.long, device=device) if settings.eos else None

    draft_time = 0.0
    num_draft_calls = 0
    if drafter is not None:
        start = time.perf_counter()
        drafter.begin(
            DraftRequest(
                source_ids=input_ids,
                source_mask=attention_mask,
                is_encoder_decoder=is_seq2seq,
                vocab_size=vocab,
                decoder_start_token_id=int(start_id) if is_seq2seq else None,
                pad_token_id=settings.pad_token_id,
                eos_token_id=list(settings.eos) or None,
                sampling=settings.sampling,
                generator=generator,
            )
        )
        draft_time += time.perf_counter() - start

    session = _TargetSession(model, input_ids, attention_mask)
    gamma_now = settings.gamma
    row_steps = 0
    beta_sum = 0.0
    gamma_sum = 0
    accepted_total = 0
    draft_total = 0
    position_hits = torch.zeros(max(max_gamma, 1), dtype=torch.long)
    position_trials = torch.zeros(max(max_gamma, 1), dtype=torch.long)
    steps = 0
    arange_cap = torch.arange(capacity, device=device)

    try:
        while session.rows.numel() > 0:
            rows = session.rows  # [b] original indices of running rows
            b = rows.numel()
            g = gamma_now

            # 1. draft γ tokens per row (the drafter sees the full batch and the active mask)
            if drafter is not None:
                active = torch.zeros(batch, dtype=torch.bool, device=device)
                active[rows] = True
                start = time.perf_counter()
                max_gen = int(num_generated.max())
                draft = drafter.draft(
                    DraftStep(generated=generated[:, :max_gen], num_generated=num_generated, active=active, gamma=g)
                )
                draft_time += time.perf_counter() - start
                num_draft_calls += 1
                draft_tokens = draft.tokens.to(device=device, dtype=torch.long)[rows]  # [b,k], k ≤ γ
                if draft_tokens.dim() != 2 or draft_tokens.shape[0] != b or not 0 <= draft_tokens.shape[1] <= g:
                    raise ValueError(
                        f"drafter returned tokens of shape {tuple(draft.tokens.shape)}, want [B,k] with k <= γ={g}"
                    )
                # A drafter may decline to guess past k tokens (e.g. prompt lookup with no match):
                # verifying fewer positions is cheaper and changes nothing about losslessness.
                g = int(draft_tokens.shape[1])
                if bool((draft_tokens < 0).any()) or bool((draft_tokens >= vocab).any()):
                    raise ValueError("drafter returned token ids outside the target vocabulary")
                draft_probs = None
                if draft.probs is not None and settings.sampling.do_sample:
                    draft_probs = draft.probs.to(device)[rows].float()  # [b,γ,V]
            else:
                draft_tokens = torch.empty(b, 0, dtype=torch.long, device=device)
                draft_probs = None

            # 2. the block [pending, last committed, drafts], right-padded to width W
            row_len = seq_len[rows]  # [b]
            if g > 0:
                seq[rows[:, None], row_len[:, None] + torch.arange(g, device=device)] = draft_tokens
            first_index = row_len - 1 - session.cached  # [b] block index of the last committed token
            width = int((first_index.max())) + 1 + g
            block_index = (session.cached[:, None] + torch.arange(width, device=device)).clamp(max=capacity - 1)
            block = seq[rows[:, None], block_index]  # [b,W]

            # 3. one target forward; logits at [last committed, drafts] per row
            target_logits = session.verify_forward(block, first_index, g + 1)  # [b,γ+1,V]
            if eos_tensor is not None and (settings.min_new_tokens > 0 or settings.min_length > 0):
                # HF MinNewTokens/MinLength processors: no EOS while the row is too short
                position = torch.arange(g + 1, device=device)
                too_short = (num_generated[rows][:, None] + position) < settings.min_new_tokens
                too_short |= (row_len[:, None] + position) < settings.min_length
                if bool(too_short.any()):
                    eos_mask = too_short[:, :, None] & torch.zeros(vocab, dtype=torch.bool, device=device).index_fill(
                        0, eos_tensor, True
                    )
                    target_logits = target_logits.masked_fill(eos_mask, float("-inf"))
            prev_tokens = None
            if settings.sampling.repetition_penalty != 1.0:
                span = int(row_len.max())
                prev_tokens = torch.where(arange_cap[:span] < row_len[:, None], seq[rows, :span], -1)  # [b,L]

            # 4. verify: accepted drafts + one recovered/bonus token per row
            output_tokens, num_accepted = ops.fused_verify(
                target_logits,
                draft_tokens,
                draft_probs,
                prev_tokens=prev_tokens,
                do_sample=settings.sampling.do_sample,
                temperature=settings.sampling.temperature,
                top_k=settings.sampling.top_k,
                top_p=settings.sampling.top_p,
                repetition_penalty=settings.sampling.repetition_penalty,
                generator=generator,
            )
            num_accepted = num_accepted.to(device)
            output_tokens = output_tokens.to(device)
            steps += 1

            # metrics: α and per-position acceptance describe the drafter, before truncation
            if g > 0:
                acc_cpu = num_accepted.cpu()
                row_steps += b
                beta_sum += float(acc_cpu.sum()) / g
                gamma_sum += g * b
                accepted_total += int(acc_cpu.sum())
                draft_total += g * b
                position_hits[:g] += (acc_cpu[:, None] > torch.arange(g)).sum(0)
                position_trials[:g] += b

            # 5. emit: cut at max_new_tokens and at the first EOS inside the block
            emitted = num_accepted + 1  # [b]
            emitted = torch.minimum(emitted, settings.max_new_tokens - num_generated[rows])
            position = torch.arange(g + 1, device=device)
            valid = position < emitted[:, None]
            done = (num_generated[rows] + emitted) >= settings.max_new_tokens
            if eos_tensor is not None:
                is_eos = torch.isin(output_tokens, eos_tensor) & valid
                has_eos = is_eos.any(-1)
                first_eos = torch.where(has_eos, is_eos.int().argmax(-1), g + 1)
                emitted = torch.where(has_eos, first_eos + 1, emitted)
                valid = position < emitted[:, None]
                done |= has_eos
            committed = torch.where(valid, output_tokens, -1)  # [b,γ+1]
            gen_index = num_generated[rows][:, None] + position
            generated[rows[:, None], gen_index] = committed
            seq[rows[:, None], (row_len[:, None] + position).clamp(max=capacity - 1)] = torch.where(
                valid, output_tokens, 0
            )
            seq_len[rows] = row_len + emitted
            num_generated[rows] = num_generated[rows] + emitted

            if drafter is not None:
                full_out = torch.full((batch, g + 1), -1, dtype=torch.long, device=device)
                full_out[rows] = committed
                full_acc = torch.zeros(batch, dtype=torch.long, device=device)
                full_acc[rows] = torch.minimum(num_accepted, emitted - 1)
                start = time.perf_counter()
                drafter.commit(CommitInfo(output_tokens=full_out, num_accepted=full_acc, active=active))
                draft_time += time.perf_counter() - start

            # 6. crop the cache to the MIN over running rows of their valid KV; drop finished rows
            running = ~done
            if bool(running.all()):
                keep = int((seq_len[rows] - 1 - session.cached).min())
                session.commit(keep)
            else:
                keep_rows = running.nonzero().flatten()
                if keep_rows.numel() > 0:
                    keep = int((seq_len[rows[keep_rows]] - 1 - session.cached[keep_rows]).min())
                    session.commit(keep)
                    session.select(keep_rows)
                else:
                    session.rows = session.rows[:0]

            # dynamic γ: +1 after full acceptance by every row, −1 after an early rejection
            if settings.dynamic_gamma and g > 0 and g == gamma_now:
                if bool((num_accepted == g).all()):
                    gamma_now = min(g + 1, settings.max_gamma)
                elif bool((num_accepted < g).all()):
                    gamma_now = max(g - 1, settings.min_gamma)
    finally:
        if drafter is not None:
            drafter.end()

    # sequences like HF: pad after EOS with pad_token_id
    new_width = int(num_generated.max())
    new_tokens = generated[:, :new_width]
    new_tokens = torch.where(new_tokens < 0, settings.pad_token_id, new_tokens)
    if is_seq2seq:
        sequences = torch.cat([seq[:, :1], new_tokens], dim=1)
    else:
        sequences = torch.cat([input_ids, new_tokens], dim=1)

    total_time = time.perf_counter() - total_start
    metrics = GenerationMetrics(
        num_steps=steps,
        num_draft_tokens=draft_total,
        num_accepted_tokens=accepted_total,
        target_calls=session.calls,
        draft_time_s=draft_time,
        target_time_s=session.time_s,
        total_time_s=total_time,
        engine_time_s=max(total_time - draft_time - session.time_s, 0.0),
        num_generated_tokens=int(num_generated.sum()),
    )
    if row_steps > 0:
        mean_gamma = gamma_sum / row_steps
        alpha = beta_sum / row_steps
        metrics.acceptance_rate = alpha
        metrics.mean_accepted_length = 1.0 + accepted_total / row_steps
        metrics.per_position_acceptance = [
            float(h) / float(t) if t > 0 else 0.0
            for h, t in zip(position_hits.tolist(), position_trials.tolist())
        ][: settings.max_gamma]
        metrics.gamma = mean_gamma
        if session.verify_calls > 0 and num_draft_calls > 0 and session.verify_time_s > 0:
            per_draft_token = draft_time / max(num_draft_calls * mean_gamma, 1e-12)
            metrics.c = per_draft_token / (session.verify_time_s / session.verify_calls)
        metrics.ideal_speedup = ideal_speedup(alpha, mean_gamma, metrics.c)
    return GenerateOutput(sequences=sequences, metrics=metrics)


# ----------------------------------------------------------------------------------------
# beam search: autoregressive, a port of HF generate()'s vectorised beam search (5.x)
# ----------------------------------------------------------------------------------------


def _beam_search(model, input_ids, attention_mask, config, settings, total_start) -> GenerateOutput:
    """Deterministic beam search with HF's scoring, length penalty, early stopping and
    stopping rules, so the sequences equal ``model.generate(num_beams=...)``."""
    device = input_ids.device
    is_seq2seq = bool(model.config.is_encoder_decoder)
    num_beams = settings.num_beams
    batch, width = input_ids.shape
    vocab = _vocab_size(model)
    eos = settings.eos
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
    beams_to_keep = max(2, 1 + len(eos)) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
    early_stopping, length_penalty = settings.early_stopping, settings.length_penalty
    # HF fills unused slots with `pad or eos[0]` (a pad id of 0 counts as unset there)
    fill = (settings.pad_token_id or eos[0]) if eos else -1

    cache = new_cache(model)
    target_time, target_calls = 0.0, 0

    def forward(**kwargs):
        nonlocal target_time, target_calls
        start = time.perf_counter()
        with torch.no_grad():
            out = model(past_key_values=cache, use_cache=True, **kwargs)
        target_time += time.perf_counter() - start
        target_calls += 1
        return out.logits[:, -1].float()  # [B·nb,V]

    if is_seq2seq:
        start = time.perf_counter()
        with torch.no_grad():
            encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        target_time += time.perf_counter() - start
        target_calls += 1
        encoder_outputs.last_hidden_state = encoder_outputs.last_hidden_state.repeat_interleave(num_beams, dim=0)
        encoder_mask = attention_mask.repeat_interleave(num_beams, dim=0)
        start_id = config.decoder_start_token_id
        if start_id is None:
            start_id = model.config.decoder_start_token_id
        prompt = torch.full((batch, 1), int(start_id), dtype=torch.long, device=device)
        prompt_real = torch.ones_like(prompt)
    else:
        prompt = input_ids
        prompt_real = attention_mask
        decoder_mask = attention_mask.repeat_interleave(num_beams, dim=0)  # [B·nb, S]
    prompt_len = cur_len = prompt.shape[1]
    max_length = prompt_len + settings.max_new_tokens

    running_sequences = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running_sequences[:, :, :cur_len] = prompt[:, None]
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros(batch, num_beams, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, num_beams), -1e9, device=device)
    is_sent_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)  # HF: is_early_stop_heuristic_unsatisfied
    running_beam_indices = torch.full(
        (batch, num_beams, max_length - cur_len), -1, dtype=torch.int32, device=device
    )
    beam_indices = running_beam_indices.clone()
    real_prefix = prompt_real.bool().repeat_interleave(num_beams, dim=0)  # [B·nb,S] pads excluded from the penalty

    def gather_beams(tensor, index):
        while index.dim() < tensor.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(tensor, index, dim=1)

    steps = 0
    while True:
        flat = running_sequences[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        if is_seq2seq:
            logits = forward(encoder_outputs=encoder_outputs, attention_mask=encoder_mask, decoder_input_ids=flat[:, -1:])
        elif steps == 0:
            position_ids = (decoder_mask.cumsum(-1) - 1).masked_fill(decoder_mask == 0, 1)
            logits = forward(input_ids=flat, attention_mask=decoder_mask, position_ids=position_ids)
        else:
            decoder_mask = torch.cat([decoder_mask, torch.ones_like(decoder_mask[:, :1])], dim=1)
            position_ids = decoder_mask.sum(-1, keepdim=True) - 1
            logits = forward(input_ids=flat[:, -1:], attention_mask=decoder_mask, position_ids=position_ids)
        steps += 1
        scores = torch.log_softmax(logits, dim=-1)[:, None]  # [B·nb,1,V]
        if settings.sampling.repetition_penalty != 1.0:
            real = torch.cat([real_prefix, torch.ones_like(flat[:, prompt_len:], dtype=torch.bool)], dim=1)
            scores = ops.process_logits(
                scores, prev_tokens=torch.where(real, flat, -1), do_sample=False,
                repetition_penalty=settings.sampling.repetition_penalty,
            )
        if eos_tensor is not None:
            generated = cur_len - prompt_len
            row_len = torch.full_like(flat[:, 0], cur_len) if is_seq2seq else real_prefix.sum(-1) + generated
            too_short = (row_len < settings.min_length) | (generated < settings.min_new_tokens)  # [B·nb]
            if bool(too_short.any()):
                scores[too_short[:, None, None] & torch.isin(torch.arange(vocab, device=device), eos_tensor)] = float(
                    "-inf"
                )
        log_probs = scores[:, 0].reshape(batch, num_beams, vocab) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(batch, num_beams * vocab)

        # top-K continuations over all beams
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_beam = topk_indices // vocab
        topk_running_beam_indices = gather_beams(running_beam_indices, topk_beam)
        topk_running_sequences = gather_beams(running_sequences, topk_beam)
        topk_ids = topk_indices % vocab
        topk_running_sequences[:, :, cur_len] = topk_ids
        batch_offset = torch.arange(batch, device=device)[:, None] * num_beams
        topk_running_beam_indices[:, :, cur_len - prompt_len] = (topk_beam + batch_offset).to(torch.int32)
        hits = torch.full_like(topk_ids, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos_tensor is not None:
            hits |= torch.isin(topk_ids, eos_tensor)

        # running beams for the next step: the best non-finished ones
        topk_running_log_probs = topk_log_probs + hits.float() * -1.0e9
        next_topk = torch.topk(topk_running_log_probs, k=num_beams)[1]
        running_sequences = gather_beams(topk_running_sequences, next_topk)
        running_beam_scores = gather_beams(topk_running_log_probs, next_topk)
        running_beam_indices = gather_beams(topk_running_beam_indices, next_topk)

        # finished hypotheses: merge, keep the best num_beams
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / ((cur_len + 1 - prompt_len) ** length_penalty)
        beams_full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        finished_scores = finished_scores + beams_full.float() * -1.0e9
        finished_scores = finished_scores + (~improvable).float() * -1.0e9
        finished_scores = finished_scores + (~just_finished) * -1.0e9
        merged_sequences = torch.cat((sequences, topk_running_sequences), dim=1)
        merged_scores = torch.cat((beam_scores, finished_scores), dim=1)
        merged_indices = torch.cat((beam_indices, topk_running_beam_indices), dim=1)
        merged_finished = torch.cat((is_sent_finished, just_finished), dim=1)
        keep = torch.topk(merged_scores, k=num_beams)[1]
        sequences = gather_beams(merged_sequences, keep)
        beam_scores = gather_beams(merged_scores, keep)
        beam_indices = gather_beams(merged_indices, keep)
        is_sent_finished = gather_beams(merged_finished, keep)

        cache.reorder_cache(running_beam_indices[..., cur_len - prompt_len].reshape(-1).long())
        cur_len += 1

        # HF's early-stop heuristic and loop condition
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_beam_scores[:, :1] / (best_length**length_penalty)
        worst_finished = torch.where(is_sent_finished, beam_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        open_beam = not (bool(is_sent_finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
            break

    nrs = settings.num_return_sequences
    sequences = sequences[:, :nrs].reshape(batch * nrs, max_length)
    beam_indices = beam_indices[:, :nrs].reshape(batch * nrs, -1)
    generated_length = int((beam_indices + 1).bool().sum(dim=1).max())
    sequences = sequences[:, : prompt_len + generated_length]
    total_time = time.perf_counter() - total_start
    metrics = GenerationMetrics(
        num_steps=steps, target_calls=target_calls, target_time_s=target_time, total_time_s=total_time,
        engine_time_s=max(total_time - target_time, 0.0), num_generated_tokens=generated_length * batch * nrs,
    )
    return GenerateOutput(sequences=sequences, metrics=metrics)
