"""Drafter benchmarks (pytest-benchmark): the C++ drafter runtime vs its Python reference loop,
and each drafter's cost per step against a target forward (c).

* ``test_runtime_vs_python[...]``: one γ=5 greedy draft call, native (one call for all γ steps)
  vs the Python twin (a Python loop over steps: the same ATen ops for CNN/LSTM, pure Python for
  prompt lookup, the dict-based ReferenceNgramTable for the n-gram), timed interleaved
  (A, B, A, B ...); the ratio is the median of per-round ratios after a warm-up round.
  - prompt lookup: aclsum test abstracts tokenized with the real T5 tokenizer as sources (seq2seq:
    the encoder input is searched), the first 24 tokens of each reference as generated text.
  - CNN (3 causal conv layers, k=4, dim 256) and LSTM (1 layer, 256) at vocab 32128 (T5) and
    49152 (SmolLM2), embeddings 768 / 576 wide projected to 256.
  - n-gram: n=4 on the aclsum train references, contexts from the test references.
* ``test_cost_per_step_*``: per drafter (the CNN and LSTM with a full head and with an 8192-id
  shortlisted head), the time of one drafter.draft(γ=5) call divided by γ,
  and c = that / the time of one single-token cached target forward, for a FLAN-T5-base-shaped
  target (random weights, 12+12 layers, d_model 768, vocab 32128) with a 128-token source, and
  for the real SmolLM2-135M-Instruct with an aclsum chat prompt.

Run:   OMP_NUM_THREADS=1 python -m pytest bench/bench_drafters.py -s --benchmark-only
Knobs: FASTSPEC_BENCH_ROUNDS (default 15), FASTSPEC_MACHINE (written beside the tables),
FASTSPEC_BENCH_SHORTLIST (rows of the shortlisted CNN/LSTM heads and layer-skip exit, default 8192).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from shapes import FLAN_T5_BASE, t5_shaped

from fastspec import introspect, ops

ROUNDS = int(os.environ.get("FASTSPEC_BENCH_ROUNDS", "15"))
GAMMA = 5
MACHINE = os.environ.get("FASTSPEC_MACHINE", "2-core CPU, no GPU")

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="fastspec._C not built")


def _interleaved(fns, rounds=ROUNDS):
    """{name: fn} -> {name: [seconds per round]}, round-robin after one warm-up round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _ratio(times, slow, fast):
    return statistics.median(s / f for s, f in zip(times[slow], times[fast]))


RESULTS = []


def _print_table():
    lines = [f"machine: {MACHINE}; torch threads: {torch.get_num_threads()}; γ = {GAMMA}",
             "| drafter | case | native μs / call | Python μs / call | speedup |", "|---|---|---|---|---|"]
    for row in RESULTS:
        lines.append("| {drafter} | {case} | {native:.0f} | {python:.0f} | {speedup:.1f}× |".format(**row))
    print("\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def t5_data():
    from fastspec.data import load_examples
    from fastspec.targets import load_t5_tokenizer

    tok = load_t5_tokenizer()
    test = load_examples("aclsum", split="test", limit=16)
    train = load_examples("aclsum", split="train")
    sources = tok([e.source for e in test])["input_ids"]
    refs = tok([e.reference for e in test], add_special_tokens=False)["input_ids"]
    train_refs = tok([e.reference for e in train], add_special_tokens=False)["input_ids"]
    return sources, refs, train_refs


def _padded(rows):
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r)
    return out, torch.tensor([len(r) for r in rows])


def _record(benchmark, drafter, case, fns):
    times = {}

    def one():
        times.update(_interleaved(fns))

    benchmark.pedantic(one, rounds=1, iterations=1)
    row = dict(drafter=drafter, case=case, native=statistics.median(times["native"]) * 1e6,
               python=statistics.median(times["python"]) * 1e6, speedup=_ratio(times, "python", "native"))
    RESULTS.append(row)
    benchmark.extra_info.update(row)
    _print_table()
    return row


@pytest.mark.parametrize("batch", [1, 8])
def test_runtime_vs_python_prompt_lookup(benchmark, t5_data, batch):
    from fastspec.drafters.prompt_lookup import prompt_lookup_reference

    sources, refs, _ = t5_data
    src_rows, gen_rows = sources[:batch], [r[:24] for r in refs[:batch]]
    src, slen = _padded(src_rows)
    gen, glen = _padded(gen_rows)
    fns = {
        "native": lambda: torch.ops.fastspec.prompt_lookup_draft(src, slen, gen, glen, GAMMA, 4, 1, False),
        "python": lambda: prompt_lookup_reference(src_rows, gen_rows, GAMMA, 4, 1, False),
    }
    assert torch.equal(fns["native"]()[0], fns["python"]()[0])
    _record(benchmark, "prompt lookup", f"B={batch}, source ≈ {int(slen.float().mean())} tokens", fns)


@pytest.mark.parametrize("batch", [1, 8])
def test_runtime_vs_python_ngram(benchmark, t5_data, batch):
    from fastspec.ngram import NgramTable, ReferenceNgramTable

    _, refs, train_refs = t5_data
    native, python = NgramTable(4, 32128), ReferenceNgramTable(4, 32128)
    native.fit(train_refs)
    python.fit(train_refs)
    context, _ = _padded([r[:24] for r in refs[:batch]])
    context = torch.where(context < 0, -1, context)
    # left-pad (the table's convention)
    context = torch.stack([torch.cat([row[row < 0], row[row >= 0]]) for row in context])
    fns = {"native": lambda: native.draft(context, GAMMA), "python": lambda: python.draft(context, GAMMA)}
    assert torch.equal(fns["native"](), fns["python"]())
    _record(benchmark, "n-gram (n=4)", f"B={batch}, V=32128", fns)


@pytest.mark.parametrize("vocab,embed", [(32128, 768), (49152, 576)])
@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_runtime_vs_python_neural(benchmark, kind, vocab, embed):
    from fastspec.drafters.cnn import CausalConvLM, cnn_draft_native, cnn_draft_reference
    from fastspec.drafters.lstm import LSTMLM, lstm_draft_native, lstm_draft_reference

    torch.manual_seed(0)
    batch = 1
    with torch.no_grad():
        if kind == "cnn":
            model = CausalConvLM(vocab, embed, dim=256, num_layers=3, kernel_size=4).eval()
            window = torch.randint(0, vocab, (batch, model.receptive_field))
            bias = torch.randn(batch, 256)
            fns = {"native": lambda: cnn_draft_native(model, window, bias, GAMMA),
                   "python": lambda: cnn_draft_reference(model, window, bias, GAMMA)}
        else:
            model = LSTMLM(vocab, embed, dim=256, hidden_size=256, num_layers=1).eval()
            last = torch.randint(0, vocab, (batch,))
            h = torch.randn(1, batch, 256)
            fns = {"native": lambda: lstm_draft_native(model, last, h, h, GAMMA),
                   "python": lambda: lstm_draft_reference(model, last, h, h, GAMMA)}
        assert torch.equal(fns["native"]()[0], fns["python"]()[0])
        _record(benchmark, kind.upper(), f"B={batch}, V={vocab}, dim 256", fns)


@pytest.mark.parametrize("vocab", [1000])
@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_runtime_vs_python_neural_small_head(benchmark, kind, vocab):
    """Where the per-step Python overhead, not the vocab head, dominates (small V, dim 64)."""
    from fastspec.drafters.cnn import CausalConvLM, cnn_draft_native, cnn_draft_reference
    from fastspec.drafters.lstm import LSTMLM, lstm_draft_native, lstm_draft_reference

    torch.manual_seed(0)
    with torch.no_grad():
        if kind == "cnn":
            model = CausalConvLM(vocab, 64, dim=64, num_layers=3, kernel_size=4).eval()
            window = torch.randint(0, vocab, (1, model.receptive_field))
            bias = torch.randn(1, 64)
            fns = {"native": lambda: cnn_draft_native(model, window, bias, GAMMA),
                   "python": lambda: cnn_draft_reference(model, window, bias, GAMMA)}
        else:
            model = LSTMLM(vocab, 64, dim=64, hidden_size=64, num_layers=2).eval()
            last = torch.randint(0, vocab, (1,))
            h = torch.randn(2, 1, 64)
            fns = {"native": lambda: lstm_draft_native(model, last, h, h, GAMMA),
                   "python": lambda: lstm_draft_reference(model, last, h, h, GAMMA)}
        _record(benchmark, kind.upper(), f"B=1, V={vocab}, dim 64 (overhead-bound)", fns)


# ---------------------------------------------------------------------------------------------
# cost per step and c on a FLAN-T5-base-shaped target
# ---------------------------------------------------------------------------------------------
def _cost_table(benchmark, label, target_step, drafters, request, step):
    """Interleave target steps and draft calls; print μs per drafted token and c per drafter."""
    for d in drafters.values():
        d.begin(request)
    fns = {"target": target_step}
    fns.update({name: (lambda d=d: d.draft(step)) for name, d in drafters.items()})
    times = {}
    benchmark.pedantic(lambda: times.update(_interleaved(fns, rounds=max(ROUNDS // 3, 5))), rounds=1, iterations=1)
    target_s = statistics.median(times["target"])
    lines = [f"machine: {MACHINE}; {label}, one cached single-token target forward = {target_s * 1e3:.1f} ms",
             "| drafter | μs per drafted token (γ=5 call / 5) | c |", "|---|---|---|"]
    for name in drafters:
        per_token = statistics.median(times[name]) / GAMMA
        c = statistics.median(d / GAMMA / t for d, t in zip(times[name], times["target"]))
        lines.append(f"| {name} | {per_token * 1e6:.0f} | {c:.4f} |")
        benchmark.extra_info[name] = {"us_per_token": per_token * 1e6, "c": c}
    print("\n" + "\n".join(lines))


def _step(generated):
    from fastspec.drafters.base import DraftStep

    return DraftStep(generated=generated, num_generated=torch.tensor([generated.shape[1]]),
                     active=torch.ones(1, dtype=torch.bool), gamma=GAMMA)


SHORTLIST = int(os.environ.get("FASTSPEC_BENCH_SHORTLIST", "8192"))  # default: fastspec train's CNN/LSTM head


def _shortlist(train_refs, vocab: int, size: int = SHORTLIST) -> torch.Tensor:
    """[size] target ids: the references' labels by frequency (build_shortlist), then the lowest
    unused ids, so the head has exactly ``size`` rows whatever the corpus (its cost is what counts)."""
    from fastspec.distill.feature_data import build_shortlist

    counts = torch.bincount(torch.tensor([t for r in train_refs for t in r]), minlength=vocab)[:vocab]
    ids = build_shortlist(counts, size)
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[ids] = False
    return torch.cat([ids, rest.nonzero().flatten()[: size - ids.numel()]])


def _drafter_lineup(target, train_refs, layer_skip_layers: int, total_layers: int) -> dict:
    """The drafters whose cost per step the benchmarks compare, built for ``target``; the CNN and
    LSTM with a full head and with a shortlisted head of SHORTLIST rows."""
    from fastspec import drafters as fd

    vocab = introspect.vocab_size(target)
    ngram = fd.NgramDrafter.create(4, vocab, start_token_id=introspect.decoder_start_token_id(target)).fit(train_refs)
    shortlist = _shortlist(train_refs, vocab)
    return {
        "prompt lookup": fd.PromptLookupDrafter(),
        "prompt lookup + n-gram": fd.PromptLookupDrafter(fallback=ngram),
        "n-gram (n=4)": ngram,
        "CNN (dim 256)": fd.CNNDrafter.from_target(target, dim=256, num_layers=3, kernel_size=4),
        f"CNN (dim 256, shortlist {SHORTLIST})": fd.CNNDrafter.from_target(target, dim=256, num_layers=3, kernel_size=4,
                                                                          shortlist=shortlist),
        "LSTM (256)": fd.LSTMDrafter.from_target(target, dim=256, hidden_size=256),
        f"LSTM (256, shortlist {SHORTLIST})": fd.LSTMDrafter.from_target(target, dim=256, hidden_size=256,
                                                                        shortlist=shortlist),
        f"layer skip ({layer_skip_layers} of {total_layers} layers)": fd.LayerSkipDrafter(target, layer_skip_layers),
        f"layer skip ({layer_skip_layers} of {total_layers}, exit shortlist {SHORTLIST})":
            _shortlisted_layer_skip(target, layer_skip_layers, shortlist),
    }


def _shortlisted_layer_skip(target, num_layers: int, shortlist: torch.Tensor):
    """The layer-skip drafter ``fastspec train --drafter layer_skip`` makes: a trainable exit over the shortlist."""
    from fastspec.drafters import LayerSkipDrafter
    from fastspec.drafters.layer_skip import attach_exit_head, truncated_view

    view = truncated_view(target, num_layers)
    return LayerSkipDrafter(target, num_layers, view=view, exit_head=attach_exit_head(view, shortlist=shortlist))


def test_cost_per_step_flan_t5_base_shaped(benchmark, t5_data):
    from fastspec.cache import new_cache
    from fastspec.drafters.base import DraftRequest

    sources, refs, train_refs = t5_data
    target = t5_shaped(**FLAN_T5_BASE)
    src = torch.tensor([sources[0][:128]])
    mask = torch.ones_like(src)
    generated = torch.tensor([refs[0][:24]])
    with torch.no_grad():
        encoder_outputs = target.get_encoder()(input_ids=src, attention_mask=mask)
        cache = new_cache(target)
        target(decoder_input_ids=torch.cat([torch.zeros(1, 1, dtype=torch.long), generated], 1),
               encoder_outputs=encoder_outputs, attention_mask=mask, past_key_values=cache, use_cache=True)

    def target_step():
        with torch.no_grad():
            target(decoder_input_ids=generated[:, -1:], encoder_outputs=encoder_outputs, attention_mask=mask,
                   past_key_values=cache, use_cache=True)
        cache.crop(-1)

    drafters = _drafter_lineup(target, train_refs, layer_skip_layers=1, total_layers=12)
    request = DraftRequest(source_ids=src, source_mask=mask, is_encoder_decoder=True,
                           vocab_size=introspect.vocab_size(target), decoder_start_token_id=0)
    _cost_table(benchmark, "FLAN-T5-base-shaped target (random weights)", target_step, drafters, request,
                _step(generated))


def test_cost_per_step_smollm2(benchmark):
    from fastspec.cache import new_cache
    from fastspec.data import load_examples
    from fastspec.drafters.base import DraftRequest
    from fastspec.targets import load_smollm2

    target, tok = load_smollm2()
    test = load_examples("aclsum", split="test", limit=1)
    train_refs = tok([e.reference for e in load_examples("aclsum", split="train")])["input_ids"]
    messages = [{"role": "user", "content": "Summarize:\n" + test[0].source}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    src = prompt["input_ids"]
    mask = torch.ones_like(src)
    generated = torch.tensor([tok(test[0].reference)["input_ids"][:24]])
    full = torch.cat([src, generated], 1)
    with torch.no_grad():
        cache = new_cache(target)
        target(input_ids=full[:, :-1], past_key_values=cache, use_cache=True)

    def target_step():
        with torch.no_grad():
            target(input_ids=full[:, -1:], past_key_values=cache, use_cache=True)
        cache.crop(-1)

    drafters = _drafter_lineup(target, train_refs, layer_skip_layers=2, total_layers=30)
    request = DraftRequest(source_ids=src, source_mask=mask, is_encoder_decoder=False,
                           vocab_size=introspect.vocab_size(target))
    _cost_table(benchmark, f"SmolLM2-135M-Instruct (prompt {src.shape[1]} tokens)", target_step, drafters, request,
                _step(generated))
