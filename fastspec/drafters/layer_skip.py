"""LayerSkipDrafter: self-speculation with the target's own first k decoder layers.

Draft & Verify (Zhang et al. 2023) / LayerSkip (Elhoushi et al. 2024): the drafter is the target
with its decoder cut after layer k, keeping the final norm and the LM head, so it needs no extra
weights. The view shares every parameter with the target (no copy); its forward is the target
class's own forward, so T5 keeps its decoder ``final_layer_norm`` and the ``d_model**-0.5``
scaling before a tied head. Drafting, the KV cache and its rollback are :class:`HFDrafter`'s.

The exit (final norm + LM head) was trained to read the *last* layer; ``fastspec train
--drafter layer_skip`` fits trainable copies of it to layer k (:func:`attach_exit_head`), which
the drafter folder then stores (``exit_head: true``); every other weight stays the target's.
The trained head may cover a shortlist of N target ids (:class:`ShortlistHead`, the CNN/LSTM and
feature drafters' draft vocabulary): at N = 8192 of SmolLM2's 49152 it is most of a drafted
token's cost saved, and q stays exact (zero outside the shortlist).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from fastspec import introspect
from fastspec.drafters.folder import load_folder, save_folder
from fastspec.drafters.hf import HFDrafter
from fastspec.drafters.shortlist import check_shortlist, to_vocab
from fastspec.errors import UserError

KIND = "layer_skip"


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A new module object sharing parameters/submodules, whose child dict can be edited safely."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    view._parameters = dict(module._parameters)
    view._buffers = dict(module._buffers)
    return view


def truncated_view(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """The target with only its first ``num_layers`` decoder layers (weights shared, not copied).

    Supports T5-family seq2seq (``decoder.block``), Llama-like causal models (``model.layers``)
    and GPT-2-like ones (``transformer.h``).
    """
    k = int(num_layers)
    config = copy.deepcopy(model.config)
    view = _shallow(model)
    view.config = config
    if introspect.is_encoder_decoder(model) and hasattr(model, "decoder") and hasattr(model.decoder, "block"):
        total = len(model.decoder.block)
        _check_k(k, total)
        decoder = _shallow(model.decoder)
        decoder.config = copy.deepcopy(model.decoder.config)
        decoder.config.num_layers = k
        decoder.block = torch.nn.ModuleList(list(model.decoder.block)[:k])
        view.decoder = decoder
        config.num_decoder_layers = k
        return view
    for outer, inner in (("model", "layers"), ("transformer", "h")):
        base = getattr(model, outer, None)
        layers = getattr(base, inner, None) if base is not None else None
        if isinstance(layers, torch.nn.ModuleList):
            _check_k(k, len(layers))
            base_view = _shallow(base)
            base_view.config = config
            setattr(base_view, inner, torch.nn.ModuleList(list(layers)[:k]))
            setattr(view, outer, base_view)
            for name in ("num_hidden_layers", "n_layer"):
                if hasattr(config, name):
                    setattr(config, name, k)
            if getattr(config, "layer_types", None) is not None:
                config.layer_types = list(config.layer_types)[:k]
            return view
    raise ValueError(f"LayerSkipDrafter does not know where the decoder layers of {type(model).__name__} are")


def exit_modules(view):
    """(owner, attribute) of the final norm and of the LM head inside a truncated view."""
    if introspect.is_encoder_decoder(view):
        return (view.decoder, "final_layer_norm"), (view, "lm_head")
    for outer in ("model", "transformer"):
        base = getattr(view, outer, None)
        for name in ("norm", "ln_f"):
            if base is not None and isinstance(getattr(base, name, None), torch.nn.Module):
                return (base, name), (view, "lm_head")
    raise ValueError(f"cannot find the final norm of {type(view).__name__}")


def decoder_layers(view) -> torch.nn.ModuleList:
    """The ModuleList of the decoder layers a truncated view runs (T5 ``decoder.block``, Llama-like
    ``model.layers``, GPT-2-like ``transformer.h``)."""
    if introspect.is_encoder_decoder(view) and hasattr(view, "decoder") and hasattr(view.decoder, "block"):
        return view.decoder.block
    for outer, inner in (("model", "layers"), ("transformer", "h")):
        layers = getattr(getattr(view, outer, None), inner, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(view).__name__}")


class ShortlistHead(torch.nn.Module):
    """An exit head over N target ids: hidden [..., D] -> logits [..., N], row i scoring target id
    ``shortlist_ids[i]`` (started as the target LM head's row of that id). ``shortlist_ids`` and
    ``vocab_size`` are what :class:`fastspec.distill.students.HeadShortlist` reads to train it."""

    def __init__(self, head: torch.nn.Linear, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.vocab_size = int(vocab_size)
        ids = check_shortlist(ids, self.vocab_size).to(head.weight.device)
        self.linear = torch.nn.Linear(head.in_features, ids.numel(), bias=head.bias is not None,
                                      device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(head.weight[ids])
            if head.bias is not None:
                self.linear.bias.copy_(head.bias[ids])
        self.register_buffer("shortlist_ids", ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)

    def head_to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits [..., N] -> float32 [..., V], −inf outside the shortlist."""
        return to_vocab(logits, self.shortlist_ids, self.vocab_size)


class VocabLogits(torch.nn.Module):
    """A shortlisted head seen as a full one: hidden [..., D] -> [..., V], −inf outside the
    shortlist, so code that samples target ids from an HF model's logits (``generate``) works."""

    def __init__(self, head: ShortlistHead):
        super().__init__()
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.head_to_vocab(self.head(hidden))


def attach_exit_head(view, state=None, shortlist=None) -> torch.nn.ModuleDict:
    """Give ``view`` its own trainable copies of the final norm + LM head (loaded from ``state``
    when given); the target's own modules are untouched. ``shortlist`` ([N] target ids): the head
    copies only those rows (:class:`ShortlistHead`)."""
    (norm_owner, norm_name), (head_owner, head_name) = exit_modules(view)
    target_head = getattr(head_owner, head_name)
    if shortlist is None:
        head = copy.deepcopy(target_head)
    else:
        head = ShortlistHead(target_head, torch.as_tensor(shortlist), introspect.vocab_size(view))
    exit_head = torch.nn.ModuleDict({"norm": copy.deepcopy(getattr(norm_owner, norm_name)), "head": head})
    if state is not None:
        exit_head.load_state_dict(state, strict=True)
    for p in exit_head.parameters():
        p.requires_grad_(True)
    setattr(norm_owner, norm_name, exit_head["norm"])
    setattr(head_owner, head_name, exit_head["head"])
    return exit_head


def shortlist_head(view) -> Optional[ShortlistHead]:
    """The view's exit head if it is shortlisted, else None."""
    head_owner, head_name = exit_modules(view)[1]
    head = getattr(head_owner, head_name)
    return head if isinstance(head, ShortlistHead) else None


def _check_k(k: int, total: int) -> None:
    if not 1 <= k <= total:
        raise ValueError(f"num_layers must be in [1, {total}] (the target's decoder layers), got {k}")


class LayerSkipDrafter(HFDrafter):
    """Drafts with the target's first ``num_layers`` decoder layers + its final norm + LM head.

    Args:
        target: the HF target model itself (seq2seq T5-family or causal).
        num_layers: decoder layers kept (1 .. all).
        view: an already truncated view of ``target`` (e.g. one whose exit head was trained).
        exit_head: the view's own norm + head copies (:func:`attach_exit_head`), saved with the drafter.
    """

    def __init__(self, target: torch.nn.Module, num_layers: int = 1, *, view=None, exit_head=None, **kwargs):
        self.num_layers = int(num_layers)
        self.exit_head = exit_head
        view = view if view is not None else truncated_view(target, self.num_layers)
        self.shortlist = shortlist_head(view)
        if self.shortlist is not None:  # the view's logits are N wide; the drafter speaks target ids
            kwargs.setdefault("vocab_size", self.shortlist.vocab_size)
        super().__init__(view, **kwargs)

    def _forward(self, seq: torch.Tensor, start: int, stop: int, last_only: bool) -> torch.Tensor:
        logits = super()._forward(seq, start, stop, last_only)
        return logits if self.shortlist is None else self.shortlist.head_to_vocab(logits)

    def save(self, folder: str) -> None:
        """The config, plus the trained exit head if there is one; the other weights are the
        target's (pass it again to :meth:`load`)."""
        if self.exit_head is None:
            save_folder(folder, KIND, {"num_layers": self.num_layers})
            return
        config = {"num_layers": self.num_layers, "exit_head": True}
        if self.shortlist is not None:
            config["shortlist_size"] = int(self.shortlist.shortlist_ids.numel())
        save_folder(folder, KIND, config, self.exit_head.state_dict())

    @classmethod
    def load(cls, folder: str, target=None, **kwargs) -> "LayerSkipDrafter":
        config, tensors = load_folder(folder, KIND)
        if target is None:
            raise UserError("LayerSkipDrafter.load needs target=: the drafter is the target's own first layers")
        try:
            num_layers = int(config["num_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"corrupted layer-skip config in {folder!r}: {e}") from None
        try:
            view = truncated_view(target, num_layers)
        except ValueError as err:
            raise UserError(f"{folder}: {err}") from None
        exit_head = None
        if config.get("exit_head"):
            ids = tensors.get("head.shortlist_ids") if config.get("shortlist_size") else None
            try:
                exit_head = attach_exit_head(view, tensors, shortlist=ids)
            except (RuntimeError, UserError) as err:
                raise UserError(f"{folder}: the exit head does not fit this target: {err}") from None
        return cls(target, num_layers, view=view, exit_head=exit_head, **kwargs)


__all__ = ["LayerSkipDrafter", "ShortlistHead", "VocabLogits", "truncated_view", "attach_exit_head", "shortlist_head",
           "exit_modules", "decoder_layers"]
