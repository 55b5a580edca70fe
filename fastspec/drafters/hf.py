"""HFDrafter: any HF model with the target's vocabulary drafts with its own KV cache.

* seq2seq drafter (T5-small / t5-v1_1-small for a FLAN-T5 target): its own encoder pass once per
  request, then decoder steps on ``[decoder_start] + generated``;
* causal drafter (for a causal target): steps on ``prompt + generated``.

The cache holds, per row, the drafter's input sequence from column 0 with no holes (T5's relative
position bias needs that); causal rows are left-padded once so that prompts of different lengths
end in the same column (masked, explicit position ids). Before each draft the cache is cropped to the longest prefix that is
still valid for EVERY row (the cached tokens are remembered and compared with the committed
sequence), which is also the rollback after rejection; ``commit`` needs no work. Ragged rows are
then advanced in LOCKSTEP: one common block for the columns every row has, then one token per
row per forward, each row feeding its own next real token or its newest draft.
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

from fastspec import introspect, ops
from fastspec.cache import cache_kwarg, cache_length, crop_cache, new_cache
from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.context import decoder_sequences, request_source
from fastspec.drafters.folder import file_sha256, load_folder, save_folder
from fastspec.errors import UserError


class HFDrafter(Drafter):
    """Drafts with an HF ``PreTrainedModel`` (seq2seq or causal, same vocabulary as the target).

    Greedy targets get argmax drafts (probs None); sampling targets get drafts sampled from
    q = ``ops.process_logits`` of the drafter's logits with the target's settings.
    """

    deterministic = False

    def __init__(self, model, *, generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None):
        self.model = model.eval()
        # vocab_size: given for an int8 model, whose packed head has no ``weight`` tensor to read it from
        self.vocab_size = int(vocab_size) if vocab_size is not None else introspect.vocab_size(model)
        self.is_encoder_decoder = introspect.is_encoder_decoder(model)
        self.generator = generator
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ------------------------------------------------------------------ protocol
    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        if request.vocab_size != self.vocab_size:
            raise ValueError(
                f"drafter has {self.vocab_size} logits but the target has {request.vocab_size}: "
                "the drafter must share the target's vocabulary"
            )
        if request.is_encoder_decoder != self.is_encoder_decoder:
            kind = "seq2seq" if self.is_encoder_decoder else "causal"
            target = "seq2seq" if request.is_encoder_decoder else "causal"
            raise ValueError(f"a {kind} HF drafter cannot draft for a {target} target")
        self._device = introspect.model_device(self.model)
        self._source = None if request.is_encoder_decoder else request_source(request)
        self._encoder_outputs = None
        if self.is_encoder_decoder:
            self._source_mask = request.source_mask.to(self._device)
            with torch.no_grad():
                self._encoder_outputs = self.model.get_encoder()(
                    input_ids=request.source_ids.to(self._device), attention_mask=self._source_mask, return_dict=True
                )
        self._cache = new_cache(self.model)
        batch = request.source_ids.shape[0]
        # Causal rows start with prompts of different lengths: left-pad them (masked, with
        # position ids) so every prompt ends in the same column and the first draft is one block.
        self._pad = torch.zeros(batch, dtype=torch.long, device=self._device)
        if self._source is not None:
            prompt_len = self._source[1].to(self._device)
            self._pad = prompt_len.max() - prompt_len
        self._cached_tokens = torch.empty(batch, 0, dtype=torch.long, device=self._device)  # [B,C]
        self._generator = self.generator if self.generator is not None else request.generator

    def _forward(self, seq: torch.Tensor, start: int, stop: int, last_only: bool) -> torch.Tensor:
        """Feed columns [start, stop) of seq [B,W] (cache length == start); float logits [B,w or 1,V]."""
        block = seq[:, start:stop].clamp(min=0)  # left pads (-1) read token 0, masked below
        kwargs = {cache_kwarg(self.model): self._cache, "use_cache": True}
        if self.is_encoder_decoder:
            kwargs.update(decoder_input_ids=block, encoder_outputs=self._encoder_outputs, attention_mask=self._source_mask)
        else:
            kwargs.update(input_ids=block)
            if bool((self._pad > 0).any()):
                columns = torch.arange(stop, device=self._device)
                kwargs["attention_mask"] = (columns[None, :] >= self._pad[:, None]).long()  # [B,stop]
                kwargs["position_ids"] = (columns[None, start:] - self._pad[:, None]).clamp(min=0)  # [B,w]
            if last_only and self._keep_logits:
                kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            logits = self.model(**kwargs).logits
        return (logits[:, -1:] if last_only else logits).float()

    def _pick(self, logits: torch.Tensor, prev: torch.Tensor):
        """Next token per row from logits [B,V]; returns (tokens [B], q [B,V] or None)."""
        sampling = self.request.sampling
        if not sampling.do_sample:
            return logits.argmax(-1), None
        q = ops.process_logits(
            logits[:, None],
            prev_tokens=prev,
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
        )[:, 0]
        return torch.multinomial(q, 1, generator=self._generator)[:, 0], q

    def draft(self, step: DraftStep) -> DraftOutput:
        gamma = int(step.gamma)
        seq, lens = decoder_sequences(self.request, step, self._source, extra=gamma)  # [B,M+γ], [B]
        seq, lens = seq.to(self._device), lens.to(self._device)
        batch = seq.shape[0]
        if bool((self._pad > 0).any()):  # shift row b right by pad[b] (columns are cache positions)
            columns = torch.arange(seq.shape[1] + int(self._pad.max()), device=self._device)
            source_col = columns[None, :] - self._pad[:, None]  # [B,W']
            inside = (source_col >= 0) & (source_col < seq.shape[1])
            seq = torch.where(inside, seq.gather(1, source_col.clamp(0, seq.shape[1] - 1)), -1)
            lens = lens + self._pad

        # Roll back: keep the longest cached prefix valid for every row (at least 1 token left to feed).
        width = min(self._cached_tokens.shape[1], seq.shape[1])
        same = (self._cached_tokens[:, :width] == seq[:, :width]).long().cumprod(1).sum(1)  # [B]
        keep = int(torch.minimum(same, lens - 1).min())
        crop_cache(self._cache, keep)

        sampling = self.request.sampling.do_sample
        probs = torch.zeros(batch, gamma, self.vocab_size, device=self._device) if sampling else None
        low, high = int(lens.min()), int(lens.max())
        end = high + gamma - 1  # feed columns [keep, end): the last one yields row max's γ-th draft

        def take(logits_at: torch.Tensor, column: int) -> None:
            """Logits read at ``column`` propose the token at column+1 for rows past their real tokens."""
            prev = seq[:, : column + 1] if sampling else None  # real tokens + drafts so far
            token, q = self._pick(logits_at, prev)
            drafting = column + 1 >= lens  # [B]
            seq[:, column + 1] = torch.where(drafting, token, seq[:, column + 1])
            if q is not None:
                index = column + 1 - lens  # draft index per row
                rows = (drafting & (index < gamma)).nonzero().flatten()
                probs[rows, index[rows]] = q[rows]

        logits = self._forward(seq, keep, low, last_only=True)
        take(logits[:, -1], low - 1)
        for column in range(low, end):
            logits = self._forward(seq, column, column + 1, last_only=True)
            take(logits[:, -1], column)
        fed = max(end, low)
        self._cached_tokens = seq[:, :fed].clone()
        if cache_length(self._cache) != fed:  # pragma: no cover - guards HF cache behaviour changes
            raise RuntimeError(f"drafter cache holds {cache_length(self._cache)} positions, expected {fed}")
        index = lens[:, None] + torch.arange(gamma, device=self._device)  # [B,γ]
        tokens = seq.gather(1, index)
        return DraftOutput(tokens=tokens, probs=probs)

    def end(self) -> None:
        self._cache = None
        self._encoder_outputs = None
        super().end()

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        """config.json (fastspec) + the HF model folder (its own config.json + model.safetensors)."""
        model_dir = os.path.join(folder, "model")
        self.model.save_pretrained(model_dir, safe_serialization=True)
        files = {
            f"model/{name}": file_sha256(os.path.join(model_dir, name))
            for name in sorted(os.listdir(model_dir))
            if name.endswith((".json", ".safetensors"))
        }
        save_folder(folder, "hf", {"model_dir": "model", "is_encoder_decoder": self.is_encoder_decoder}, extra_files=files)

    @classmethod
    def load(cls, folder: str, **kwargs) -> "HFDrafter":
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config, _ = load_folder(folder, "hf")
        path = os.path.join(folder, str(config.get("model_dir", "model")))
        loader = AutoModelForSeq2SeqLM if config.get("is_encoder_decoder") else AutoModelForCausalLM
        try:
            model = loader.from_pretrained(path, use_safetensors=True)
        except Exception as e:  # HF raises OSError/ValueError/SafetensorError depending on the damage
            raise UserError(f"corrupted HF drafter model in {path!r}: {type(e).__name__}: {e}") from None
        return cls(model, **kwargs)


__all__ = ["HFDrafter"]
