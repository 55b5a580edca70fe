"""fastspec's engine: lossless speculative decoding (and autoregressive decoding and beam search)
of any HF causal or encoder-decoder target.

Modules: ``config`` (settings merged like HF and validated), ``inputs`` (the call's tensors),
``processors`` (HF's logits processors at every verified position), ``session`` (the target's
encoder/prefill and forwards on a rectangular cache), ``speculative`` (the loop), ``beam``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastspec import introspect
from fastspec.engine.beam import beam_search
from fastspec.engine.config import resolve_generation_config, validate_settings
from fastspec.engine.inputs import build_request, split_model_inputs
from fastspec.engine.session import Stopwatch, TargetSession
from fastspec.engine.speculative import speculative_decode
from fastspec.grouped_attention import grouped_attention
from fastspec.metrics import GenerationMetrics, ideal_speedup
from fastspec.skinny_linear import skinny_linears


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B·num_return_sequences, T] like HF generate()
    metrics: GenerationMetrics


def generate(
    target,
    drafter=None,
    input_ids=None,
    attention_mask=None,
    *,
    gamma: int = 5,
    generation_config=None,
    **kwargs,
) -> GenerateOutput:
    """Lossless speculative decoding of ``target`` with ``drafter`` (None: autoregressive).

    Args:
        target: a HF ``PreTrainedModel``, causal or encoder-decoder (T5, BART, Marian, Whisper, ...).
        drafter: a :class:`fastspec.drafters.Drafter`, or None for plain autoregressive decoding.
        input_ids: [B,S] int64 prompt (causal) or encoder input (seq2seq); any padding side.
        attention_mask: [B,S] 1 for real tokens (default: all ones).
        gamma: tokens drafted per step (γ ≥ 1 with a drafter).
        kwargs: other encoder inputs (e.g. Whisper's ``input_features`` [B,n_mels,frames]); a decoder
            prompt ``decoder_input_ids`` [B,P] (+ ``decoder_attention_mask``); transformers'
            generation names (max_new_tokens, do_sample, temperature, top_k, top_p,
            repetition_penalty, no_repeat_ngram_size, bad_words_ids, forced_bos/eos_token_id,
            suppress_tokens, begin_suppress_tokens, num_beams, ...); engine options ``seed``,
            ``dynamic_gamma``/``min_gamma``/``max_gamma``, ``sync_timing`` (CUDA-synchronised
            per-forward timing; default off, or env FASTSPEC_SYNC_TIMING=1), ``skinny_linear``
            (default True: the target's few-row float32 CPU linears run on
            :func:`fastspec.ops.skinny_linear`; see :mod:`fastspec.skinny_linear`),
            ``grouped_attention`` (default True: grouped-query SDPA over multi-token blocks
            without copying the KV cache; see :mod:`fastspec.grouped_attention`),
            ``inplace_cache`` (default True: the target's KV appends write into spare capacity
            instead of re-concatenating the cache; see :class:`fastspec.cache.GrowableLayer`) and
            ``max_verify_rows`` (a cap on the verify block's rows B·(γ+1): γ shrinks to fit and a
            batch of that many rows decodes without drafts; 0 = no cap; default: 8 for float32
            CPU targets on the skinny kernel whose weights outgrow the caches, else none; see
            :func:`fastspec.skinny_linear.verify_rows_cap`).

    Returns:
        GenerateOutput(sequences [B·n, T] like HF generate(), metrics).
    """
    metrics = GenerationMetrics()
    model = introspect.hf_model(target)
    model_inputs, kwargs = split_model_inputs(model, kwargs)
    config, options = resolve_generation_config(model, generation_config, **kwargs)
    request = build_request(model, input_ids, attention_mask, model_inputs, config)
    settings = validate_settings(model, drafter, gamma, config, options, request.prompt.shape[1])
    stopwatch = Stopwatch(request.prompt.device, settings.sync_timing)
    total_start = stopwatch.now()
    with skinny_linears(model, settings.skinny_linear), grouped_attention(model, settings.grouped_attention):
        if settings.num_beams > 1:
            sequences = beam_search(model, request, settings, metrics, stopwatch)
        else:
            request = request.repeat_rows(settings.num_return_sequences)
            generator = None
            if settings.seed is not None:
                generator = torch.Generator(device=request.prompt.device).manual_seed(int(settings.seed))
            new_tokens = speculative_decode(model, drafter, request, settings, metrics, stopwatch, generator)
            # like HF: the prompt in the caller's layout, then the new tokens padded with pad_token_id
            sequences = torch.cat([request.prompt, new_tokens.masked_fill(new_tokens < 0, settings.pad_token_id)], 1)
    metrics.total_time_s = stopwatch.now() - total_start
    return GenerateOutput(sequences=sequences, metrics=metrics)


__all__ = [
    "GenerateOutput",
    "GenerationMetrics",
    "TargetSession",
    "generate",
    "ideal_speedup",
    "resolve_generation_config",
]
