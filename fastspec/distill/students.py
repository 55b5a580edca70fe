"""Trainable views of drafters ("students") for the trainer.

A student exposes
* ``module``: the ``nn.Module`` whose parameters are trained (DDP wraps this);
* ``logits(module, source_ids, output_ids, device)`` -> (logits [B,T,V], mask [B,T]):
  teacher-forced next-token logits, position t predicting ``output_ids[b][t]``;
* ``sample(source_ids, max_new_tokens, device)`` -> per-row output ids, each ending at its
  first EOS (on-policy KD must not train on tokens after EOS);
* ``vocab_size``.
``module`` is passed in so the call goes through the DDP wrapper when there is one.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import torch

from fastspec import drafters, introspect
from fastspec.distill.feature import shortlist_topk_teacher
from fastspec.distill.feature_data import build_shortlist
from fastspec.distill.pseudo import strip_output
from fastspec.distill.teacher import pad_left, pad_right, teacher_forced_logits
from fastspec.drafters.io import load_drafter
from fastspec.drafters.layer_skip import (
    LayerSkipDrafter, ShortlistHead, VocabLogits, attach_exit_head, exit_modules, truncated_view,
)
from fastspec.drafters.shortlist import draft_index
from fastspec.errors import UserError


class TrainingError(UserError):
    """A user-facing problem with the training set-up (data, flags, the drafter asked for)."""


def sample_until_eos(next_logits: Callable[[List[List[int]]], torch.Tensor], batch: int, max_new_tokens: int,
                     eos_ids: Sequence[int]) -> List[List[int]]:
    """Sample up to ``max_new_tokens`` per row from ``next_logits(outputs so far) -> [B,V]``; a row
    stops after its first EOS token (kept), and sampling stops when every row has."""
    outputs: List[List[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    eos = set(int(e) for e in eos_ids)
    for _ in range(max_new_tokens):
        tokens = torch.multinomial(next_logits(outputs).float().softmax(-1), 1)[:, 0].tolist()
        for row, token in enumerate(tokens):
            if not done[row]:
                outputs[row].append(token)
                done[row] = token in eos
        if all(done):
            break
    return outputs


class _Forward(torch.nn.Module):
    """Lets teacher_forced_logits call a (possibly DDP-wrapped) module while reading the
    config of the underlying HF model."""

    def __init__(self, wrapped, hf):
        super().__init__()
        self.wrapped = wrapped
        self.config = hf.config
        self._hf = [hf]

    def parameters(self, recurse=True):
        return self._hf[0].parameters(recurse)

    def forward(self, **kwargs):
        return self.wrapped(**kwargs)


class HFStudent:
    """Any transformers LM as a drafter (T5-small for FLAN-T5 targets, a small causal LM)."""

    def __init__(self, model):
        self.model = model
        self.module = model
        self.vocab_size = introspect.vocab_size(model)

    def logits(self, module, source_ids, output_ids, device):
        return teacher_forced_logits(_Forward(module, self.model), source_ids, output_ids, device=device)

    @torch.no_grad()
    def sample(self, source_ids, max_new_tokens, device) -> List[List[int]]:
        pad = introspect.pad_token_id(self.model)
        seq2seq = introspect.is_encoder_decoder(self.model)
        ids, mask = (pad_right if seq2seq else pad_left)(source_ids, pad, device)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad
        )
        self.model.train(was_training)
        skip = 1 if seq2seq else ids.shape[1]
        return [strip_output(row[skip:].tolist(), introspect.eos_token_ids(self.model), pad) or [pad] for row in out.cpu()]

    def state_dict(self):
        return self.module.state_dict()


class TokenLMStudent:
    """A plain module mapping token ids [B,L] to next-token logits [B,L,V] (CNN/LSTM drafters).

    The context fed to the module is ``[start_token_id] + output`` (the drafter sees what
    the target generated so far), preceded by the source ids when ``prefix_source``
    (drafters that prime on the prompt, e.g. for causal targets).
    """

    def __init__(self, module, vocab_size: int, start_token_id: int, eos_ids: Sequence[int] = (), prefix_source=False, pad_id=0):
        self.module = module
        self.vocab_size = vocab_size
        self.start_token_id = start_token_id
        self.eos_ids = list(eos_ids)
        self.prefix_source = prefix_source
        self.pad_id = pad_id

    def _context(self, source, output_prefix):
        return (list(source) if self.prefix_source else []) + [self.start_token_id] + list(output_prefix)

    def logits(self, module, source_ids, output_ids, device):
        rows = [self._context(s, o[:-1]) if o else self._context(s, []) for s, o in zip(source_ids, output_ids)]
        ids, _ = pad_right(rows, self.pad_id, device)  # [B,L]
        logits = module(ids)  # [B,L,V]
        out_ids, out_mask = pad_right(output_ids, self.pad_id, device)  # [B,T]
        offsets = torch.tensor([len(r) - max(len(o), 1) for r, o in zip(rows, output_ids)], device=device)  # [B]
        steps = torch.arange(out_ids.shape[1], device=device)
        at = (offsets[:, None] + steps[None, :]).clamp(0, ids.shape[1] - 1)  # [B,T]
        return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1])), out_mask.bool()

    @torch.no_grad()
    def sample(self, source_ids, max_new_tokens, device) -> List[List[int]]:
        def next_logits(outputs):
            rows = [self._context(s, o) for s, o in zip(source_ids, outputs)]
            ids, _ = pad_right(rows, self.pad_id, device)
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            return self.module(ids)[torch.arange(len(rows), device=device), last]  # [B,V]

        return sample_until_eos(next_logits, len(source_ids), max_new_tokens, self.eos_ids)

    def state_dict(self):
        return self.module.state_dict()


class NeuralStudent:
    """The trainer's view of a CNN/LSTM drafter: the drafter reads ``[start] + outputs`` and is
    conditioned on the source (see :mod:`fastspec.drafters.neural`).

    eos_ids: the target's EOS ids; :meth:`sample` ends a row at its first EOS.
    A shortlisted head gives logits over its N ids; ``shortlist`` maps the trainer's labels and
    teacher distributions onto them (None for a full head).
    """

    def __init__(self, drafter, eos_ids: Sequence[int] = ()):
        self.drafter = drafter
        self.module = drafter.model
        self.vocab_size = drafter.model.vocab_size
        self.eos_ids = list(eos_ids)
        self.shortlist = HeadShortlist(drafter.model) if drafter.model.shortlist_ids is not None else None

    def _inputs(self, source_ids, outputs_prefix, device):
        starts = [self.drafter.start_for(s) for s in source_ids]
        rows = [[st] + list(o) for st, o in zip(starts, outputs_prefix)]
        return pad_rows(rows, device), pad_rows(source_ids, device)

    def logits(self, module, source_ids, output_ids, device):
        """Teacher-forced head logits [B,T,N] (position t predicts output_ids[b][t]; N = V for a
        full head) and mask [B,T]."""
        ids, source = self._inputs(source_ids, [o[:-1] for o in output_ids], device)
        logits = module(ids, source)  # [B,L,V]
        width = max([len(o) for o in output_ids] + [1])
        if logits.shape[1] < width:  # every output of length <= 1
            logits = torch.nn.functional.pad(logits, (0, 0, 0, width - logits.shape[1]))
        lengths = torch.tensor([len(o) for o in output_ids], device=device)
        mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
        return logits[:, :width], mask

    @torch.no_grad()
    def sample(self, source_ids, max_new_tokens, device) -> List[List[int]]:
        def next_logits(outputs):
            ids, source = self._inputs(source_ids, outputs, device)
            last = torch.tensor([len(o) for o in outputs], device=device)
            head = self.module(ids, source)[torch.arange(len(outputs), device=device), last]  # [B,N]
            return head if self.shortlist is None else self.shortlist.to_vocab(head)  # [B,V]: target ids

        return sample_until_eos(next_logits, len(source_ids), max_new_tokens, self.eos_ids)

    def as_drafter(self):
        return self.drafter

    def save_drafter(self, folder: str) -> None:
        self.drafter.save(folder)


class HeadShortlist:
    """The trainer's target-vocabulary labels and teacher distributions, restricted to the N ids of
    a shortlisted head (``model.shortlist_ids``, read at each call: it follows the module's device).
    As for the feature drafter (EAGLE-3), labels outside the shortlist are ignored and token-level
    KD skips positions whose teacher argmax is outside it."""

    def __init__(self, model):
        self.model = model

    @property
    def size(self) -> int:
        return int(self.model.shortlist_ids.numel())

    def _index(self, device) -> torch.Tensor:
        return draft_index(self.model.shortlist_ids, self.model.vocab_size).to(device)  # [V] -> row or -1

    def to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits [...,N] -> [...,V], −inf outside the shortlist."""
        return self.model.head_to_vocab(logits)

    def labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Target ids [...] (-100 = none) -> head rows, -100 where none or outside the shortlist."""
        rows = self._index(labels.device)[labels.clamp(0, self.model.vocab_size - 1)]
        return torch.where((labels >= 0) & (labels < self.model.vocab_size) & (rows >= 0), rows, -100)

    def teacher(self, logits: torch.Tensor):
        """Dense teacher logits [...,V] -> (logits on the shortlist [...,N], argmax inside [...])."""
        inside = self._index(logits.device)[logits.argmax(-1)] >= 0
        return logits.index_select(-1, self.model.shortlist_ids.to(logits.device)), inside

    def teacher_topk_sparse(self, values: torch.Tensor, ids: torch.Tensor, lse: torch.Tensor):
        """A top-k cache (values/ids [T,k], lse [T]) on the head, sparse: (log-probs [T,k], head
        columns [T,k] with −1 outside the shortlist, tail log-prob [T]) for
        ``sparse_teacher_divergence`` (``dense_teacher`` of it is the dense [T,N] teacher)."""
        return shortlist_topk_teacher(values.float(), ids.long(), lse.float(), self._index(values.device))


DEFAULT_SHORTLIST = 8192  # drafter_options["shortlist"] when absent (0 = a full head)


def label_shortlist(records: Sequence[dict], size: int, vocab_size: int, always: Sequence[int] = (), *,
                    references: bool = True, outputs: bool = True):
    """[≤size] target ids of a shortlisted head: the most frequent training labels of ``records``
    plus ``always`` (the EOS ids). The labels are what the trainer trains on: the reference_ids
    (``references``: CE) and the target's output_ids, or the references of records without
    outputs (``outputs``: KD). None (a full head) when size is 0 or the shortlist would be the
    whole vocabulary."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise TrainingError(f"the drafter's shortlist must be an int >= 0 (0 = a full head), got {size!r}")
    if size == 0:
        return None
    rows = []
    for r in records:
        if references:
            rows.append(r.get("reference_ids") or [])
        if outputs:
            rows.append((r["output_ids"] if r.get("output_ids") is not None else r.get("reference_ids")) or [])
    labels = torch.tensor([t for row in rows for t in row], dtype=torch.long)
    labels = labels[(labels >= 0) & (labels < vocab_size)]
    ids = build_shortlist(torch.bincount(labels, minlength=vocab_size), size, [e for e in always if 0 <= e < vocab_size])
    return None if ids.numel() == 0 or ids.numel() >= vocab_size else ids


def pad_rows(rows: Sequence[Sequence[int]], device, pad: int = -1) -> torch.Tensor:
    """Right-pad python rows into [B,max_len] int64 (at least 1 column); -1 is the drafters' pad."""
    ids, _ = pad_right(rows, pad, device)
    return ids


class ExitHeadStudent:
    """``--drafter layer_skip``: ``module`` = trainable copies of the target's final norm + LM head
    on top of its first ``num_layers`` decoder layers (every other weight stays the target's).
    ``shortlist`` ([N] target ids, :func:`label_shortlist`): the head covers only those ids."""

    def __init__(self, target, num_layers: int = 1, shortlist=None, *, drafter: Optional[LayerSkipDrafter] = None):
        self.target = target
        if drafter is not None:  # continue a saved drafter: its depth, its exit head (one is attached if none)
            self.num_layers, self.view = drafter.num_layers, drafter.model
            self.module = drafter.exit_head if drafter.exit_head is not None else attach_exit_head(self.view)
        else:
            self.num_layers = int(num_layers)
            self.view = truncated_view(target, self.num_layers)
            self.module = attach_exit_head(self.view, shortlist=shortlist)
        self.vocab_size = introspect.vocab_size(target)
        head = self.module["head"]
        self.shortlist = HeadShortlist(head) if isinstance(head, ShortlistHead) else None

    def logits(self, module, source_ids, output_ids, device):
        """Teacher-forced head logits [B,T,N] (N = V for a full head) and mask [B,T]."""
        return teacher_forced_logits(_Forward(self.view, self.view), source_ids, output_ids, device=device)

    def sample(self, source_ids, max_new_tokens, device):
        if self.shortlist is None:
            return HFStudent(self.view).sample(source_ids, max_new_tokens, device)
        owner, name = exit_modules(self.view)[1]
        setattr(owner, name, VocabLogits(self.module["head"]))  # generate samples target ids, KV-cached
        try:
            return HFStudent(self.view).sample(source_ids, max_new_tokens, device)
        finally:
            setattr(owner, name, self.module["head"])

    def as_drafter(self) -> LayerSkipDrafter:
        return LayerSkipDrafter(self.target, self.num_layers, view=self.view, exit_head=self.module)

    def save_drafter(self, folder: str) -> None:
        self.as_drafter().save(folder)


# --------------------------------------------------------------------------- builders

NEURAL_CLASSES = {"lstm": drafters.LSTMDrafter, "cnn": drafters.CNNDrafter}
DRAFTER_KINDS = ("t5small", "hf") + tuple(NEURAL_CLASSES) + ("layer_skip",)
SHORTLISTED_KINDS = tuple(NEURAL_CLASSES) + ("layer_skip",)  # trained heads that may cover a shortlist


def fresh_hf_drafter_model(target, options: dict):
    """A small randomly initialised HF model with the target's vocabulary and special ids:
    T5 (gated-gelu) for seq2seq targets, Llama for causal ones. ``options`` override sizes."""
    vocab = introspect.vocab_size(target)
    eos = introspect.eos_token_ids(target)
    special = dict(pad_token_id=introspect.pad_token_id(target), eos_token_id=eos if len(eos) > 1 else (eos or [None])[0])
    if introspect.is_encoder_decoder(target):
        from transformers import T5Config, T5ForConditionalGeneration

        settings = dict(d_model=256, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
        settings.update(options)
        config = T5Config(vocab_size=vocab, decoder_start_token_id=introspect.decoder_start_token_id(target),
                          **special, **settings)
        return T5ForConditionalGeneration(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=introspect.max_positions(target) or 2048,
                    tie_word_embeddings=True)
    settings.update(options)
    config = LlamaConfig(vocab_size=vocab, bos_token_id=getattr(introspect.text_config(target), "bos_token_id", None),
                         **special, **settings)
    return LlamaForCausalLM(config)


class HFDrafterStudent(HFStudent):
    """HFStudent that turns into / saves as a :class:`fastspec.drafters.hf.HFDrafter`."""

    def as_drafter(self):
        return drafters.HFDrafter(self.model)

    def save_drafter(self, folder: str) -> None:
        self.as_drafter().save(folder)


def _hf_model_from(init_from: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if not os.path.isdir(init_from):
        raise TrainingError(f"--init_from {init_from}: no such folder")
    config = AutoConfig.from_pretrained(init_from)
    loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return loader.from_pretrained(init_from)


def _student_from_folder(kind: str, target, folder: str, options: dict):
    """A CNN/LSTM/layer-skip student that continues the drafter saved in ``folder`` (its sizes,
    shortlist and weights: fine-tuning, or on-policy KD after a first training)."""
    if options:
        raise TrainingError(f"--init_from {folder}: the drafter's sizes come from its folder; drop "
                            f"{', '.join(sorted(options))} (--drafter_config / --shortlist)")
    drafter = load_drafter(folder, target)  # a damaged folder is a one-line UserError
    expected = LayerSkipDrafter if kind == "layer_skip" else NEURAL_CLASSES[kind]
    if not isinstance(drafter, expected):
        raise TrainingError(f"--init_from {folder} holds a {type(drafter).__name__}, not a --drafter {kind}")
    if kind == "layer_skip":
        return ExitHeadStudent(target, drafter=drafter)
    drafter.model.embed.weight.requires_grad_(False)  # as for a fresh student: the target's embeddings
    return NeuralStudent(drafter, introspect.eos_token_ids(target))


def build_student(kind: str, target, *, init_from: Optional[str] = None, options: Optional[dict] = None, seed: int = 0):
    """The trainable student for ``--drafter kind`` against ``target`` (an HF model). For cnn/lstm/
    layer_skip, ``options["shortlist"]`` may hold a shortlisted head's [N] target ids
    (:func:`label_shortlist`). ``init_from``: a local HF folder (t5small/hf), or a saved drafter
    folder of the same kind (cnn/lstm/layer_skip) to continue."""
    options = dict(options or {})
    torch.manual_seed(seed)  # the drafter's initial weights are part of the run's seed
    if kind in ("t5small", "hf"):
        model = _hf_model_from(init_from) if init_from else fresh_hf_drafter_model(target, options)
        if introspect.is_encoder_decoder(model) != introspect.is_encoder_decoder(target):
            raise TrainingError("the HF drafter and the target must both be seq2seq or both causal")
        return HFDrafterStudent(model.train())
    if kind not in NEURAL_CLASSES and kind != "layer_skip":
        raise TrainingError(f"unknown drafter {kind!r}; choose from ngram, {', '.join(DRAFTER_KINDS)}")
    if init_from:
        return _student_from_folder(kind, target, init_from, options)
    try:
        if kind == "layer_skip":
            return ExitHeadStudent(target, **options)
        # the input embeddings are the target's own (copied in): Adam over all V rows would cost more
        # than the rest of the drafter per step, so they stay frozen unless asked for
        train_embeddings = bool(options.pop("train_embeddings", False))
        student = NeuralStudent(NEURAL_CLASSES[kind].from_target(target, **options), introspect.eos_token_ids(target))
        student.module.embed.weight.requires_grad_(train_embeddings)
        return student
    except (TypeError, ValueError) as err:  # an unknown --drafter_config key, or a value out of range
        raise TrainingError(f"--drafter_config does not fit --drafter {kind}: {err}") from None
