"""Generation settings: merged like HF ``generate()`` and validated once, before any forward.

``resolve_generation_config`` merges kwargs > ``generation_config`` > ``model.generation_config``
> HF defaults; :func:`validate_settings` turns the result into the frozen :class:`Settings` the
loop, the processors and beam search read. Anything we cannot honour raises a ``UserError``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from fastspec import introspect
from fastspec.drafters.base import SamplingParams
from fastspec.errors import UserError
from fastspec.skinny_linear import verify_rows_cap

# Engine options that are not GenerationConfig attributes.
ENGINE_OPTIONS = ("seed", "dynamic_gamma", "min_gamma", "max_gamma", "sync_timing", "skinny_linear",
                  "grouped_attention", "inplace_cache", "max_verify_rows")

# GenerationConfig attributes we cannot honour, with the values that mean "off".
_UNSUPPORTED_DEFAULTS = {
    "typical_p": (None, 1.0),
    "min_p": (None,),
    "top_h": (None,),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "force_words_ids": (None,),
    "constraints": (None,),
    "exponential_decay_length_penalty": (None,),
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

    options = {k: kwargs.pop(k) for k in list(kwargs) if k in ENGINE_OPTIONS}
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
        raise UserError(f"fastspec.generate: unsupported keyword argument(s) {unknown}")
    for key, value in kwargs.items():
        setattr(config, key, value)
    for key, off_values in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(config, key, None)
        if value not in off_values and not (isinstance(value, (list, tuple, dict)) and len(value) == 0):
            raise UserError(f"fastspec.generate does not support {key}={value!r}")
    return config, options


def token_list(value) -> Tuple[int, ...]:
    """An id setting (None, int, list or tensor) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(x) for x in value.flatten().tolist())
    if isinstance(value, int):
        return (value,)
    return tuple(int(x) for x in value)


@dataclass(frozen=True)
class Settings:
    """Everything the loop, the processors and beam search read, validated."""

    max_new_tokens: int
    min_new_tokens: int
    min_length: int
    sampling: SamplingParams
    eos: Tuple[int, ...]
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
    sync_timing: bool
    skinny_linear: bool = True  # the target's few-row fp32 CPU linears on fastspec.ops.skinny_linear
    grouped_attention: bool = True  # grouped-query SDPA blocks without copying the KV cache (fastspec.grouped_attention)
    inplace_cache: bool = True  # the target's KV appends write in place (fastspec.cache.GrowableLayer)
    # cap on a verify block's rows B·(γ+1); γ shrinks to fit, 0 drafts when B reaches it (0 = no cap)
    max_verify_rows: int = 0
    # HF's mask-type processors (DESIGN §9), applied at every verified position
    no_repeat_ngram_size: int = 0
    bad_words_ids: Tuple[Tuple[int, ...], ...] = ()
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_ids: Tuple[int, ...] = ()
    suppress_tokens: Tuple[int, ...] = ()
    begin_suppress_tokens: Tuple[int, ...] = ()


def _check_ids(name: str, ids, vocab: int) -> None:
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UserError(f"{name} holds ids {bad} outside the target vocabulary [0, {vocab})")


def _processor_settings(config, eos, vocab: int) -> dict:
    ngram = int(config.no_repeat_ngram_size or 0)
    if ngram < 0:
        raise UserError(f"no_repeat_ngram_size must be >= 0, got {ngram}")
    bad_words = config.bad_words_ids or []
    if not isinstance(bad_words, (list, tuple)) or any(not isinstance(w, (list, tuple)) or not w for w in bad_words):
        raise UserError(f"bad_words_ids must be a list of non-empty lists of token ids, got {bad_words!r}")
    # HF's NoBadWordsLogitsProcessor drops single-token entries equal to an EOS id
    bad_words = tuple(tuple(int(t) for t in w) for w in bad_words if not (len(w) == 1 and int(w[0]) in eos))
    forced_bos = config.forced_bos_token_id
    out = dict(
        no_repeat_ngram_size=ngram,
        bad_words_ids=bad_words,
        forced_bos_token_id=None if forced_bos is None else int(forced_bos),
        forced_eos_token_ids=token_list(config.forced_eos_token_id),
        suppress_tokens=token_list(config.suppress_tokens),
        begin_suppress_tokens=token_list(config.begin_suppress_tokens),
    )
    _check_ids("bad_words_ids", [t for w in bad_words for t in w], vocab)
    for name in ("forced_eos_token_ids", "suppress_tokens", "begin_suppress_tokens"):
        _check_ids(name, out[name], vocab)
    _check_ids("forced_bos_token_id", [] if forced_bos is None else [out["forced_bos_token_id"]], vocab)
    return out


def _max_new_tokens(model, config, options, prompt_width: int) -> int:
    """HF's length rules; ``prompt_width`` is the decoder/causal input width."""
    is_seq2seq = introspect.is_encoder_decoder(model)
    max_positions = introspect.max_positions(model)
    if config.max_new_tokens is not None:
        max_new_tokens = int(config.max_new_tokens)
    elif options.get("default_max_length"):  # HF: 20 new tokens, capped by the model's max positions
        max_new_tokens = int(config.max_length)
        if max_positions is not None and not is_seq2seq:
            max_new_tokens = min(max_new_tokens + prompt_width, max_positions) - prompt_width
    else:  # HF: max_length counts the prompt (causal) or the decoder prompt (seq2seq)
        max_new_tokens = int(config.max_length) - prompt_width
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if max_positions is not None and not is_seq2seq and prompt_width + max_new_tokens > max_positions:
        raise UserError(
            f"input length {prompt_width} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max positions {max_positions}"
        )
    return max_new_tokens


def _sampling(config) -> SamplingParams:
    do_sample = bool(config.do_sample)
    temperature = float(config.temperature if config.temperature is not None else 1.0)
    top_k = int(config.top_k or 0)
    top_p = float(config.top_p if config.top_p is not None else 1.0)
    repetition_penalty = float(config.repetition_penalty if config.repetition_penalty is not None else 1.0)
    if do_sample and not temperature > 0:
        raise UserError(f"sampling needs temperature > 0, got {temperature} (use do_sample=False for greedy)")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise UserError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    return SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)


def _gammas(drafter, gamma, options) -> dict:
    if drafter is None:
        return dict(gamma=0, dynamic_gamma=False, min_gamma=0, max_gamma=0)
    if not isinstance(gamma, int) or gamma < 1:
        raise UserError(f"gamma must be an integer >= 1 with a drafter, got {gamma!r}")
    dynamic = bool(options.get("dynamic_gamma", False))
    if not dynamic:
        return dict(gamma=gamma, dynamic_gamma=False, min_gamma=gamma, max_gamma=gamma)
    min_gamma, max_gamma = int(options.get("min_gamma", 1)), int(options.get("max_gamma", 2 * gamma))
    if not 1 <= min_gamma <= gamma <= max_gamma:
        raise UserError(f"dynamic gamma needs 1 <= min_gamma <= gamma <= max_gamma, got {min_gamma}, {gamma}, {max_gamma}")
    return dict(gamma=gamma, dynamic_gamma=True, min_gamma=min_gamma, max_gamma=max_gamma)


def _max_verify_rows(model, drafter, options) -> int:
    value = options.get("max_verify_rows")
    if value is None:  # the default: a cap where wider blocks cost another read of the weights
        skinny = bool(options.get("skinny_linear", True))
        return verify_rows_cap(model) if drafter is not None and skinny else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"max_verify_rows must be an int >= 0 (0 = no cap), got {value!r}")
    return value


def validate_settings(model, drafter, gamma: int, config, options, prompt_width: int) -> Settings:
    """The validated settings of one call; ``prompt_width`` [P] is the decoder/causal prompt width."""
    vocab = introspect.vocab_size(model)
    if drafter is not None:
        drafter_vocab = getattr(drafter, "vocab_size", None)
        if drafter_vocab is not None and int(drafter_vocab) != vocab:
            raise UserError(f"drafter vocab_size {drafter_vocab} != target vocab_size {vocab}")
    num_beams = int(config.num_beams or 1)
    if num_beams < 1:
        raise UserError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1:
        if drafter is not None:
            raise UserError("num_beams > 1 runs autoregressive beam search: pass drafter=None")
        if config.do_sample:
            raise UserError("num_beams > 1 with do_sample=True (beam sampling) is not supported")
        if config.early_stopping not in (None, True, False, "never"):
            raise UserError(f"early_stopping must be True, False or 'never', got {config.early_stopping!r}")
    sampling = _sampling(config)
    num_return_sequences = int(config.num_return_sequences or 1)
    if num_return_sequences < 1:
        raise UserError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if num_return_sequences > 1 and not sampling.do_sample and num_beams == 1:
        raise UserError("greedy decoding (do_sample=False) does not support num_return_sequences > 1")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise UserError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")

    eos = token_list(config.eos_token_id)
    pad = config.pad_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if pad is None:
        pad = eos[0] if eos else 0
    sync = options.get("sync_timing")
    if sync is None:
        sync = os.environ.get("FASTSPEC_SYNC_TIMING", "0") not in ("", "0", "false", "False")
    return Settings(
        max_new_tokens=_max_new_tokens(model, config, options, prompt_width),
        min_new_tokens=int(config.min_new_tokens or 0),
        min_length=int(config.min_length or 0),
        sampling=sampling,
        eos=eos,
        pad_token_id=int(pad),
        num_return_sequences=num_return_sequences,
        num_beams=num_beams,
        length_penalty=float(config.length_penalty if config.length_penalty is not None else 1.0),
        early_stopping=config.early_stopping if config.early_stopping is not None else False,
        seed=options.get("seed"),
        sync_timing=bool(sync),
        skinny_linear=bool(options.get("skinny_linear", True)),
        grouped_attention=bool(options.get("grouped_attention", True)),
        inplace_cache=bool(options.get("inplace_cache", True)),
        max_verify_rows=_max_verify_rows(model, drafter, options),
        **_gammas(drafter, gamma, options),
        **_processor_settings(config, eos, vocab),
    )
