"""Trainable views of drafters ("students") for the trainer.

A student exposes
* ``module``: the ``nn.Module`` whose parameters are trained (DDP wraps this);
* ``logits(module, source_ids, output_ids, device)`` -> (logits [B,T,V], mask [B,T]):
  teacher-forced next-token logits, position t predicting ``output_ids[b][t]``;
* ``sample(source_ids, max_new_tokens, device)`` -> per-row output ids (on-policy KD);
* ``vocab_size``.
``module`` is passed in so the call goes through the DDP wrapper when there is one.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from fastspec.distill.teacher import eos_token_ids, pad_right, teacher_forced_logits, vocab_size


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
        self.vocab_size = vocab_size(model)

    def logits(self, module, source_ids, output_ids, device):
        return teacher_forced_logits(_Forward(module, self.model), source_ids, output_ids, device=device)

    @torch.no_grad()
    def sample(self, source_ids, max_new_tokens, device) -> List[List[int]]:
        from fastspec.distill.pseudo import strip_output
        from fastspec.distill.teacher import is_encoder_decoder, pad_left, pad_token_id

        pad = pad_token_id(self.model)
        seq2seq = is_encoder_decoder(self.model)
        ids, mask = (pad_right if seq2seq else pad_left)(source_ids, pad, device)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=max_new_tokens, pad_token_id=pad
        )
        self.model.train(was_training)
        skip = 1 if seq2seq else ids.shape[1]
        return [strip_output(row[skip:].tolist(), eos_token_ids(self.model), pad) or [pad] for row in out.cpu()]

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
        outputs: List[List[int]] = [[] for _ in source_ids]
        done = [False] * len(source_ids)
        for _ in range(max_new_tokens):
            rows = [self._context(s, o) for s, o in zip(source_ids, outputs)]
            ids, _ = pad_right(rows, self.pad_id, device)
            logits = self.module(ids)  # [B,L,V]
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            step_logits = logits[torch.arange(len(rows), device=device), last]  # [B,V]
            tokens = torch.multinomial(step_logits.float().softmax(-1), 1)[:, 0].tolist()
            for row, token in enumerate(tokens):
                if not done[row]:
                    outputs[row].append(token)
                    done[row] = token in self.eos_ids
            if all(done):
                break
        return outputs

    def state_dict(self):
        return self.module.state_dict()
