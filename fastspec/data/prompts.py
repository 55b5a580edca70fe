"""Prompts and batched tokenization with truncation to the target's max source length.

* seq2seq targets (FLAN-T5): ``"summarize: " + source`` (the FLAN-T5 task prefix).
* causal instruct targets: the tokenizer's chat template around
  ``"<instruction>\\n\\n<source>"`` with the generation prompt appended.
* causal targets without a chat template: ``"<source>\\n\\nTL;DR:"``.

Sources that do not fit are truncated *inside* the prompt (the template's head and tail
survive) and counted; one warning reports the count.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

from fastspec import introspect
from fastspec.errors import UserError

SEQ2SEQ_PREFIX = "summarize: "
CHAT_INSTRUCTION = "Summarize the following text in a few sentences."
_PLACEHOLDER = "\u2063SOURCE\u2063"  # an invisible separator pair nobody writes by accident


@dataclass
class EncodedSources:
    """input_ids: one token list per source (no padding). num_truncated: how many were cut."""

    input_ids: List[List[int]]
    num_truncated: int
    max_source_length: int


def default_max_source_length(tokenizer, model=None, fallback: int = 512) -> int:
    """The tokenizer's model_max_length if it is a real limit, else the model's context size."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max is not None and tok_max < 1_000_000:
        limits.append(int(tok_max))
    positions = introspect.max_positions(model) if model is not None else None
    if positions:
        limits.append(positions)
    return min(limits) if limits else fallback


def prompt_template(tokenizer, is_encoder_decoder: bool, instruction: str = CHAT_INSTRUCTION) -> str:
    """The prompt with ``{source}`` where the text goes."""
    if is_encoder_decoder:
        return SEQ2SEQ_PREFIX + "{source}"
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instruction}\n\n{_PLACEHOLDER}"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        head, tail = rendered.split(_PLACEHOLDER)
        return head.replace("{", "{{").replace("}", "}}") + "{source}" + tail.replace("{", "{{").replace("}", "}}")
    return "{source}\n\nTL;DR:"


def format_prompts(tokenizer, sources: Sequence[str], is_encoder_decoder: bool, instruction: str = CHAT_INSTRUCTION):
    template = prompt_template(tokenizer, is_encoder_decoder, instruction)
    return [template.format(source=s) for s in sources]


def encode_sources(
    tokenizer,
    sources: Sequence[str],
    *,
    is_encoder_decoder: bool,
    max_source_length: int,
    instruction: str = CHAT_INSTRUCTION,
    batch_size: int = 512,
    warn: bool = True,
) -> EncodedSources:
    """Tokenize prompts in batches, truncating the source text so each prompt fits."""
    template = prompt_template(tokenizer, is_encoder_decoder, instruction)
    head_text, tail_text = template.split("{source}")
    head_text, tail_text = head_text.replace("{{", "{").replace("}}", "}"), tail_text.replace("{{", "{").replace("}}", "}")
    # seq2seq prompts use the tokenizer's special tokens (T5 appends </s>); chat templates carry their own.
    add_special = is_encoder_decoder or not getattr(tokenizer, "chat_template", None)
    empty = tokenizer(head_text + tail_text, add_special_tokens=add_special)["input_ids"]
    budget = max_source_length - len(empty)
    if budget <= 0:
        raise UserError(f"max_source_length={max_source_length} leaves no room for the source (prompt alone is {len(empty)} tokens)")
    ids: List[List[int]] = []
    num_truncated = 0
    for start in range(0, len(sources), batch_size):
        chunk = list(sources[start : start + batch_size])
        encoded = tokenizer([head_text + s + tail_text for s in chunk], add_special_tokens=add_special)["input_ids"]
        too_long = [i for i, e in enumerate(encoded) if len(e) > max_source_length]
        if too_long:
            num_truncated += len(too_long)
            source_ids = tokenizer([chunk[i] for i in too_long], add_special_tokens=False)["input_ids"]
            for i, src in zip(too_long, source_ids):
                encoded[i] = _fit(tokenizer, head_text, tail_text, src, budget, max_source_length, add_special)
        ids.extend(encoded)
    if warn and num_truncated:
        warnings.warn(
            f"truncated {num_truncated} of {len(sources)} sources to max_source_length={max_source_length} tokens",
            stacklevel=2,
        )
    return EncodedSources(ids, num_truncated, max_source_length)


def encode_prompts(tokenizer, model, sources: Sequence[str], max_source_length: Optional[int] = None) -> List[List[int]]:
    """Prompt token ids for ``model`` (``summarize:`` prefix or chat template), each cut to the
    smaller of ``max_source_length`` and what the tokenizer and the model's positions allow."""
    limit = default_max_source_length(tokenizer, model)
    if max_source_length:
        limit = min(limit, max_source_length)
    encoded = encode_sources(tokenizer, sources, is_encoder_decoder=introspect.is_encoder_decoder(model),
                             max_source_length=limit)
    return encoded.input_ids


def _fit(tokenizer, head, tail, source_ids, budget, max_len, add_special):
    """Cut the source tokens to the budget; shrink further if re-tokenization grew the prompt."""
    keep = budget
    while True:
        text = tokenizer.decode(source_ids[:keep], skip_special_tokens=True)
        encoded = tokenizer(head + text + tail, add_special_tokens=add_special)["input_ids"]
        if len(encoded) <= max_len or keep == 0:
            return encoded[:max_len]
        keep = max(0, keep - (len(encoded) - max_len))


def encode_references(
    tokenizer,
    references: Sequence[Optional[str]],
    *,
    max_target_length: int,
    batch_size: int = 512,
) -> List[Optional[List[int]]]:
    """Reference token ids ending with EOS (for teacher forcing), cut to ``max_target_length``."""
    eos = tokenizer.eos_token_id
    out: List[Optional[List[int]]] = []
    for start in range(0, len(references), batch_size):
        chunk = list(references[start : start + batch_size])
        present = [r for r in chunk if r is not None]
        encoded = iter(tokenizer(present, add_special_tokens=False)["input_ids"]) if present else iter(())
        for ref in chunk:
            if ref is None:
                out.append(None)
                continue
            ids = list(next(encoded))[: max_target_length - 1]
            out.append(ids + [eos] if eos is not None else ids)
    return out
