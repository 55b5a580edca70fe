"""Shared fixtures: small, deterministic (seeded init), session-scoped targets.

tiny_t5:           FLAN-T5 architecture (gated-gelu, untied head, vocab 32128), 2+2 layers, d_model 64.
tiny_llama:        Llama causal model, vocab 3001, 2 layers, hidden 64.
tiny_vocab_llama:  Llama causal model with vocab 12, for statistical sampling tests.
tiny_vocab_t5:     T5 (FLAN-T5 architecture) with vocab 12, for statistical sampling tests.
t5_tokenizer:      the real offline T5 tokenizer (DESIGN §4).
t5_inputs / llama_inputs: ragged batches of 8 (T5: real tokenizer ids, right padding;
                   Llama: left padding).
"""
import pytest
import torch


def _spread_init(model, seed):
    """Seeded re-init with spread-out weights: random-init HF models emit one token forever and
    have near-tied logits; these scales give varied outputs and top-2 logit gaps >> float noise."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue
            if "shared" in name or "embed" in name:
                param.normal_(0.0, 1.0)
            elif "lm_head" in name:
                param.normal_(0.0, 3.0 / param.shape[-1] ** 0.5)
            elif "relative_attention_bias" in name:
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 2.0 / param.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def t5_tokenizer():
    from fastspec.targets import load_t5_tokenizer

    return load_t5_tokenizer()


@pytest.fixture(scope="session")
def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                      eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
    torch.manual_seed(1234)
    return _spread_init(T5ForConditionalGeneration(config), seed=0)


def _llama(vocab_size, seed, hidden=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return _spread_init(LlamaForCausalLM(config), seed=seed)


@pytest.fixture(scope="session")
def tiny_llama():
    return _llama(3001, seed=4321)


@pytest.fixture(scope="session")
def tiny_vocab_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=12, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1,
        pad_token_id=0, dropout_rate=0.0,
    )
    torch.manual_seed(77)
    model = _spread_init(T5ForConditionalGeneration(config), seed=77)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.3)  # softer: dozens of likely (token, token) pairs, not one
    return model


@pytest.fixture(scope="session")
def tiny_vocab_llama():
    return _llama(12, seed=99, hidden=32)


T5_TEXTS = [
    "summarize: The quick brown fox jumps over the lazy dog near the river bank.",
    "translate English to German: How old are you?",
    "summarize: Speculative decoding drafts tokens and verifies them with the target model.",
    "question: What is the capital of France? context: Paris is the capital of France.",
    "summarize: Hello world",
    "summarize: A short one.",
    "summarize: Large language models are slow because decoding is sequential, one token per forward pass.",
    "cola sentence: The course is jumping well.",
]


@pytest.fixture(scope="session")
def t5_inputs(t5_tokenizer):
    """(input_ids [8,S], attention_mask [8,S]) real T5 ids, right padded, ragged lengths."""
    enc = t5_tokenizer(T5_TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="session")
def llama_inputs():
    """(input_ids [8,S], attention_mask [8,S]) random ids in [3, 3001), left padded, lengths 3..12."""
    gen = torch.Generator().manual_seed(7)
    lengths = [12, 5, 9, 3, 7, 11, 4, 8]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 3001, (length,), generator=gen)
        mask[row, width - length :] = 1
    return ids, mask
