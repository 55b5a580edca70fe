"""The tensors of one ``generate`` call, normalised and checked before any forward.

Seq2seq targets take whatever their encoder takes (T5/BART/Marian: ``input_ids`` +
``attention_mask``; Whisper: ``input_features`` and no mask) and an optional decoder prompt
(``decoder_input_ids``, HF's name); causal targets take ``input_ids`` as the prompt.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

from fastspec import introspect
from fastspec.errors import UserError

DECODER_PROMPT_KEYS = ("decoder_input_ids", "decoder_attention_mask")


@dataclass
class Request:
    """One call's inputs on the model's input device.

    encoder_inputs: seq2seq only: the encoder's keyword tensors, each [B,...] (input_ids and
        attention_mask, or input_features, ...); {} for causal targets.
    source_ids / source_mask: [B,S] the token source (encoder input_ids, or the causal prompt);
        None when the target reads no token ids (Whisper).
    prompt / prompt_mask: [B,P] the decoder prompt (seq2seq: the decoder start token, or
        ``decoder_input_ids``) or the causal prompt, in the caller's layout (any padding side).
    """

    encoder_inputs: Dict[str, torch.Tensor]
    source_ids: Optional[torch.Tensor]
    source_mask: Optional[torch.Tensor]
    prompt: torch.Tensor
    prompt_mask: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.prompt.shape[0])

    def repeat_rows(self, n: int) -> "Request":
        """Every row n times in a row (num_return_sequences)."""
        if n == 1:
            return self

        def rep(t):
            return None if t is None else t.repeat_interleave(n, dim=0)

        return replace(
            self,
            encoder_inputs={k: rep(v) for k, v in self.encoder_inputs.items()},
            source_ids=rep(self.source_ids),
            source_mask=rep(self.source_mask),
            prompt=rep(self.prompt),
            prompt_mask=rep(self.prompt_mask),
        )


def _named_parameters(fn) -> set:
    return {n for n, p in inspect.signature(fn).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def split_model_inputs(model, kwargs: dict) -> Tuple[dict, dict]:
    """(model inputs, generation kwargs): tensors the encoder's forward names, and the decoder
    prompt, are inputs; everything else is left for the generation config to judge."""
    inputs = {k: kwargs.pop(k) for k in DECODER_PROMPT_KEYS if k in kwargs}
    if introspect.is_encoder_decoder(model):
        accepted = _named_parameters(model.get_encoder().forward)
        for key in list(kwargs):
            if key in accepted and isinstance(kwargs[key], torch.Tensor):
                inputs[key] = kwargs.pop(key)
    return inputs, kwargs


def _as_2d(name: str, value, like: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    if value is None:
        return None
    value = torch.as_tensor(value)
    if value.dim() == 1 and (like is None or like.shape[0] == 1 or value.shape == like.shape[1:]):
        value = value[None]
    if value.dim() != 2:
        raise UserError(f"{name} must be [batch, length], got shape {tuple(value.shape)}")
    return value


def _check_tokens(name: str, ids: torch.Tensor, mask: Optional[torch.Tensor], vocab: int) -> torch.Tensor:
    """[B,S] ids and their mask; returns the mask (all ones when None)."""
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise UserError(f"{name} is empty")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise UserError(f"{name} must hold integer token ids, got {ids.dtype}")
    if mask is None:
        mask = torch.ones_like(ids)
    if tuple(mask.shape) != tuple(ids.shape):
        raise UserError(f"attention_mask shape {tuple(mask.shape)} != {name} shape {tuple(ids.shape)}")
    if bool((mask.sum(-1) == 0).any()):
        raise UserError(f"attention_mask of {name} has a row with no real token")
    real = ids[mask.bool()]
    if bool((real < 0).any()) or bool((real >= vocab).any()):
        raise UserError(f"{name} hold ids outside [0, {vocab}) (the target's vocabulary)")
    return mask


def build_request(model, input_ids, attention_mask, model_inputs: dict, config) -> Request:
    """Check and place the inputs; ``config`` is the resolved GenerationConfig (start token)."""
    device = introspect.model_device(model)
    vocab = introspect.vocab_size(model)
    input_ids = _as_2d("input_ids", input_ids)
    attention_mask = _as_2d("attention_mask", attention_mask, input_ids)
    if input_ids is not None:
        attention_mask = _check_tokens("input_ids", input_ids, attention_mask, vocab)
        max_positions = introspect.max_positions(model)
        if max_positions is not None and input_ids.shape[1] > max_positions:
            raise UserError(f"input length {input_ids.shape[1]} exceeds the model's max positions {max_positions}")
        input_ids, attention_mask = input_ids.to(device, torch.long), attention_mask.to(device, torch.long)
    elif attention_mask is not None:
        attention_mask = attention_mask.to(device, torch.long)
    decoder_ids = _as_2d("decoder_input_ids", model_inputs.pop("decoder_input_ids", None))
    decoder_mask = _as_2d("decoder_attention_mask", model_inputs.pop("decoder_attention_mask", None), decoder_ids)

    if not introspect.is_encoder_decoder(model):
        if input_ids is None:
            raise UserError("input_ids is required for a causal target")
        if decoder_ids is not None or model_inputs:
            extra = sorted(model_inputs) + (["decoder_input_ids"] if decoder_ids is not None else [])
            raise UserError(f"{extra} are inputs of encoder-decoder targets; {type(model).__name__} is causal")
        return Request({}, input_ids, attention_mask, input_ids, attention_mask)

    encoder_inputs = {k: v.to(device) for k, v in model_inputs.items()}
    if input_ids is not None:
        encoder_inputs["input_ids"] = input_ids
    if attention_mask is not None:
        encoder_inputs["attention_mask"] = attention_mask
    if not any(k != "attention_mask" for k in encoder_inputs):
        raise UserError("no encoder input: pass input_ids or the tensor the encoder takes (e.g. input_features)")
    sizes = {k: int(v.shape[0]) for k, v in encoder_inputs.items()}
    if decoder_ids is not None:
        sizes["decoder_input_ids"] = int(decoder_ids.shape[0])
    if len(set(sizes.values())) != 1:
        raise UserError(f"inputs disagree on the batch size: {sizes}")
    batch = next(iter(sizes.values()))
    if decoder_ids is None:
        start = introspect.decoder_start_token_id(model, config)
        decoder_ids = torch.full((batch, 1), start, dtype=torch.long)
    decoder_mask = _check_tokens("decoder_input_ids", decoder_ids, decoder_mask, vocab)
    decoder_ids, decoder_mask = decoder_ids.to(device, torch.long), decoder_mask.to(device, torch.long)
    return Request(encoder_inputs, input_ids, attention_mask, decoder_ids, decoder_mask)
