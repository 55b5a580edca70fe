"""What fastspec needs to know about a HF model, asked in one place.

Every module that needs a model's vocabulary size, special ids, positions or device asks
here, so the answer cannot differ between the engine, the drafters and the trainer.
"""
from __future__ import annotations

from typing import List, Optional

import torch


def hf_model(target):
    """The ``transformers`` model behind a fastspec target (or the model itself)."""
    from transformers import PreTrainedModel

    if isinstance(target, PreTrainedModel):
        return target
    for name in ("model", "hf_model"):
        inner = getattr(target, name, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    if isinstance(target, torch.nn.Module):
        return target
    raise TypeError(f"cannot find a transformers model in {type(target).__name__}")


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def vocab_size(model) -> int:
    """Logit width: the output embedding rows (T5 pads its 32100 tokens to 32128)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(text_config(model).vocab_size)


def text_config(model):
    """The decoder/text part of the config (multimodal configs nest it)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(model) -> Optional[int]:
    config = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "max_target_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _generation_or_model_config(model, name: str):
    gen = getattr(model, "generation_config", None)
    value = getattr(gen, name, None) if gen is not None else None
    if value is None:
        value = getattr(model.config, name, None)
    return value


def eos_token_ids(model) -> List[int]:
    """All EOS ids (generation config first, then the model config), as a list."""
    value = _generation_or_model_config(model, "eos_token_id")
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def pad_token_id(model) -> int:
    """The pad id, else the first EOS id, else 0 (what HF generate() pads with)."""
    for value in (getattr(model.config, "pad_token_id", None), _first(eos_token_ids(model) or None)):
        if value is not None:
            return int(value)
    return 0


def decoder_start_token_id(model, generation_config=None) -> Optional[int]:
    """First decoder token of a seq2seq model (a list-valued setting gives its first entry); None
    for causal models. A seq2seq model without one is an error HF generate() would raise too."""
    if not is_encoder_decoder(model):
        return None
    value = getattr(generation_config, "decoder_start_token_id", None) if generation_config is not None else None
    if value is None:
        value = _generation_or_model_config(model, "decoder_start_token_id")
    if value is None:
        value = _generation_or_model_config(model, "bos_token_id")
    value = _first(value)
    if value is None:
        raise ValueError(f"{type(model).__name__} has no decoder_start_token_id (nor bos_token_id)")
    return int(value)


def model_device(model) -> torch.device:
    """Where the model's inputs go: the device of its input embeddings (with ``device_map``
    the first shard), else of its first parameter."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype
