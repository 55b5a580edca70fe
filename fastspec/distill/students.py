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


# --------------------------------------------------------------------------- builders

NEURAL_CLASSES = {"lstm": "LSTMDrafter", "cnn": "CNNDrafter"}


def _hf_drafter_cls():
    from fastspec.drafters.hf import HFDrafter

    return HFDrafter


def fresh_hf_drafter_model(target, options: dict):
    """A small randomly initialised HF model with the target's vocabulary and special ids:
    T5 (gated-gelu) for seq2seq targets, Llama for causal ones. ``options`` override sizes."""
    from fastspec.distill.teacher import pad_token_id

    target_config = target.config
    vocab = vocab_size(target)
    if getattr(target_config, "is_encoder_decoder", False):
        from transformers import T5Config, T5ForConditionalGeneration

        settings = dict(d_model=256, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
        settings.update(options)
        config = T5Config(vocab_size=vocab, decoder_start_token_id=target_config.decoder_start_token_id,
                          pad_token_id=target_config.pad_token_id, eos_token_id=target_config.eos_token_id, **settings)
        return T5ForConditionalGeneration(config)
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=getattr(target_config, "max_position_embeddings", 2048),
                    tie_word_embeddings=True)
    settings.update(options)
    config = LlamaConfig(vocab_size=vocab, pad_token_id=pad_token_id(target), eos_token_id=target_config.eos_token_id,
                         bos_token_id=getattr(target_config, "bos_token_id", None), **settings)
    return LlamaForCausalLM(config)


class HFDrafterStudent(HFStudent):
    """HFStudent that turns into / saves as a :class:`fastspec.drafters.hf.HFDrafter`."""

    def as_drafter(self):
        return _hf_drafter_cls()(self.model)

    def save_drafter(self, folder: str) -> None:
        self.as_drafter().save(folder)


def build_student(kind: str, target, *, init_from: Optional[str] = None, options: Optional[dict] = None, seed: int = 0):
    """The trainable student for ``--drafter kind`` against ``target`` (an HF model)."""
    from fastspec.distill.trainer import TrainingError

    options = dict(options or {})
    torch.manual_seed(seed)  # the drafter's initial weights are part of the run's seed
    if kind in ("t5small", "hf"):
        if init_from:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

            if not __import__("os").path.isdir(init_from):
                raise TrainingError(f"--init_from {init_from}: no such folder")
            config = AutoConfig.from_pretrained(init_from)
            loader = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = loader.from_pretrained(init_from)
        else:
            model = fresh_hf_drafter_model(target, options)
        if bool(model.config.is_encoder_decoder) != bool(target.config.is_encoder_decoder):
            raise TrainingError("the HF drafter and the target must both be seq2seq or both causal")
        return HFDrafterStudent(model.train())
    if kind in NEURAL_CLASSES:
        return _neural_student(kind, target, options)
    if kind == "layerskip":
        return _layerskip_student(target, options)
    raise TrainingError(f"unknown drafter {kind!r}; choose from ngram, cnn, lstm, t5small, hf, layerskip")


def _neural_student(kind, target, options):
    from fastspec import drafters
    from fastspec.distill.trainer import TrainingError

    name = NEURAL_CLASSES[kind]
    cls = getattr(drafters, name, None)
    if cls is None:
        raise TrainingError(f"--drafter {kind} needs fastspec.drafters.{name}, which this build does not have")
    try:
        drafter = cls.from_target(target, **options)
    except TypeError as err:  # an unknown --drafter_config key
        raise TrainingError(f"--drafter_config does not fit {name}: {err}") from None
    return DrafterStudent(drafter, drafter.student())


def _layerskip_student(target, options):
    from fastspec.distill.layerskip import ExitHeadStudent

    return ExitHeadStudent(target, **options)


class DrafterStudent:
    """A drafter's own trainer view (``drafter.student()``: module / logits / sample /
    vocab_size) plus what train_drafter needs: ``as_drafter`` and ``save_drafter``."""

    def __init__(self, drafter, inner):
        self.drafter, self.inner = drafter, inner
        self.module = inner.module
        self.vocab_size = inner.vocab_size

    def logits(self, module, source_ids, output_ids, device):
        return self.inner.logits(module, source_ids, output_ids, device)

    def sample(self, source_ids, max_new_tokens, device):
        return self.inner.sample(source_ids, max_new_tokens, device)

    def as_drafter(self):
        return self.drafter

    def save_drafter(self, folder: str) -> None:
        self.drafter.save(folder)
