"""LayerSkipDrafter: self-speculation with the target's own first k decoder layers.

Draft & Verify (Zhang et al. 2023) / LayerSkip (Elhoushi et al. 2024): the drafter is the target
with its decoder cut after layer k, keeping the final norm and the LM head, so it needs no extra
weights. The view shares every parameter with the target (no copy); its forward is the target
class's own forward, so T5 keeps its decoder ``final_layer_norm`` and the ``d_model**-0.5``
scaling before a tied head. Drafting, the KV cache and its rollback are :class:`HFDrafter`'s.
"""
from __future__ import annotations

import copy

import torch

from fastspec.drafters.hf import HFDrafter
from fastspec.drafters.io import load_folder, save_folder


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
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "decoder") and hasattr(model.decoder, "block"):
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


def _check_k(k: int, total: int) -> None:
    if not 1 <= k <= total:
        raise ValueError(f"num_layers must be in [1, {total}] (the target's decoder layers), got {k}")


class LayerSkipDrafter(HFDrafter):
    """Drafts with the target's first ``num_layers`` decoder layers + its final norm + LM head.

    Args:
        target: the HF target model itself (seq2seq T5-family or causal).
        num_layers: decoder layers kept (1 .. all).
    """

    def __init__(self, target: torch.nn.Module, num_layers: int = 1, **kwargs):
        self.num_layers = int(num_layers)
        super().__init__(truncated_view(target, self.num_layers), **kwargs)

    def save(self, folder: str) -> None:
        """Only the config: the weights are the target's (pass it again to :meth:`load`)."""
        save_folder(folder, "layer_skip", {"num_layers": self.num_layers})

    @classmethod
    def load(cls, folder: str, target=None, **kwargs) -> "LayerSkipDrafter":
        config, tensors = load_folder(folder, "layer_skip")
        if target is None:
            raise ValueError("LayerSkipDrafter.load needs target=: the drafter is the target's own first layers")
        try:
            num_layers = int(config["num_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"corrupted layer-skip config in {folder!r}: {e}") from None
        drafter = cls(target, num_layers, **kwargs)
        if config.get("exit_head"):  # fine-tuned by `fastspec train --drafter layerskip`
            from fastspec.distill.layerskip import attach_exit_head

            try:
                attach_exit_head(drafter.model, tensors)
            except RuntimeError as err:
                raise ValueError(f"{folder}: the exit head does not fit this target: {err}") from None
        return drafter


__all__ = ["LayerSkipDrafter", "truncated_view"]
