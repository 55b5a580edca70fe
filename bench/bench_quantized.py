"""c and α of fp32, bf16 and int8 drafters (CNN, LSTM, feature, HFDrafter, LayerSkip) on a
FLAN-T5-base-shaped target (random weights, fp32), all decoders interleaved prompt by prompt in
one run (fastspec.eval.compare), so the ratios share the machine's noise.

c = draft time per drafted token / time of one verification forward (from GenerationMetrics): the
point of this benchmark. α on a random-weight target with untrained drafters is only a sanity check
(every drafter is untrained here, the feature drafter included); greedy outputs must stay identical
to autoregressive decoding whatever the drafter's precision (the target stays fp32).

bf16 drafters on a CPU without bf16 units (AMD EPYC with AVX2 here: no amx_bf16/avx512_bf16) are
emulated, so expect them slower than fp32 there. LayerSkip in bf16 is left out: its layers ARE the
fp32 target's (int8 quantizes a copy of them).

Run:  OMP_NUM_THREADS=1 python -m pytest bench/bench_quantized.py -q -s --benchmark-only
Env:  FASTSPEC_BENCH_LAYERS (target layers, default 12), FASTSPEC_BENCH_PROMPTS (default 3),
      FASTSPEC_BENCH_NEW_TOKENS (default 24), FASTSPEC_BENCH_KINDS (default "cnn,lstm,feature,hf,layer_skip").
"""
import copy
import os

import torch

from bench_precision import _t5_base_shaped
from shapes import T5_SMALL, t5_shaped
from fastspec import precision, report
from fastspec.drafters import CNNDrafter, HFDrafter, LayerSkipDrafter, LSTMDrafter
from fastspec.drafters.feature import FeatureDrafter
from fastspec.drafters.io import quantize_drafter
from fastspec.eval import Decoder, compare

PROMPTS = int(os.environ.get("FASTSPEC_BENCH_PROMPTS", "3"))
NEW_TOKENS = int(os.environ.get("FASTSPEC_BENCH_NEW_TOKENS", "24"))
KINDS = os.environ.get("FASTSPEC_BENCH_KINDS", "cnn,lstm,feature,hf,layer_skip").split(",")
GAMMA = 5


def _float_drafters(target):
    torch.manual_seed(0)
    make = {
        "cnn": lambda: CNNDrafter.from_target(target, dim=256, num_layers=3),
        "lstm": lambda: LSTMDrafter.from_target(target, dim=256, hidden_size=256),
        "feature": lambda: FeatureDrafter.from_target(target),
        "hf": lambda: HFDrafter(t5_shaped(**T5_SMALL)),
        "layer_skip": lambda: LayerSkipDrafter(target, 1),
    }
    return {kind: make[kind]() for kind in KINDS}


def _bf16(kind, drafter):
    if kind == "layer_skip":
        return None  # its weights are the target's own fp32 layers
    copied = copy.copy(drafter)
    if kind == "feature":
        embed = drafter.model._embed
        copied.model = copy.deepcopy(drafter.model, {id(embed): embed}).to(torch.bfloat16)
    else:
        copied.model = copy.deepcopy(drafter.model).to(torch.bfloat16)
    return type(drafter)(copied.model) if kind in ("feature", "hf") else copied


def _decoders(target):
    decoders = []
    for kind, drafter in _float_drafters(target).items():
        for dtype, variant in (("float32", drafter), ("bfloat16", _bf16(kind, drafter)), ("int8", quantize_drafter(drafter))):
            if variant is not None:
                decoders.append(Decoder(f"{kind} {dtype}", variant, GAMMA, {"kind": kind, "drafter_dtype": dtype}))
    return decoders


def test_c_and_alpha_per_drafter_dtype(benchmark):
    target = _t5_base_shaped(torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (120,), generator=gen).tolist() for _ in range(PROMPTS)]
    decoders = _decoders(target)
    result = benchmark.pedantic(compare, args=(target, decoders, prompts),
                                kwargs=dict(max_new_tokens=NEW_TOKENS, gamma=GAMMA, progress=False, strict=True),
                                rounds=1, iterations=1)
    rows = result.rows
    by_name = {r["name"]: r for r in rows}
    for row in rows[1:]:
        base = by_name.get(f"{row['kind']} float32")
        row["c_vs_fp32"] = row["c"] / base["c"] if base and base["c"] else None
    columns = [report.Column("name", "drafter"), report.Column("c", "c", report.fmt_float(4)),
               report.Column("c_vs_fp32", "c / c(fp32)", report.fmt_float(2)),
               report.Column("acceptance_rate", "α", report.fmt_float(3)),
               report.Column("mean_accepted_length", "τ", report.fmt_float(2)),
               report.Column("speedup", "speedup vs AR", report.fmt_ratio()),
               report.Column("identical", "identical to AR", report.fmt_bool)]
    caps = precision.cpu_capabilities()
    units = [k for k in ("amx_bf16", "avx512_bf16", "amx_int8", "avx512_vnni", "avx2") if caps.get(k)]
    print(f"\n### c and α per drafter dtype: FLAN-T5-base-shaped fp32 target ({os.environ.get('FASTSPEC_BENCH_LAYERS', '12')}"
          f"+same layers, random weights), {PROMPTS} prompts × {NEW_TOKENS} tokens, γ={GAMMA}, "
          f"{torch.get_num_threads()} thread(s), CPU units: {', '.join(units) or 'none listed'}")
    print(report.markdown_table(rows[1:], columns))
    benchmark.extra_info["rows"] = [{k: r.get(k) for k in ("name", "c", "c_vs_fp32", "acceptance_rate", "identical")}
                                    for r in rows]
    assert result.mismatches() == []
