"""Tiny models and tokenizer shared by the training/pseudo/CLI tests (issue 5)."""
import importlib.util
import os

import torch


def t5_tokenizer_dir():
    origin = importlib.util.find_spec("diffsynth").origin
    return os.path.join(os.path.dirname(origin), "tokenizer_configs", "flux", "tokenizer_2")


def tiny_t5(vocab_size=32128, seed=0, d_model=16, layers=1):
    """A FLAN-T5-architecture model small enough for CPU tests."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=32, num_layers=layers, num_decoder_layers=layers,
        num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_llama(vocab_size=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def hf_generate(target, drafter, input_ids, attention_mask, gamma, seed=None, **kwargs):
    """Stand-in for fastspec.generate (plain HF generate) where the engine is not needed."""
    from fastspec.introspect import hf_model

    if seed is not None:
        torch.manual_seed(seed)
    model = hf_model(target)

    class Out:
        pass

    out = Out()
    out.sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out


class TinyLSTMLM(torch.nn.Module):
    """ids [B,L] -> logits [B,L,V]: a stand-in plain-module drafter."""

    def __init__(self, vocab_size, hidden=16, seed=0, dropout=0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab_size, hidden)
        self.lstm = torch.nn.LSTM(hidden, hidden, batch_first=True)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, ids):
        out, _ = self.lstm(self.drop(self.embed(ids)))
        return self.head(out)
