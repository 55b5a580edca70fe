"""Offline α replay (fastspec/distill/replay.py): the replayed α, τ, per-position acceptance and
accepted-token counts EQUAL the engine's on the same prompts, to the last accepted token, for
several drafters, causal and T5 targets, EOS- and length-terminated rows in a ragged batch."""
import pytest
import torch

import fastspec
from fastspec.distill.replay import replay, replay_runs
from fastspec.drafters import NgramDrafter, OracleDrafter, PromptLookupDrafter
from fastspec.drafters.feature import FeatureDrafter
from fastspec.errors import UserError
from fastspec.metrics import GenerationMetrics
from test_engine_features import _pad, bigram_llama, one_thread  # noqa: F401 (fixtures)

MAX_NEW = 20
FIELDS = ("num_steps", "row_steps", "beta_sum", "num_draft_tokens", "num_accepted_tokens", "position_hits",
          "position_trials", "acceptance_rate", "mean_accepted_length", "per_position_acceptance")


def _setup(name, bigram_llama, tiny_t5):
    """(target, ids, mask, prompt width in the sequences, eos) with one row ending at EOS early."""
    if name == "llama":
        target, rows, left = bigram_llama, [[11, 12, 13], [30, 31, 32, 33, 34], [50, 51], [7, 60, 61, 62]], True
    else:
        target, rows, left = tiny_t5, [[21603, 10, 8774, 296, 1], [100, 200, 1], [5, 6, 7, 8, 9, 10, 11, 1]], False
    ids, mask = _pad(rows, left)
    width = 1 if name == "t5" else ids.shape[1]
    plain = fastspec.generate(target, None, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=None).sequences
    new = plain[:, width:].tolist()
    # row 1 ends early at EOS; some other row never emits it and runs to the length
    eos = next(t for t in new[1][2:] if t not in new[-1])
    return target, ids, mask, width, eos


def _drafters(name, target, outputs, width):
    vocab = fastspec.introspect.vocab_size(target)
    continuations = [row[width:].tolist() for row in outputs]
    ngram = NgramDrafter(n=3, vocab_size=vocab)
    ngram.table.fit([row for row in continuations])
    shortlist = None if name == "llama" else torch.arange(0, 3000)
    return {
        "prompt_lookup": PromptLookupDrafter(max_n=3),
        "ngram": ngram,
        "oracle_noise": OracleDrafter(continuations, noise=0.3, noise_seed=3),
        "feature": FeatureDrafter.from_target(target, shortlist=shortlist),
    }


def _same(engine, replayed):
    for field in FIELDS:
        assert getattr(replayed, field) == getattr(engine, field), field


@pytest.mark.parametrize("gamma,dynamic", [(4, False), (3, True)])
@pytest.mark.parametrize("name", ["llama", "t5"])
def test_replay_equals_engine(name, gamma, dynamic, bigram_llama, tiny_t5):
    target, ids, mask, width, eos = _setup(name, bigram_llama, tiny_t5)
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, dynamic_gamma=dynamic)
    reference = fastspec.generate(target, None, ids, mask, **kwargs).sequences
    new = reference[:, width:].tolist()
    assert eos in new[1] and any(eos not in row and len(row) == MAX_NEW for row in new)  # both endings
    accepted_somewhere = 0
    for label, drafter in _drafters(name, target, reference, width).items():
        out = fastspec.generate(target, drafter, ids, mask, gamma=gamma, **kwargs)
        assert torch.equal(out.sequences, reference), label
        replayed = replay(target, drafter, out.sequences, ids, mask, gamma=gamma, **kwargs)
        _same(out.metrics, replayed)
        assert replayed.target_calls == 0 and replayed.num_steps > 0
        accepted_somewhere += out.metrics.num_accepted_tokens > 0
    assert accepted_somewhere >= 3  # the equality is not only of zeros


def test_replay_without_target_and_replay_runs(bigram_llama):
    target, ids, mask, width, eos = _setup("llama", bigram_llama, None)
    kwargs = dict(max_new_tokens=MAX_NEW, eos_token_id=eos)
    out = fastspec.generate(target, PromptLookupDrafter(max_n=3), ids, mask, gamma=4, **kwargs)
    _same(out.metrics, replay(None, PromptLookupDrafter(max_n=3), out.sequences, ids, mask, gamma=4, **kwargs))
    # replay_runs: batch-1 engine runs, merged, as `fastspec eval --replay` scores them
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    outputs, engine = [], {"pl": GenerationMetrics(), "oracle": GenerationMetrics()}
    for prompt in prompts:
        single = torch.tensor([prompt])
        plain = fastspec.generate(target, None, single, max_new_tokens=MAX_NEW, eos_token_id=eos).sequences
        outputs.append(plain[0, len(prompt):].tolist())
        if eos in outputs[-1]:
            outputs[-1] = outputs[-1][: outputs[-1].index(eos) + 1]
        for label, drafter in (("pl", PromptLookupDrafter(max_n=3)),
                               ("oracle", OracleDrafter([outputs[-1]], noise=0.3, noise_seed=1))):
            engine[label] += fastspec.generate(target, drafter, single, gamma=4, **kwargs).metrics
    drafters = {"pl": PromptLookupDrafter(max_n=3), "oracle": None}

    class PerRowOracle(OracleDrafter):  # one continuation per batch-1 call, in order
        def __init__(self):
            super().__init__([[0]], noise=0.3, noise_seed=1)
            self.calls = 0

        def begin(self, request):
            self.continuations = [outputs[self.calls]]
            self.calls += 1
            super().begin(request)

    drafters["oracle"] = PerRowOracle()
    merged = replay_runs(target, drafters, prompts, outputs, gamma=4, max_new_tokens=MAX_NEW, eos_token_id=eos)
    for label in engine:
        _same(engine[label], merged[label])


def test_replay_rejects_what_it_cannot_score(bigram_llama):
    target, ids, mask, width, eos = _setup("llama", bigram_llama, None)
    out = fastspec.generate(target, None, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos)
    with pytest.raises(UserError, match="greedy"):
        replay(target, PromptLookupDrafter(), out.sequences, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos,
               do_sample=True)
    with pytest.raises(UserError, match="end before max_new_tokens"):
        replay(target, PromptLookupDrafter(), out.sequences, ids, mask, max_new_tokens=MAX_NEW + 5, eos_token_id=eos)
    with pytest.raises(UserError, match="needs the target"):
        replay(None, FeatureDrafter.from_target(target), out.sequences, ids, mask, max_new_tokens=MAX_NEW,
               eos_token_id=eos)
