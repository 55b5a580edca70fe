"""What the small neural drafters (CNN, LSTM) share: embeddings, source conditioning, the
drafter sequence, sampling, and save/load. Their training lives in :mod:`fastspec.distill`
(``fastspec.distill.students.NeuralStudent``, ``fastspec.distill.trainer.fit_drafter``).

The drafter reads ``[start] + generated`` per row, where ``start`` is the decoder start token
(seq2seq) or the last prompt token (causal), and is conditioned on the source through the mean
of its token embeddings, computed once per request. Training uses the same sequence, shifted:
position t predicts output token t, so nothing leaks (both models are strictly causal).

The output head covers the whole target vocabulary, or a shortlist of N target ids
(``shortlist_size`` in the config, the ``shortlist_ids`` [N] buffer = the draft → target map, see
:mod:`fastspec.drafters.shortlist`): the head is then [N,D], about V/N times cheaper, and the
drafted tokens and q stay on the target's vocabulary.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from fastspec import introspect, ops
from fastspec.drafters.base import DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.context import request_source
from fastspec.drafters.folder import load_folder, save_folder
from fastspec.drafters.shortlist import check_shortlist, to_vocab
from fastspec.errors import UserError


class TokenModel(nn.Module):
    """Embedding [V,E] (+ projection E->D when E != D), mean-pooled source embeddings, and the
    output head's size: V, or N = ``shortlist_size`` with the ``shortlist_ids`` [N] buffer (the
    target id of each head row; saved in the state dict). Subclasses build ``self.head`` with
    :meth:`make_head`."""

    def __init__(self, vocab_size: int, embed_dim: int, dim: int, shortlist_size: Optional[int] = None):
        super().__init__()
        self.vocab_size, self.embed_dim, self.dim = int(vocab_size), int(embed_dim), int(dim)
        self.embed = nn.Embedding(self.vocab_size, self.embed_dim)
        self.in_proj = nn.Linear(self.embed_dim, self.dim) if self.embed_dim != self.dim else None
        self.shortlist_size = int(shortlist_size) if shortlist_size else None  # None / 0: a full head
        if self.shortlist_size is not None and not 1 <= self.shortlist_size <= self.vocab_size:
            raise ValueError(f"shortlist_size must be in [1, {self.vocab_size}], got {shortlist_size}")
        ids = None if self.shortlist_size is None else torch.arange(self.shortlist_size)
        self.register_buffer("shortlist_ids", ids)  # None: not in the state dict (old checkpoints load)

    @property
    def head_size(self) -> int:
        return self.shortlist_size or self.vocab_size

    def make_head(self, width: int) -> nn.Linear:
        return nn.Linear(width, self.head_size, bias=False)

    def base_config(self) -> dict:
        """The config keys of this class (subclasses add theirs); no shortlist key for a full head."""
        config = dict(vocab_size=self.vocab_size, embed_dim=self.embed_dim, dim=self.dim)
        if self.shortlist_size is not None:
            config["shortlist_size"] = self.shortlist_size
        return config

    def set_shortlist(self, ids) -> None:
        """Set the head rows' target ids ([N] distinct ids in [0, V), N = shortlist_size)."""
        ids = check_shortlist(ids, self.vocab_size)
        if self.shortlist_ids is None or ids.numel() != self.shortlist_size:
            raise ValueError(f"this model's head has {self.head_size} rows, the shortlist {ids.numel()} ids")
        with torch.no_grad():
            self.shortlist_ids.copy_(ids)

    def head_to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits [..., N] -> logits over the vocabulary [..., V] (−inf outside the shortlist)."""
        return logits if self.shortlist_ids is None else to_vocab(logits, self.shortlist_ids, self.vocab_size)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (-1 = pad, reads row 0; callers mask) -> [..., D]."""
        x = self.embed(ids.clamp(min=0))
        return self.in_proj(x) if self.in_proj is not None else x

    def pooled_source(self, source: torch.Tensor) -> torch.Tensor:
        """source [B,S] (-1 = pad) -> mean embedding of the real tokens [B,E] (zeros if none)."""
        mask = (source >= 0).unsqueeze(-1).to(self.embed.weight.dtype)  # [B,S,1]
        total = (self.embed(source.clamp(min=0)) * mask).sum(1)
        return total / mask.sum(1).clamp(min=1.0)

    def init_from_target(self, target: nn.Module) -> None:
        """Copy the target's input embeddings (their width must be embed_dim; extra rows dropped)."""
        weight = target.get_input_embeddings().weight
        if weight.shape[1] != self.embed_dim:
            raise ValueError(f"target embeddings are {weight.shape[1]} wide, the drafter's embed_dim is {self.embed_dim}")
        rows = min(weight.shape[0], self.vocab_size)
        with torch.no_grad():
            self.embed.weight[:rows].copy_(weight[:rows].to(self.embed.weight.dtype))


def choose_tokens(model: TokenModel, logits: torch.Tensor, sampling=None, prev: Optional[torch.Tensor] = None,
                  generator=None):
    """Python twin of the runtime's token choice. Head logits [B,N] -> (target ids [B], the head
    logits [B,N] (greedy) or q [B,V] (sampling, zero outside a shortlist), prev grown by the tokens)."""
    if sampling is None or not sampling.do_sample:
        row = logits.argmax(-1)
        return (row if model.shortlist_ids is None else model.shortlist_ids[row]), logits, prev
    q = ops.process_logits(
        model.head_to_vocab(logits.float())[:, None], prev_tokens=prev, do_sample=True, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
    )[:, 0]
    token = torch.multinomial(q, 1, generator=generator)[:, 0]
    prev = token[:, None] if prev is None else torch.cat([prev, token[:, None]], dim=1)
    return token, q, prev


def native_choice_kwargs(model: TokenModel, sampling=None, prev: Optional[torch.Tensor] = None, generator=None) -> dict:
    """The runtime ops' head-id map and sampling arguments."""
    head = {} if model.shortlist_ids is None else dict(head_ids=model.shortlist_ids)
    if sampling is None or not sampling.do_sample:
        return head
    return dict(head, do_sample=True, temperature=float(sampling.temperature), top_k=int(sampling.top_k),
                top_p=float(sampling.top_p), repetition_penalty=float(sampling.repetition_penalty),
                prev_tokens=prev, generator=generator)


class NeuralDrafter(Drafter):
    """Base of CNNDrafter / LSTMDrafter. Subclasses set ``kind``, ``model_class`` and implement
    ``_draft(seq, lens, gamma, sampling, prev)`` (native runtime or its Python twin)."""

    kind = ""
    model_class = None
    deterministic = False  # greedy targets: argmax drafts, probs None; sampling: q returned

    def __init__(self, model: TokenModel, *, start_token_id: Optional[int] = None, use_native: bool = True):
        self.model = model.eval()
        self.vocab_size = model.vocab_size
        self.start_token_id = start_token_id  # seq2seq decoder start; None: the last source token
        self.use_native = bool(use_native)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target: nn.Module, *, start_token_id: Optional[int] = None, shortlist=None, **model_kwargs):
        """A drafter sharing the target's vocabulary, embeddings initialised from the target's.
        shortlist: [N] target ids for a shortlisted head (most frequent first); None = a full head."""
        embed_dim = target.get_input_embeddings().weight.shape[1]
        vocab = introspect.vocab_size(target)
        ids = None if shortlist is None else check_shortlist(shortlist, vocab)
        model = cls.model_class(vocab_size=vocab, embed_dim=embed_dim,
                                shortlist_size=None if ids is None else ids.numel(), **model_kwargs)
        if ids is not None:
            model.set_shortlist(ids)
        model.init_from_target(target)
        if start_token_id is None:
            start_token_id = introspect.decoder_start_token_id(target)  # None for causal targets
        return cls(model, start_token_id=start_token_id)

    def start_for(self, source: Sequence[int]) -> int:
        if self.start_token_id is not None:
            return int(self.start_token_id)
        return int(source[-1]) if len(source) else 0

    # ------------------------------------------------------------------ protocol
    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        if request.vocab_size != self.vocab_size:
            raise ValueError(f"drafter vocabulary {self.vocab_size} != target vocabulary {request.vocab_size}")
        self._device = self.model.embed.weight.device
        source, source_len = request_source(request)
        self._source = source.to(self._device)  # [B,S] left-aligned, -1 padded
        if request.is_encoder_decoder:
            start = request.decoder_start_token_id if request.decoder_start_token_id is not None else self.start_token_id
            self._starts = torch.full((source.shape[0],), int(start or 0), dtype=torch.long, device=self._device)
        else:  # causal: the prompt's last token starts the drafter sequence (as in training)
            last = source.gather(1, (source_len - 1).clamp(min=0)[:, None])[:, 0].clamp(min=0)
            self._starts = last.to(self._device)
        self._generator = request.generator
        with torch.no_grad():
            self._condition()

    def _condition(self) -> None:
        """Per-request source conditioning (subclasses)."""

    def sequences(self, step: DraftStep) -> Tuple[torch.Tensor, torch.Tensor]:
        """[start]+generated per row: (seq [B,1+G] -1 padded, lens [B])."""
        gen = step.generated.long().to(self._device)
        num = step.num_generated.long().to(self._device)
        seq = torch.full((num.shape[0], 1 + gen.shape[1]), -1, dtype=torch.long, device=self._device)
        seq[:, 0] = self._starts
        valid = torch.arange(gen.shape[1], device=self._device)[None, :] < num[:, None]
        seq[:, 1:] = torch.where(valid, gen, -1)
        return seq, num + 1

    @property
    def native(self) -> bool:
        return self.use_native and ops.native_available()

    def draft(self, step: DraftStep) -> DraftOutput:
        """γ tokens per row in one runtime call (native, or the Python twin): greedy argmax, or
        sampled from q = the target's processing of the drafter's logits (q returned)."""
        seq, lens = self.sequences(step)
        sampling = self.request.sampling if self.request.sampling.do_sample else None
        # repetition penalty context: [start] + generated (-1 padded), then the drafts
        prev = seq if sampling is not None else None
        with torch.no_grad():
            tokens, scores = self._draft(seq, lens, int(step.gamma), sampling, prev)
        return DraftOutput(tokens=tokens, probs=scores if sampling is not None else None)

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        config = {"model": self.model.config_dict(), "start_token_id": self.start_token_id}
        save_folder(folder, self.kind, config, self.model.state_dict())

    @classmethod
    def load(cls, folder: str, **kwargs):
        config, tensors = load_folder(folder, cls.kind)
        try:
            model = cls.model_class(**config["model"])
            model.load_state_dict(tensors, strict=True)
            if model.shortlist_ids is not None:
                check_shortlist(model.shortlist_ids, model.vocab_size)
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            raise UserError(f"corrupted {cls.kind} drafter in {folder!r}: {type(e).__name__}: {e}") from None
        return cls(model, start_token_id=config.get("start_token_id"), **kwargs)
