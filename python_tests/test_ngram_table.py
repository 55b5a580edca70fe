"""NgramTable (native) against ReferenceNgramTable (pure Python), hand-worked cases, the
file format's failure modes, bad arguments, and the CUDA path (skipped without a GPU)."""
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastspec.ngram import NgramTable, ReferenceNgramTable

fastspec_C = pytest.importorskip("fastspec._C")

HEADER_BYTES = 64
VERSION_OFFSET = 8


def zipf_corpus(vocab, num_seqs, max_len, seed, pad_prob=0.0):
    """Zipf-distributed token sequences (long contexts repeat, rare ones force backoff)."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    seqs = []
    for _ in range(num_seqs):
        length = int(torch.randint(0, max_len + 1, (1,), generator=g))
        seq = torch.multinomial(weights, length, replacement=True, generator=g) if length else torch.zeros(0, dtype=torch.long)
        if pad_prob:
            seq[torch.rand(length, generator=g) < pad_prob] = -1
        seqs.append(seq.tolist())
    return seqs


def contexts(corpus, vocab, batch, length, seed):
    """[B, L] contexts, left padded with -1: half are corpus snippets (long seen contexts),
    half random ids (unseen contexts that must back off)."""
    g = torch.Generator().manual_seed(seed)
    flat = [t for s in corpus for t in s if t >= 0]
    out = torch.full((batch, length), -1, dtype=torch.long)
    for b in range(batch):
        k = int(torch.randint(0, length + 1, (1,), generator=g))
        if b % 2 == 0 and len(flat) > k:
            start = int(torch.randint(0, len(flat) - k, (1,), generator=g))
            row = torch.tensor(flat[start:start + k], dtype=torch.long)
        else:
            row = torch.randint(0, vocab, (k,), generator=g)
        if k:
            out[b, length - k:] = row
    return out


def both(n, vocab, smoothing, corpus):
    return NgramTable(n, vocab, smoothing).fit(corpus), ReferenceNgramTable(n, vocab, smoothing).fit(corpus)


# ---------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [NgramTable, ReferenceNgramTable])
def test_hand_worked_trigram_with_backoff(impl):
    # Corpus 1 2 3 1 2 4, n = 3, V = 5, s = 1.
    t = impl(3, 5, 1.0).fit([[1, 2, 3, 1, 2, 4]])
    # Full context (1, 2) seen twice, followed by 3 and by 4: (1 + 1) / (2 + 5) each, 1/7 else.
    p = t.next_probs(torch.tensor([1, 2]))
    assert torch.equal(p, torch.tensor([1, 1, 1, 2, 2], dtype=torch.float64).div(7).float())
    # Ties go to the smaller id (3), then (2,3) -> 1, (3,1) -> 2, (1,2) -> 3 again.
    assert t.draft(torch.tensor([[1, 2]]), 4).tolist() == [[3, 1, 2, 3]]
    # Trigram context (4, 2) never seen: back off to the bigram context (2) = {3: 1, 4: 1}.
    assert torch.equal(t.next_probs(torch.tensor([4, 2])), p)
    # Token 0 never seen at all: back off to the unigram {1: 2, 2: 2, 3: 1, 4: 1}, total 6.
    assert torch.equal(t.next_probs(torch.tensor([0])),
                       torch.tensor([1, 3, 3, 2, 2], dtype=torch.float64).div(11).float())
    # 4 only ends the corpus (never followed by anything): unigram too, whose argmax is 1.
    assert t.draft(torch.tensor([4]), 1).tolist() == [1]
    assert t.num_entries == 12  # 4 unigrams + 4 bigrams + 4 trigrams


@pytest.mark.parametrize("impl", [NgramTable, ReferenceNgramTable])
def test_unfitted_table_is_uniform_and_drafts_token_zero(impl):
    t = impl(4, 7)
    assert torch.equal(t.next_probs(torch.tensor([[3, 1]])), torch.full((1, 7), 1 / 7))
    assert t.draft(torch.tensor([[3, 1]]), 3).tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("impl", [NgramTable, ReferenceNgramTable])
def test_zero_smoothing_and_padding_breaks(impl):
    # -1 breaks the sequence: no bigram (1, 2); with s = 0 unseen continuations get 0.
    t = impl(2, 4, 0.0).fit([[1, -1, 2, 3]])
    assert t.next_probs(torch.tensor([2])).tolist() == [0, 0, 0, 1]
    # Context (1) is unseen as a context (the -1 cut it): unigram {1, 2, 3} / 3.
    assert torch.equal(t.next_probs(torch.tensor([1])), torch.tensor([0, 1, 1, 1]) / 3)
    # Left padding is ignored; right padding must go through lengths.
    assert torch.equal(t.next_probs(torch.tensor([-1, -1, 2])), t.next_probs(torch.tensor([2])))
    assert t.draft(torch.tensor([[2, 0]]), 1, lengths=torch.tensor([1])).tolist() == [[3]]


def test_unigram_table_ignores_context():
    t = NgramTable(1, 6).fit([[5, 5, 2]])
    assert t.draft(torch.tensor([[1, 2, 3]]), 3).tolist() == [[5, 5, 5]]
    assert t.num_contexts == 1


# ---------------------------------------------------------------------------------------------
# Native == reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [111, 32128, 49152])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_native_equals_reference(vocab, batch, n):
    corpus = zipf_corpus(vocab, num_seqs=12, max_len=150, seed=vocab + n, pad_prob=0.02)
    smoothing = [1.0, 0.5, 0.0][n % 3]
    native, ref = both(n, vocab, smoothing, corpus)
    assert native.num_entries == ref.num_entries
    ctx = contexts(corpus, vocab, batch, length=7, seed=batch * 10 + n)
    assert torch.equal(native.next_probs(ctx), ref.next_probs(ctx))
    gamma = 1 + (vocab + batch + n) % 8
    tokens, probs = native.draft(ctx, gamma, return_probs=True)
    ref_tokens, ref_probs = ref.draft(ctx, gamma, return_probs=True)
    assert tokens.shape == (batch, gamma) and probs.shape == (batch, gamma, vocab)
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(probs, ref_probs)
    assert torch.equal(native.draft(ctx, gamma), tokens)  # the tokens-only path agrees


@pytest.mark.parametrize("gamma", range(1, 9))
def test_draft_tokens_equal_reference_for_every_gamma(gamma):
    corpus = zipf_corpus(111, num_seqs=20, max_len=100, seed=gamma)
    native, ref = both(4, 111, 1.0, corpus)
    ctx = contexts(corpus, 111, batch=8, length=6, seed=gamma)
    assert torch.equal(native.draft(ctx, gamma), ref.draft(ctx, gamma))


def test_lengths_equal_left_padding():
    corpus = zipf_corpus(50, num_seqs=10, max_len=80, seed=3)
    native, ref = both(4, 50, 1.0, corpus)
    left = contexts(corpus, 50, batch=5, length=6, seed=1)
    lengths = (left >= 0).sum(1)
    right = torch.full_like(left, 7)  # junk beyond each row's length is never read
    for b in range(5):
        right[b, : lengths[b]] = left[b, left[b] >= 0]
    for t in (native, ref):
        tok_l, p_l = t.draft(left, 5, return_probs=True)
        tok_r, p_r = t.draft(right, 5, return_probs=True, lengths=lengths)
        assert torch.equal(tok_l, tok_r) and torch.equal(p_l, p_r)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    vocab=st.integers(1, 12),
    smoothing=st.sampled_from([0.0, 0.1, 1.0, 3.0]),
    seqs=st.lists(st.lists(st.integers(-1, 11), max_size=30), max_size=6),
    rows=st.lists(st.lists(st.integers(0, 11), max_size=8), min_size=1, max_size=3),
    gamma=st.integers(1, 6),
    right_padded=st.booleans(),
)
def test_fuzz_native_equals_reference(n, vocab, smoothing, seqs, rows, gamma, right_padded):
    seqs = [[t % vocab if t >= 0 else -1 for t in s] for s in seqs]
    rows = [[t % vocab for t in r] for r in rows]
    width = max(len(r) for r in rows)
    if right_padded:  # ragged rows through lengths, junk after each row's length
        ctx = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows])
    else:  # -1 left padding
        ctx = torch.tensor([[-1] * (width - len(r)) + r for r in rows], dtype=torch.long)
        lengths = None
    native, ref = both(n, vocab, smoothing, seqs)
    assert native.num_entries == ref.num_entries
    tokens, probs = native.draft(ctx, gamma, return_probs=True, lengths=lengths)
    ref_tokens, ref_probs = ref.draft(ctx, gamma, return_probs=True, lengths=lengths)
    assert torch.equal(tokens, ref_tokens) and torch.equal(probs, ref_probs)
    assert torch.equal(native.next_probs(ctx, lengths=lengths), ref.next_probs(ctx, lengths=lengths))


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
def test_fit_list_equals_fit_padded_tensor():
    corpus = zipf_corpus(30, num_seqs=6, max_len=20, seed=5)
    width = max(len(s) for s in corpus)
    padded = torch.full((len(corpus), width), -1, dtype=torch.long)
    for i, s in enumerate(corpus):
        padded[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    a = NgramTable(3, 30).fit(corpus)
    b = NgramTable(3, 30).fit(padded)
    c = NgramTable(3, 30).fit([torch.tensor(s, dtype=torch.long) for s in corpus])
    d = NgramTable(3, 30).fit([np.array(s, dtype=np.int32) for s in corpus])
    e = NgramTable(3, 30).fit(padded.numpy())
    for other in (b, c, d, e):
        assert torch.equal(a._impl.to_bytes(), other._impl.to_bytes())


def test_update_equals_fit_on_concatenation():
    first, second = zipf_corpus(40, 8, 50, seed=1), zipf_corpus(40, 8, 50, seed=2)
    once = NgramTable(4, 40).fit(first + second)
    twice = NgramTable(4, 40).fit(first).update(second)
    assert (once.num_entries, once.num_contexts, once.num_tokens) == \
        (twice.num_entries, twice.num_contexts, twice.num_tokens)
    assert torch.equal(once._impl.to_bytes(), twice._impl.to_bytes())  # files are canonical
    ctx = contexts(first + second, 40, batch=8, length=5, seed=0)
    assert torch.equal(once.draft(ctx, 6, return_probs=True)[1], twice.draft(ctx, 6, return_probs=True)[1])
    assert torch.equal(once.draft(ctx, 6), ReferenceNgramTable(4, 40).fit(first + second).draft(ctx, 6))
    ref = ReferenceNgramTable(4, 40).fit(first).update(second)
    assert ref.counts == ReferenceNgramTable(4, 40).fit(first + second).counts
    # fit resets
    assert NgramTable(4, 40).fit(first).fit(second).num_entries == NgramTable(4, 40).fit(second).num_entries


def test_sizes_are_sane():
    corpus = zipf_corpus(1000, 20, 400, seed=9)
    t = NgramTable(4, 1000).fit(corpus)
    tokens = sum(len(s) for s in corpus)
    assert t.num_tokens == tokens
    assert t.num_entries == ReferenceNgramTable(4, 1000).fit(corpus).num_entries
    assert tokens < t.num_entries <= 4 * tokens
    assert 1 < t.num_contexts <= t.num_entries
    per_entry = t.memory_bytes / t.num_entries
    assert 16 <= per_entry <= 120, per_entry
    empty = NgramTable(4, 1000)
    assert empty.num_entries == 0 and 0 < empty.memory_bytes < 4096


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_table(tmp_path_factory):
    corpus = zipf_corpus(200, 10, 60, seed=4, pad_prob=0.02)
    t = NgramTable(4, 200, 0.5).fit(corpus)
    path = tmp_path_factory.mktemp("ngram") / "table.fsng"
    t.save(path)
    return t, path, path.read_bytes(), corpus


def test_save_load_round_trip(saved_table, tmp_path):
    t, path, data, corpus = saved_table
    u = NgramTable.load(path)
    assert (u.n, u.vocab_size, u.smoothing, u.num_entries) == (4, 200, 0.5, t.num_entries)
    ctx = contexts(corpus, 200, batch=8, length=6, seed=0)
    assert torch.equal(u.draft(ctx, 8), t.draft(ctx, 8))
    assert torch.equal(u.next_probs(ctx), t.next_probs(ctx))
    v = pickle.loads(pickle.dumps(t))
    assert torch.equal(v.draft(ctx, 8), t.draft(ctx, 8))
    u.save(tmp_path / "again.fsng")
    assert (tmp_path / "again.fsng").read_bytes() == data
    # A loaded table keeps counting like the original.
    more = zipf_corpus(200, 4, 60, seed=8)
    grown = NgramTable(4, 200, 0.5).fit(corpus + more)
    assert torch.equal(u.update(more).draft(ctx, 8, return_probs=True)[1], grown.draft(ctx, 8, return_probs=True)[1])
    assert u.num_entries == grown.num_entries


def test_public_names():
    import fastspec

    assert fastspec.NgramTable is NgramTable
    assert fastspec.ops.NgramTable is NgramTable and fastspec.ops.ReferenceNgramTable is ReferenceNgramTable


def _load_bytes(tmp_path, data):
    p = tmp_path / "bad.fsng"
    p.write_bytes(bytes(data))
    return NgramTable.load(p)


def test_bad_files_raise_clear_errors(saved_table, tmp_path):
    _, _, data, _ = saved_table
    with pytest.raises(ValueError, match="empty"):
        _load_bytes(tmp_path, b"")
    with pytest.raises(ValueError, match="truncated"):
        _load_bytes(tmp_path, data[:40])
    with pytest.raises(ValueError, match="truncated"):
        _load_bytes(tmp_path, data[:-1])
    with pytest.raises(ValueError, match="trailing"):
        _load_bytes(tmp_path, data + b"\0")
    with pytest.raises(ValueError, match="magic"):
        _load_bytes(tmp_path, b"PK\x03\x04" + bytes(100))  # a zip file, say
    wrong_version = bytearray(data)
    wrong_version[VERSION_OFFSET] = 2
    with pytest.raises(ValueError, match="version 2"):
        _load_bytes(tmp_path, wrong_version)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(ValueError, match="corrupted"):
        _load_bytes(tmp_path, flipped)
    with pytest.raises(ValueError, match="cannot open"):
        NgramTable.load(tmp_path / "missing.fsng")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corrupted_files_never_crash(saved_table, tmp_path, data):
    _, _, good, _ = saved_table
    bad = bytearray(good)
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage", "overwrite_header"]))
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(bad) - 1), min_size=1, max_size=4)):
            bad[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        bad = bad[: data.draw(st.integers(0, len(bad) - 1))]
    elif kind == "garbage":
        bad = bytearray(data.draw(st.binary(max_size=300)))
    else:
        pos = data.draw(st.integers(8, HEADER_BYTES - 1))
        bad[pos:pos + 8] = data.draw(st.binary(min_size=8, max_size=8))
    if bytes(bad) == good:
        return
    with pytest.raises(ValueError):
        _load_bytes(tmp_path, bad)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [NgramTable, ReferenceNgramTable])
@pytest.mark.parametrize("args", [(0, 10), (17, 10), (2.5, 10), (3, 0), (3, 10, -1.0), (3, 10, float("nan")),
                                  (3, 10, float("inf"))])
def test_bad_constructor_args(impl, args):
    with pytest.raises(ValueError):
        impl(*args)


@pytest.mark.parametrize("impl", [NgramTable, ReferenceNgramTable])
def test_bad_inputs_raise_and_leave_table_unchanged(impl):
    t = impl(3, 10).fit([[1, 2, 3]])
    before = t.num_entries
    for seqs in ([[1, 10]], [[1, -2]], [[0, 1], [1, 99]], torch.zeros(2, 2, 2, dtype=torch.long),
                 [[0.5, 1.0]], torch.zeros(2, 3), "abc", [[1, "a"]]):
        with pytest.raises(ValueError):
            t.update(seqs)
        with pytest.raises(ValueError):
            t.fit(seqs)
    assert t.num_entries == before
    ok = torch.tensor([[1, 2]])
    for ctx in (torch.tensor([[10]]), torch.tensor([[-2, 1]]), torch.tensor([[1, -1]]),
                torch.zeros(1, 1, 1, dtype=torch.long), torch.zeros(1, 2), torch.tensor(3)):
        with pytest.raises(ValueError):
            t.draft(ctx, 2)
        with pytest.raises(ValueError):
            t.next_probs(ctx)
    for gamma in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            t.draft(ok, gamma)
    for lengths in (torch.tensor([3]), torch.tensor([-1]), torch.tensor([1, 1]), torch.tensor([[1]])):
        with pytest.raises(ValueError):
            t.draft(ok, 2, lengths=lengths)
    with pytest.raises(ValueError):  # -1 inside a row's length
        t.draft(torch.tensor([[1, -1]]), 2, lengths=torch.tensor([2]))


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; covered by the CUDA tests")
    t = NgramTable(2, 5).fit([[1, 2]])
    with pytest.raises((RuntimeError, ValueError)):
        t.to("cuda")


# ---------------------------------------------------------------------------------------------
# CUDA (the lead runs these where a GPU is lent)
# ---------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and getattr(fastspec_C, "with_cuda", False)),
    reason="needs a GPU and a CUDA build of fastspec._C",
)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("vocab", [111, 32128, 49152])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("n", [1, 3, 5, 16])
def test_cuda_equals_cpu(vocab, batch, n):
    corpus = zipf_corpus(vocab, num_seqs=12, max_len=150, seed=vocab + n, pad_prob=0.02)
    t = NgramTable(n, vocab, 0.5).fit(corpus).to("cuda")
    assert t.device_memory_bytes > 0
    ctx = contexts(corpus, vocab, batch, length=9, seed=batch + n)
    for gamma in (1, 5, 8):
        tokens, probs = t.draft(ctx, gamma, return_probs=True)
        gpu_tokens, gpu_probs = t.draft(ctx.cuda(), gamma, return_probs=True)
        assert gpu_tokens.is_cuda and gpu_probs.is_cuda
        assert torch.equal(gpu_tokens.cpu(), tokens)
        assert torch.equal(gpu_probs.cpu(), probs)
        assert torch.equal(t.draft(ctx.cuda(), gamma).cpu(), tokens)
    assert torch.equal(t.next_probs(ctx.cuda()).cpu(), t.next_probs(ctx))
    lengths = (ctx >= 0).sum(1)
    right = torch.zeros_like(ctx)
    for b in range(batch):
        right[b, : lengths[b]] = ctx[b, ctx[b] >= 0]
    assert torch.equal(t.draft(right.cuda(), 4, lengths=lengths.cuda()).cpu(), t.draft(ctx, 4))


@pytest.mark.cuda
@needs_cuda
def test_cuda_copy_refreshes_after_update_and_checks_ids():
    t = NgramTable(2, 6).fit([[1, 2]]).to("cuda")
    ctx = torch.tensor([[1]], device="cuda")
    assert t.draft(ctx, 1).tolist() == [[2]]
    t.update([[1, 3, 1, 3]])  # now 1 -> 3 twice, 1 -> 2 once
    assert t.draft(ctx, 1).tolist() == [[3]]
    with pytest.raises(ValueError):
        t.draft(torch.tensor([[6]], device="cuda"), 1)
    with pytest.raises(ValueError):
        t.draft(torch.tensor([[1, -1]], device="cuda"), 1)
    with pytest.raises(ValueError):
        t.draft(ctx, 1, lengths=torch.tensor([1]))  # lengths on the wrong device
