"""Greedy losslessness of fastspec.generate: token for token equal to HF greedy decoding of each
row alone, for a FLAN-T5-architecture target (real T5 tokenizer ids, right padding) and a Llama
target (left padding), with random / oracle / noisy-oracle / γ-bounded drafters, batch 1, 3, 8,
γ 1..8, with and without EOS."""
import copy

import pytest
import torch

import fastspec
from fastspec.drafters import OracleDrafter, RandomDrafter

MAX_NEW = 24
ROW_SUBSETS = {1: [2], 3: [0, 3, 6], 8: list(range(8))}


def _row_alone(ids, mask, row):
    real = mask[row].bool()
    return ids[row][real][None], torch.ones(1, int(real.sum()), dtype=torch.long)


def _hf_greedy_rows(model, ids, mask, eos):
    """HF greedy continuation (generated tokens only, cut after EOS) of every row decoded alone."""
    out = []
    for row in range(ids.shape[0]):
        row_ids, row_mask = _row_alone(ids, mask, row)
        seq = model.generate(
            input_ids=row_ids, attention_mask=row_mask, do_sample=False, max_new_tokens=MAX_NEW,
            eos_token_id=eos, pad_token_id=0,
        )[0]
        new = seq[1:] if model.config.is_encoder_decoder else seq[row_ids.shape[1]:]
        new = new.tolist()
        if eos in new:
            new = new[: new.index(eos) + 1]
        out.append(new)
    return out


@pytest.fixture(scope="module")
def targets(tiny_t5, tiny_llama, t5_inputs, llama_inputs):
    """name -> (model, ids, mask, {eos: per-row HF references}) with one EOS that never occurs and
    one the model really emits mid-sequence (some rows stop early, some run to max_new_tokens)."""
    result = {}
    for name, model, (ids, mask), never in (
        ("t5", tiny_t5, t5_inputs, 1),
        ("llama", tiny_llama, llama_inputs, 2),
    ):
        refs = {"none": (never, _hf_greedy_rows(model, ids, mask, never))}
        assert all(len(r) == MAX_NEW for r in refs["none"][1]), "the 'no EOS' token was emitted"
        counts = {}
        for r in refs["none"][1]:
            for t in set(r[2:MAX_NEW - 2]):
                counts[t] = counts.get(t, 0) + 1
        eos = max(sorted(counts), key=lambda t: (counts[t] if counts[t] < ids.shape[0] else -1))
        refs["eos"] = (eos, _hf_greedy_rows(model, ids, mask, eos))
        lengths = [len(r) for r in refs["eos"][1]]
        assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, lengths
        result[name] = (model, ids, mask, refs)
    return result


def _make_drafter(kind, refs, rows, vocab):
    conts = [refs[r] for r in rows]
    if kind == "random":
        return RandomDrafter(seed=3)
    if kind == "oracle":
        return OracleDrafter(conts)
    if kind == "noisy":
        return OracleDrafter(conts, noise=0.3, noise_seed=11)
    if kind == "bounded":
        return OracleDrafter(conts, max_correct=2)
    raise AssertionError(kind)


def _check_rows(model, out, ids, mask, refs, rows, pad):
    seqs = out.sequences
    assert seqs.shape[0] == len(rows)
    if model.config.is_encoder_decoder:
        assert bool((seqs[:, 0] == model.config.decoder_start_token_id).all())
        new = seqs[:, 1:]
    else:
        assert torch.equal(seqs[:, : ids.shape[1]], ids[rows])  # causal output includes the prompt
        new = seqs[:, ids.shape[1]:]
    assert new.shape[1] == max(len(refs[r]) for r in rows)
    for i, row in enumerate(rows):
        ref = refs[row]
        assert new[i, : len(ref)].tolist() == ref, f"row {row}"
        assert bool((new[i, len(ref):] == pad).all())


def _run(targets, name, kind, batch, gamma, eos_case, **kw):
    model, ids, mask, refs_by = targets[name]
    eos, refs = refs_by[eos_case]
    rows = ROW_SUBSETS[batch]
    drafter = None if kind == "ar" else _make_drafter(kind, refs, rows, model.config.vocab_size)
    out = fastspec.generate(
        model, drafter, ids[rows], mask[rows], gamma=gamma, max_new_tokens=MAX_NEW, eos_token_id=eos,
        pad_token_id=0, **kw,
    )
    _check_rows(model, out, ids, mask, refs, rows, pad=0)
    return out


@pytest.mark.parametrize("name", ["t5", "llama"])
@pytest.mark.parametrize("kind", ["ar", "random", "oracle", "noisy", "bounded"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_greedy_lossless_drafters_batches(targets, name, kind, batch):
    out = _run(targets, name, kind, batch, 3, "eos")
    m = out.metrics
    if kind == "oracle":
        assert m.acceptance_rate == pytest.approx(1.0, abs=0.15)  # only the EOS-cut tail can miss
    if kind == "ar":
        assert m.num_draft_tokens == 0 and m.target_calls >= MAX_NEW // 2


@pytest.mark.parametrize("name", ["t5", "llama"])
@pytest.mark.parametrize("gamma", range(1, 9))
def test_greedy_lossless_every_gamma_ragged(targets, name, gamma):
    out = _run(targets, name, "noisy", 8, gamma, "none")
    m = out.metrics
    assert len(m.per_position_acceptance) == gamma
    assert 0.0 < m.acceptance_rate < 1.0  # ragged: some rows reject, some accept
    assert m.num_steps < MAX_NEW  # speculation saved target calls


@pytest.mark.parametrize("name", ["t5", "llama"])
@pytest.mark.parametrize("kind", ["oracle", "random"])
@pytest.mark.parametrize("gamma", [1, 5, 8])
def test_greedy_lossless_with_eos(targets, name, kind, gamma):
    _run(targets, name, kind, 8, gamma, "eos")


@pytest.mark.parametrize("name", ["t5", "llama"])
def test_dynamic_gamma_lossless(targets, name):
    out = _run(targets, name, "noisy", 8, 4, "eos", dynamic_gamma=True, min_gamma=1, max_gamma=8)
    assert 1 <= out.metrics.gamma <= 8


def test_batched_equals_hf_batched_generate(targets):
    """sequences have HF generate()'s exact layout (T5: right padding; Llama: left padding)."""
    for name in ("t5", "llama"):
        model, ids, mask, refs_by = targets[name]
        eos, refs = refs_by["eos"]
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                            eos_token_id=eos, pad_token_id=0)
        ours = fastspec.generate(model, OracleDrafter([refs[r] for r in range(8)], noise=0.2), ids, mask,
                                 gamma=4, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(ours.sequences, hf), name


def test_causal_right_padding_equals_rows_alone(targets):
    model, ids, mask, refs_by = targets["llama"]
    eos, refs = refs_by["eos"]
    lengths = mask.sum(-1)
    right_ids = torch.zeros_like(ids)
    right_mask = torch.zeros_like(mask)
    for row in range(ids.shape[0]):
        right_ids[row, : lengths[row]] = ids[row][mask[row].bool()]
        right_mask[row, : lengths[row]] = 1
    out = fastspec.generate(model, OracleDrafter(refs, noise=0.3), right_ids, right_mask, gamma=3,
                            max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)
    new = out.sequences[:, ids.shape[1]:]
    for row in range(ids.shape[0]):
        assert new[row, : len(refs[row])].tolist() == refs[row]


def test_max_new_tokens_and_min_new_tokens(targets):
    for name in ("t5", "llama"):
        model, ids, mask, refs_by = targets[name]
        eos, refs = refs_by["eos"]
        # max_new_tokens cuts inside an accepted block
        out = fastspec.generate(model, OracleDrafter(refs), ids, mask, gamma=8, max_new_tokens=5,
                                eos_token_id=eos, pad_token_id=0)
        hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5,
                            eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out.sequences, hf), name
        # min_new_tokens: EOS forbidden until 10 tokens, compared with HF row by row
        rows = [r for r in range(8) if len(refs[r]) < 10] or [0]
        for row in rows:
            row_ids, row_mask = _row_alone(ids, mask, row)
            hf = model.generate(input_ids=row_ids, attention_mask=row_mask, do_sample=False, max_new_tokens=16,
                                min_new_tokens=10, eos_token_id=eos, pad_token_id=0)
            ours = fastspec.generate(model, RandomDrafter(seed=1), row_ids, row_mask, gamma=4, max_new_tokens=16,
                                     min_new_tokens=10, eos_token_id=eos, pad_token_id=0)
            assert torch.equal(ours.sequences, hf), (name, row)


@pytest.mark.parametrize("name", ["t5", "llama", "tiny_vocab"])
def test_greedy_repetition_penalty_equals_hf(targets, tiny_vocab_llama, name):
    """The penalty sees the row's previous tokens (causal: prompt included, as HF)."""
    if name == "tiny_vocab":  # V = 12: repeats are certain, so the penalty bites
        model, eos = tiny_vocab_llama, 2
        ids = torch.randint(3, 12, (3, 6), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
    else:
        model, ids, mask, refs_by = targets[name]
        eos, _ = refs_by["eos"]
    changed = 0
    for row in (0, 1, 2):
        row_ids, row_mask = _row_alone(ids, mask, row)
        kwargs = dict(do_sample=False, max_new_tokens=16, repetition_penalty=4.0, eos_token_id=eos, pad_token_id=0)
        hf = model.generate(input_ids=row_ids, attention_mask=row_mask, **kwargs)
        plain = model.generate(input_ids=row_ids, attention_mask=row_mask, **{**kwargs, "repetition_penalty": 1.0})
        new = hf[0, 1:] if name == "t5" else hf[0, row_ids.shape[1]:]
        oracle = OracleDrafter([[t for t in new.tolist()]], noise=0.3)
        ours = fastspec.generate(model, oracle, row_ids, row_mask, gamma=4, **kwargs)
        assert torch.equal(ours.sequences, hf), row
        ours_ar = fastspec.generate(model, None, row_ids, row_mask, **kwargs)
        assert torch.equal(ours_ar.sequences, hf), row
        changed += int(not torch.equal(plain, hf))
    if name != "llama":  # the V=3001 Llama never repeats a token, so there the penalty is a no-op
        assert changed > 0  # the penalty really changed some outputs


def test_cache_after_rejection_matches_fresh_forward(targets, monkeypatch):
    """At every step, the logits at each row's last committed token (read from the cropped,
    ragged cache + pending tokens) equal a fresh full forward over that row's prefix."""
    from fastspec.engine.session import TargetSession

    records = []
    original = TargetSession.forward

    def spy(self, seq, seq_len, num_positions):
        logits = original(self, seq, seq_len, num_positions)
        records.append((self.rows.clone(), seq_len.clone(), logits[:, 0].clone()))
        return logits

    monkeypatch.setattr(TargetSession, "forward", spy)
    for name in ("t5", "llama"):
        model, ids, mask, refs_by = targets[name]
        eos, refs = refs_by["none"]
        records.clear()
        out = fastspec.generate(model, OracleDrafter(refs, noise=0.35, noise_seed=5), ids, mask, gamma=4,
                                max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0)
        m = out.metrics
        assert 0 < m.acceptance_rate < 1
        checked = 0
        for rows, prefix_len, logits in records:
            for i, row in enumerate(rows.tolist()):
                n = int(prefix_len[i])
                with torch.no_grad():
                    if name == "t5":
                        dec = torch.tensor([[0] + refs[row]])[:, :n]
                        fresh = model(input_ids=ids[row:row + 1][:, mask[row].bool()], decoder_input_ids=dec).logits
                    else:
                        real = torch.cat([ids[row][mask[row].bool()], torch.tensor(refs[row])])[:n]
                        fresh = model(input_ids=real[None]).logits
                # DESIGN: 1e-4 up to float rounding; these spread-out models have logits ~±30, so the
                # absolute tolerance scales with the logits' magnitude (a wrong cache is off by O(1)).
                scale = max(1.0, float(fresh[0, -1].abs().max()))
                torch.testing.assert_close(logits[i], fresh[0, -1], rtol=1e-4, atol=1e-4 * scale)
                assert int(logits[i].argmax()) == int(fresh[0, -1].argmax())
                checked += 1
        assert checked > 8 * 3


@pytest.mark.parametrize("compact_min_holes", [0, 10_000])
def test_ragged_cache_keeps_every_committed_token_and_compacts(targets, monkeypatch, compact_min_holes):
    """Causal batch with ragged acceptance: every row keeps the KV of all its committed tokens but
    the newest (holes where it accepted less), so after the first block nothing is re-fed and the
    block is γ + 1 wide; compacting the holes (at every step at 0, never at 10 000) keeps outputs equal."""
    from fastspec.engine import session as session_module
    from fastspec.engine.session import TargetSession

    monkeypatch.setattr(TargetSession, "COMPACT_MIN_HOLES", compact_min_holes)
    monkeypatch.setattr(TargetSession, "COMPACT_HOLE_FRACTION", 0.0 if compact_min_holes == 0 else 1.0)
    seen = dict(holes=0, compactions=0, widths=[])
    gather = session_module.gather_cache_columns

    def spy_gather(cache, columns):
        seen["compactions"] += 1
        gather(cache, columns)

    monkeypatch.setattr(session_module, "gather_cache_columns", spy_gather)
    forward, advance = TargetSession.forward, TargetSession.advance

    def spy_forward(self, seq, seq_len, num_positions):
        seen["widths"].append(int((seq_len - 1 - self.cached).max()) + num_positions)
        return forward(self, seq, seq_len, num_positions)

    def spy_advance(self, seq_len):
        advance(self, seq_len)
        assert self.ragged and torch.equal(self.cached, seq_len - 1)
        assert self.kv_mask.shape == (seq_len.shape[0], self.length)
        assert torch.equal(self.kv_mask.sum(-1), self.cached)
        seen["holes"] = max(seen["holes"], self.length - int(self.cached.max()))

    monkeypatch.setattr(TargetSession, "forward", spy_forward)
    monkeypatch.setattr(TargetSession, "advance", spy_advance)
    out = _run(targets, "llama", "noisy", 8, 4, "none")
    assert 0 < out.metrics.acceptance_rate < 1
    assert seen["widths"][1:] and max(seen["widths"][1:]) <= 5  # [last, 4 drafts]: no pending re-fed
    if compact_min_holes:
        assert seen["holes"] > 0  # rows really diverged in length
    else:
        assert seen["compactions"] > 0


def test_seq2seq_cache_stays_rectangular(targets, monkeypatch):
    """T5's relative position bias reads cache columns, so its rows never get holes."""
    from fastspec.engine.session import TargetSession

    advance, ragged = TargetSession.advance, []

    def spy_advance(self, seq_len):
        advance(self, seq_len)
        ragged.append(self.ragged or self.kv_mask is not None)
        assert self.length == int(self.cached.min()) == int(self.cached.max())

    monkeypatch.setattr(TargetSession, "advance", spy_advance)
    _run(targets, "t5", "noisy", 8, 4, "none")
    assert ragged and not any(ragged)


def test_num_return_sequences_and_seed(targets):
    model, ids, mask, refs_by = targets["t5"]
    kwargs = dict(do_sample=True, max_new_tokens=8, num_return_sequences=3, seed=123, top_k=0)
    a = fastspec.generate(model, RandomDrafter(seed=1), ids[:2], mask[:2], gamma=3, **kwargs)
    b = fastspec.generate(model, RandomDrafter(seed=1), ids[:2], mask[:2], gamma=3, **kwargs)
    assert a.sequences.shape[0] == 6
    assert torch.equal(a.sequences, b.sequences)  # seeded: reproducible
    assert len({tuple(r) for r in a.sequences[:3].tolist()}) > 1  # samples differ between copies


def test_metrics_fields(targets):
    model, ids, mask, refs_by = targets["llama"]
    eos, refs = refs_by["none"]
    out = fastspec.generate(model, OracleDrafter(refs), ids, mask, gamma=4, max_new_tokens=MAX_NEW,
                            eos_token_id=eos, pad_token_id=0)
    m = out.metrics
    assert m.acceptance_rate == 1.0 and m.per_position_acceptance == [1.0] * 4
    assert m.num_steps == -(-MAX_NEW // 5)
    assert m.target_calls == m.num_steps + 1  # + prefill
    # γ is capped at what a row may still emit − 1, so no draft is wasted: every one is emitted
    assert m.num_draft_tokens == m.num_accepted_tokens == 8 * (MAX_NEW - m.num_steps)
    assert m.mean_accepted_length == pytest.approx(MAX_NEW / m.num_steps)
    assert m["num_accepted_tokens"] == m.num_accepted_tokens
    assert m.total_time_s >= m.target_time_s + m.draft_time_s
    assert m.c >= 0 and m.ideal_speedup == pytest.approx((m.gamma + 1) / (m.gamma * m.c + 1))
    assert fastspec.engine.ideal_speedup(0.5, 3, 0.0) == pytest.approx((1 - 0.5 ** 4) / 0.5)


def test_reference_verify_gives_the_same_output(targets, monkeypatch):
    """Without the native extension the engine runs ops' pure-torch twins: same greedy tokens."""
    from fastspec import ops

    model, ids, mask, refs_by = targets["llama"]
    eos, refs = refs_by["eos"]
    kwargs = dict(gamma=3, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0, repetition_penalty=1.2)
    native = fastspec.generate(model, OracleDrafter(refs, noise=0.3), ids, mask, **kwargs)
    monkeypatch.setattr(ops, "_native_op", lambda *args, **kw: None)
    reference = fastspec.generate(model, OracleDrafter(refs, noise=0.3), ids, mask, **kwargs)
    assert torch.equal(native.sequences, reference.sequences)


def test_verify_rows_cap_shrinks_gamma_as_the_batch_grows(targets, monkeypatch):
    """max_verify_rows caps a block's rows B·(γ+1): γ 4 drafts 1 at batch 3 under a cap of 8, none
    at batch 8 (plain target steps), 2 under a cap of 10; the default cap is 8 for a float32 CPU
    target on the skinny kernel once its weights outgrow CAP_MIN_WEIGHT_BYTES, none in bf16.
    Outputs equal HF greedy in every case."""
    from fastspec import skinny_linear
    from fastspec.errors import UserError

    model = targets["llama"][0]
    assert skinny_linear.verify_rows_cap(model) == 0  # a tiny model's weights stay in the caches
    longest = lambda out: len(out.metrics.position_trials)  # the most drafts in a step
    assert longest(_run(targets, "llama", "oracle", 3, 4, "none")) == 4
    monkeypatch.setattr(skinny_linear, "CAP_MIN_WEIGHT_BYTES", 0)
    if not skinny_linear.available():
        assert skinny_linear.verify_rows_cap(model) == 0
        return
    assert skinny_linear.verify_rows_cap(model) == skinny_linear.ROWS_PER_PASS == 8
    assert skinny_linear.verify_rows_cap(copy.deepcopy(model).to(torch.bfloat16)) == 0
    out = _run(targets, "llama", "oracle", 3, 4, "none")  # the default cap: (1 + 1)·3 ≤ 8
    assert longest(out) == 1 and out.metrics.acceptance_rate == 1.0 and out.metrics.num_draft_tokens > 0
    out = _run(targets, "llama", "oracle", 8, 4, "none")
    assert out.metrics.num_draft_tokens == 0 and out.metrics.num_steps == MAX_NEW
    assert longest(_run(targets, "llama", "oracle", 3, 4, "none", max_verify_rows=10)) == 2
    assert longest(_run(targets, "llama", "oracle", 3, 4, "none", max_verify_rows=0)) == 4
    assert longest(_run(targets, "llama", "oracle", 3, 4, "none", skinny_linear=False)) == 4
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(UserError, match="max_verify_rows"):
            _run(targets, "llama", "oracle", 3, 4, "none", max_verify_rows=bad)
