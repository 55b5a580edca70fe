"""Random-weight T5 models of the real FLAN-T5 / T5 shapes, shared by the benchmarks (no T5 weights
exist offline, DESIGN §4). Gated-GELU, untied head, vocabulary 32128, like FLAN-T5."""
import torch

FLAN_T5_BASE = dict(d_model=768, d_ff=2048, num_heads=12, layers=12)
T5_SMALL = dict(d_model=512, d_ff=1024, num_heads=8, layers=6)


def t5_shaped(d_model: int, d_ff: int, num_heads: int, layers: int, *, dtype=torch.float32, fast_init: bool = False):
    """A T5ForConditionalGeneration in eval mode, seeded. ``fast_init``: skip HF's init (minutes on 2
    cores at base size) and fill the weights with N(0, 1/fan_in) instead."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers,
                      num_decoder_layers=layers, num_heads=num_heads, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
                      dropout_rate=0.0)
    if not fast_init:
        torch.manual_seed(0)
        return T5ForConditionalGeneration(config).to(dtype).eval()
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * (param.shape[-1] ** -0.5))
    return model.eval()
