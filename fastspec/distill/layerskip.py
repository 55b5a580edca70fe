"""``--drafter layerskip``: fine-tune the exit head of a LayerSkip drafter.

The drafter is the target cut after ``num_layers`` decoder layers (see
:mod:`fastspec.drafters.layer_skip`); its exit is the target's final norm + LM head, which
were trained to read the *last* layer. Here trainable copies of those two modules are fitted
to the early layer's hidden states (every other weight stays the target's, frozen), and
saved as the drafter folder's ``model.safetensors`` (``exit_head: true`` in its config).
"""
from __future__ import annotations

import copy

import torch

from fastspec.distill.students import _Forward
from fastspec.distill.teacher import teacher_forced_logits, vocab_size


def _exit_modules(view):
    """(owner, attribute) of the final norm and the LM head inside a truncated view."""
    if getattr(view.config, "is_encoder_decoder", False):
        return (view.decoder, "final_layer_norm"), (view, "lm_head")
    for outer in ("model", "transformer"):
        base = getattr(view, outer, None)
        for name in ("norm", "ln_f"):
            if base is not None and isinstance(getattr(base, name, None), torch.nn.Module):
                return (base, name), (view, "lm_head")
    raise ValueError(f"cannot find the final norm of {type(view).__name__}")


def attach_exit_head(view, state=None) -> torch.nn.ModuleDict:
    """Give ``view`` its own copies of norm + head (optionally loaded from ``state``)."""
    (norm_owner, norm_name), (head_owner, head_name) = _exit_modules(view)
    head = torch.nn.ModuleDict({
        "norm": copy.deepcopy(getattr(norm_owner, norm_name)),
        "head": copy.deepcopy(getattr(head_owner, head_name)),
    })
    if state is not None:
        head.load_state_dict(state, strict=True)
    for p in head.parameters():
        p.requires_grad_(True)
    setattr(norm_owner, norm_name, head["norm"])
    setattr(head_owner, head_name, head["head"])
    return head


class ExitHeadStudent:
    """Trainer view: ``module`` = the exit head copies; logits = the truncated target's."""

    def __init__(self, target, num_layers: int = 1):
        from fastspec.drafters.layer_skip import truncated_view

        self.target = target
        self.num_layers = int(num_layers)
        self.view = truncated_view(target, self.num_layers)
        self.module = attach_exit_head(self.view)
        self.vocab_size = vocab_size(target)

    def logits(self, module, source_ids, output_ids, device):
        return teacher_forced_logits(_Forward(self.view, self.view), source_ids, output_ids, device=device)

    def sample(self, source_ids, max_new_tokens, device):
        from fastspec.distill.students import HFStudent

        return HFStudent(self.view).sample(source_ids, max_new_tokens, device)

    def as_drafter(self):
        from fastspec.drafters.layer_skip import LayerSkipDrafter

        drafter = LayerSkipDrafter(self.target, self.num_layers)
        drafter.model = self.view
        return drafter

    def save_drafter(self, folder: str) -> None:
        from fastspec.drafters.io import save_folder

        save_folder(folder, "layer_skip", {"num_layers": self.num_layers, "exit_head": True},
                    {k: v for k, v in self.module.state_dict().items()})


def load_layerskip_drafter(folder: str, target):
    """A LayerSkipDrafter with the fine-tuned exit head of ``folder`` (if it has one)."""
    from fastspec.drafters.layer_skip import LayerSkipDrafter

    return LayerSkipDrafter.load(folder, target=target)
