"""Shortlisted output heads for the CNN and LSTM drafters (issue 10 item 4) and the layer-skip
drafter's trained exit head.

A head of N rows scores N target ids (``shortlist_ids``, the draft → target map). Checked here:
the native runtime equals the Python twin (greedy tokens and logits, sampled tokens and q on the
full vocabulary, zero outside the shortlist) on awkward sizes; speculative decoding stays lossless
(greedy == the target's own greedy, batch 3 with padding, γ 1 and 4; sampling follows the target's
distribution, χ²); the id map, save/load, int8 and bad maps; training on the shortlist.
"""
import pytest
import torch

import fastspec
from fastspec import ops
from fastspec.distill.feature import shortlist_topk_teacher
from fastspec.distill.losses import dense_teacher, divergence, sparse_teacher_divergence, topk_to_logits
from fastspec.distill.students import HeadShortlist, NeuralStudent, label_shortlist
from fastspec.distill.trainer import TrainConfig, fit_neural_drafter, train_drafter
from fastspec.drafters import CNNDrafter, LSTMDrafter
from fastspec.drafters.base import SamplingParams
from fastspec.drafters.cnn import CausalConvLM, cnn_draft_native, cnn_draft_reference
from fastspec.drafters.io import load_drafter, quantize_drafter, read_config
from fastspec.drafters.lstm import LSTMLM, lstm_draft_native, lstm_draft_reference
from fastspec.drafters.shortlist import check_shortlist, draft_index, to_vocab
from test_engine_sampling import NUM_SAMPLES, PROMPT, SETTINGS, _chi2_critical, _chi2_stat, _exact_joint

needs_native = pytest.mark.skipif(not ops.native_available(), reason="fastspec._C not built")
SAMPLING = SamplingParams(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, repetition_penalty=1.3)


def _ids(vocab, n, seed=0):
    """n distinct target ids in a scrambled order (the map is not monotone), always holding vocab-1."""
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:n]
    if not bool((ids == vocab - 1).any()):
        ids[n // 2] = vocab - 1
    return ids


def _cnn_model(vocab, n, seed=0):
    torch.manual_seed(seed)
    model = CausalConvLM(vocab, embed_dim=12, dim=16, num_layers=2, kernel_size=3, shortlist_size=n).eval()
    model.set_shortlist(_ids(vocab, n, seed))
    return model


def _lstm_model(vocab, n, seed=0):
    torch.manual_seed(seed)
    model = LSTMLM(vocab, embed_dim=12, dim=8, hidden_size=10, num_layers=2, shortlist_size=n).eval()
    model.set_shortlist(_ids(vocab, n, seed))
    return model


def _cnn_inputs(model, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R = model.receptive_field
    window = torch.randint(0, model.vocab_size, (batch, R), generator=gen)
    window[0, : R - 1] = -1  # a row with one real token
    return window, torch.randn(batch, model.dim, generator=gen)


def _lstm_inputs(model, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    last = torch.randint(0, model.vocab_size, (batch,), generator=gen)
    return last, torch.randn(2, batch, 10, generator=gen), torch.randn(2, batch, 10, generator=gen)


def _outside(model):
    keep = torch.ones(model.vocab_size, dtype=torch.bool)
    keep[model.shortlist_ids] = False
    return keep  # [V] True outside the shortlist


# --------------------------------------------------------------------------- native == Python twin
@needs_native
@pytest.mark.parametrize("vocab,n", [(111, 37), (32128, 500), (49152, 500)])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_native_equals_reference_greedy_and_sampled(vocab, n, batch):
    cnn, lstm = _cnn_model(vocab, n, seed=batch), _lstm_model(vocab, n, seed=batch)
    window, bias = _cnn_inputs(cnn, batch)
    last, h, c = _lstm_inputs(lstm, batch)
    prev = torch.randint(-1, vocab, (batch, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for sampling, gen in ((None, lambda: None), (SAMPLING, lambda: torch.Generator().manual_seed(batch))):
            for model, native, ref in (
                (cnn, cnn_draft_native(cnn, window, bias, 5, sampling, prev, gen()),
                 cnn_draft_reference(cnn, window, bias, 5, sampling, prev, gen())),
                (lstm, lstm_draft_native(lstm, last, h, c, 5, sampling, prev, gen()),
                 lstm_draft_reference(lstm, last, h, c, 5, sampling, prev, gen())),
            ):
                assert torch.equal(native[0], ref[0])
                assert bool(torch.isin(native[0], model.shortlist_ids).all())  # target ids of head rows
                if model is lstm:  # the same op order: bit-exact, the states too
                    assert all(torch.equal(a, b) for a, b in zip(native[1:], ref[1:]))
                else:  # the CNN runtime is incremental after step 1: equal up to summation order
                    torch.testing.assert_close(native[1], ref[1], rtol=1e-5, atol=1e-6)
                if sampling is None:
                    assert native[1].shape == (batch, 5, n)  # the head's logits
                    assert torch.equal(native[0], model.shortlist_ids[native[1].argmax(-1)])
                else:
                    q = native[1]
                    assert q.shape == (batch, 5, vocab)
                    assert bool((q[..., _outside(model)] == 0).all())  # q is zero outside the shortlist
                    torch.testing.assert_close(q.sum(-1), torch.ones(batch, 5))
                    assert bool((q.gather(2, native[0][..., None]) > 0).all())


@needs_native
def test_bad_head_id_maps_raise_clear_errors():
    model = _lstm_model(111, 37)
    last, h, c = _lstm_inputs(model, 3)
    good = model.shortlist_ids.clone()
    cases = [
        (torch.cat([good[:-1], good[:1]]), ValueError, "appears twice"),
        (torch.cat([good[:-1], torch.tensor([111])]), ValueError, "outside the vocabulary"),
        (torch.cat([good[:-1], torch.tensor([-3])]), ValueError, "outside the vocabulary"),
        (good.int(), RuntimeError, "int64"),
        (good[:-1], RuntimeError, "36 ids for 37 head rows"),
        (good[None], RuntimeError, r"\[N\] int64"),
    ]
    for bad, error, message in cases:
        model.shortlist_ids = bad
        with pytest.raises(error, match=message):
            lstm_draft_native(model, last, h, c, 2)
        cnn = _cnn_model(111, 37)
        cnn.shortlist_ids = bad
        with pytest.raises(error, match=message):
            cnn_draft_native(cnn, *_cnn_inputs(cnn, 3), 2)
    # a full-size head without a map is the identity; a short head needs its map
    full = LSTMLM(111, embed_dim=12, dim=8, hidden_size=10, num_layers=2)
    assert lstm_draft_native(full, last, h, c, 2)[1].shape == (3, 2, 111)
    with pytest.raises(RuntimeError, match="pass head_ids"):
        torch.ops.fastspec.lstm_draft(last, h, c, full.embed.weight, None, None, *full.weights(),
                                      full.head.weight[:37], None, 2)


def test_bad_shortlists_are_refused_at_construction(tiny_llama):
    for bad, message in (([5, 5], "distinct"), ([3, 3001], r"\[0, 3001\)"), ([], "1..3001"), (7, "1-D"),
                         ([1.0, 2.0], "integer")):
        with pytest.raises(ValueError, match=message):
            CNNDrafter.from_target(tiny_llama, dim=16, shortlist=bad)
    model = CausalConvLM(50, embed_dim=8, dim=8, shortlist_size=4)
    with pytest.raises(ValueError, match="4 rows"):
        model.set_shortlist([1, 2, 3])
    with pytest.raises(ValueError, match="shortlist_size"):
        CausalConvLM(50, embed_dim=8, dim=8, shortlist_size=51)


# --------------------------------------------------------------------------- the id map
def test_id_map_round_trip():
    ids = check_shortlist(_ids(111, 37), 111)
    index = draft_index(ids, 111)
    assert torch.equal(index[ids], torch.arange(37))
    assert int((index >= 0).sum()) == 37 and bool((index[_outside_mask(ids, 111)] == -1).all())
    short = torch.randn(2, 3, 37)
    full = to_vocab(short, ids, 111)
    assert torch.equal(full[..., ids], short) and bool(torch.isinf(full[..., _outside_mask(ids, 111)]).all())
    model = _cnn_model(111, 37)
    assert torch.equal(model.head_to_vocab(short), full)
    # the trainer's view: labels map to head rows (outside / padding -> -100), teacher logits restrict
    view = HeadShortlist(model)
    labels = torch.tensor([[int(ids[4]), int(_outside_mask(ids, 111).nonzero()[0]), -100]])
    assert view.labels(labels).tolist() == [[4, -100, -100]]
    teacher = torch.randn(5, 111)
    restricted, inside = view.teacher(teacher)
    assert torch.equal(restricted, teacher[:, ids])
    assert torch.equal(inside, index[teacher.argmax(-1)] >= 0)


def _outside_mask(ids, vocab):
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[ids] = False
    return keep


def test_cached_teacher_on_the_shortlist_equals_the_online_one():
    """The top-k cache with k = V restricted by shortlist_topk_teacher gives the same divergences as
    the dense online logits restricted to the shortlist; with k < V, the dense cache restricted."""
    torch.manual_seed(0)
    vocab, n = 60, 17
    model = _cnn_model(vocab, n)
    view = HeadShortlist(model)
    logits, student = torch.randn(6, vocab) * 3, torch.randn(6, n)
    online, _ = view.teacher(logits)
    for k in (vocab, 8):
        values, top = logits.topk(k, -1)
        top_log_p, cols, tail = view.teacher_topk_sparse(values, top, logits.logsumexp(-1))
        cached, inside = dense_teacher(top_log_p, cols, tail, view.size), cols[:, 0] >= 0
        dense = topk_to_logits(values, top, logits.logsumexp(-1), vocab)[:, model.shortlist_ids]
        torch.testing.assert_close(cached, dense)
        assert torch.equal(inside, draft_index(model.shortlist_ids, vocab)[top[:, 0]] >= 0)
        for name in ("fkl", "rkl", "jsd", "tvd"):  # the trainer's sparse path equals the dense one
            torch.testing.assert_close(sparse_teacher_divergence(name, top_log_p, cols, tail, student),
                                       divergence(name, cached, student))
        if k == vocab:
            for name in ("fkl", "rkl", "jsd", "tvd"):
                torch.testing.assert_close(divergence(name, cached, student), divergence(name, online, student))
    assert shortlist_topk_teacher is not None  # the one implementation, shared with the feature drafter


# --------------------------------------------------------------------------- engine: lossless
@pytest.fixture(scope="module")
def trained(tiny_t5, tiny_llama, t5_inputs, llama_inputs):
    """name -> (target, ids[:3], mask[:3], HF greedy, shortlisted CNN, shortlisted LSTM), trained a few
    steps on the greedy outputs of rows 0-1 (ragged acceptance); the shortlist holds those outputs'
    ids plus random ones, so some target tokens are outside it."""
    result = {}
    for name, model, (ids, mask) in (("t5", tiny_t5, t5_inputs), ("llama", tiny_llama, llama_inputs)):
        ids, mask = ids[:3], mask[:3]
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
        start = 1 if model.config.is_encoder_decoder else ids.shape[1]
        outputs = [row[start:].tolist() for row in ref]
        sources = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        vocab = model.config.vocab_size
        seen = sorted(set(outputs[0] + outputs[1]))
        extra = [int(i) for i in torch.randperm(vocab, generator=torch.Generator().manual_seed(3))[:40] if int(i) not in seen]
        shortlist = seen + extra[:20]
        drafters = []
        for cls, sizes in ((CNNDrafter, dict(dim=32, num_layers=2, kernel_size=3)), (LSTMDrafter, dict(dim=32, hidden_size=32))):
            torch.manual_seed(0)
            drafter = cls.from_target(model, shortlist=shortlist, **sizes)
            fit_neural_drafter(drafter, sources[:2], outputs[:2], max_steps=10, batch_size=2, lr=5e-2)
            drafters.append(drafter)
        result[name] = (model, ids, mask, ref, *drafters)
    return result


@pytest.mark.parametrize("target", ["t5", "llama"])
@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_greedy_is_lossless_with_a_shortlisted_drafter(kind, target, trained):
    model, ids, mask, ref, cnn, lstm = trained[target]
    drafter = cnn if kind == "cnn" else lstm
    assert drafter.model.head.weight.shape[0] == drafter.model.shortlist_size < model.config.vocab_size
    for gamma in (1, 4):
        out = fastspec.generate(model, drafter, ids, mask, gamma=gamma, max_new_tokens=12, pad_token_id=0)
        assert torch.equal(out.sequences, ref), (kind, target, gamma)
        assert 0.0 < out.metrics.acceptance_rate < 1.0, out.metrics.acceptance_rate


@pytest.mark.parametrize("kind", ["cnn", "lstm"])
def test_int8_and_safetensors_round_trip_of_a_shortlisted_drafter(kind, trained, tmp_path):
    model, ids, mask, ref, cnn, lstm = trained["llama"]
    drafter = cnn if kind == "cnn" else lstm
    drafter.save(str(tmp_path / "d"))
    assert read_config(str(tmp_path / "d"))["config"]["model"]["shortlist_size"] == drafter.model.shortlist_size
    loaded = load_drafter(str(tmp_path / "d"))
    assert torch.equal(loaded.model.shortlist_ids, drafter.model.shortlist_ids)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), drafter.model.state_dict().values()))
    kwargs = dict(gamma=4, max_new_tokens=12, pad_token_id=0)
    a = fastspec.generate(model, drafter, ids, mask, **kwargs)
    b = fastspec.generate(model, loaded, ids, mask, **kwargs)
    assert torch.equal(b.sequences, ref) and b.metrics.num_accepted_tokens == a.metrics.num_accepted_tokens
    for int8 in (quantize_drafter(drafter), load_drafter(str(tmp_path / "d"), dtype="int8")):
        assert torch.equal(int8.model.shortlist_ids, drafter.model.shortlist_ids)
        assert torch.equal(fastspec.generate(model, int8, ids, mask, **kwargs).sequences, ref)
    # a corrupted map is refused at load time
    from fastspec.drafters.folder import save_folder

    tensors = {k: v.clone() for k, v in drafter.model.state_dict().items()}
    tensors["shortlist_ids"][1] = tensors["shortlist_ids"][0]
    save_folder(str(tmp_path / "bad"), kind, {"model": drafter.model.config_dict(), "start_token_id": None}, tensors)
    with pytest.raises(ValueError, match="corrupted.*distinct"):
        load_drafter(str(tmp_path / "bad"))
    # a full-head checkpoint (no shortlist key, no buffer) loads as before
    full = type(drafter).from_target(model, dim=16, **({"hidden_size": 16} if kind == "lstm" else {}))
    full.save(str(tmp_path / "full"))
    assert "shortlist_size" not in read_config(str(tmp_path / "full"))["config"]["model"]
    assert load_drafter(str(tmp_path / "full")).model.shortlist_ids is None


# --------------------------------------------------------------------------- engine: sampling
@pytest.mark.parametrize("kind,target", [("cnn", "tiny_vocab_llama"), ("lstm", "tiny_vocab_t5")])
def test_sampling_follows_the_target_with_a_shortlisted_drafter(request, target, kind):
    """q is zero outside the shortlist (7 of 12 ids): the first two tokens still follow the target's
    processed joint law (χ²), the tokens outside coming from the residual."""
    model = request.getfixturevalue(target)
    shortlist = [11, 3, 0, 7, 5, 9, 2]
    torch.manual_seed(1)
    cls = CNNDrafter if kind == "cnn" else LSTMDrafter
    drafter = cls.from_target(model, dim=16, shortlist=shortlist, **({"hidden_size": 16} if kind == "lstm" else {}))
    with torch.no_grad():
        drafter.model.head.weight.mul_(8.0)  # a peaked q: its mismatch with p is large
    _assert_first_two_tokens_follow_the_target(model, drafter, shortlist)


def _assert_first_two_tokens_follow_the_target(model, drafter, shortlist):
    """χ² of the first two sampled tokens against the target's processed joint law; some tokens
    outside the shortlist are drawn (from the residual), and acceptance is partial."""
    settings = SETTINGS["warped"]
    vocab = model.config.vocab_size
    ids = torch.tensor([PROMPT]).repeat(NUM_SAMPLES, 1)
    out = fastspec.generate(model, drafter, ids, gamma=2, do_sample=True, max_new_tokens=3, eos_token_id=None, seed=2024,
                            **settings)
    new = out.sequences[:, 1:] if model.config.is_encoder_decoder else out.sequences[:, len(PROMPT):]
    counts = torch.bincount(new[:, 0] * vocab + new[:, 1], minlength=vocab * vocab).reshape(vocab, vocab)
    exact = _exact_joint(model, settings)
    stat, dof = _chi2_stat(counts, exact * NUM_SAMPLES)
    assert stat < _chi2_critical(dof), (stat, dof)
    assert 0.0 < out.metrics.acceptance_rate < 1.0
    outside = [t for t in range(vocab) if t not in shortlist and float(exact.sum(1)[t]) > 0.01]
    assert outside and int(torch.isin(new[:, 0], torch.tensor(outside)).sum()) > 0  # reached via the residual


# --------------------------------------------------------------------------- training
def _records(vocab, seed=0, num=12):
    """A corpus with a fixed continuation rule (next = f(prev)), ids spread over the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randint(10, vocab, (vocab,), generator=gen)
    records = []
    for i in range(num):
        token = int(torch.randint(10, vocab, (1,), generator=gen))
        out = []
        for _ in range(10):
            token = int(table[token])
            out.append(token)
        records.append({"index": i, "source_ids": [int(x) for x in torch.randint(3, vocab, (5,), generator=gen)],
                        "reference_ids": out + [2], "output_ids": out + [2]})
    return records


def test_training_a_shortlisted_student_lowers_its_loss_and_maps_its_rows(tiny_llama):
    vocab = tiny_llama.config.vocab_size
    records = _records(vocab)
    labels = sorted({t for r in records for t in r["reference_ids"]})
    config = TrainConfig(drafter="cnn", max_steps=40, batch_size=6, lr=2e-2, loss=1.0, kd_loss=0.0, progress=False)
    drafter = train_drafter(tiny_llama, records, config, progress=False, drafter_options={"dim": 32, "shortlist": 16})
    short = drafter.model.shortlist_ids
    assert drafter.model.shortlist_size == short.numel() == 16 and drafter.model.head.weight.shape[0] == 16
    assert torch.equal(short, label_shortlist(records, 16, vocab, [2], outputs=False))
    assert 2 in short.tolist() and set(short.tolist()) <= set(labels)  # EOS always, then frequent labels
    # teacher-forced, the head's argmax row maps to the right target id on the training corpus
    with torch.no_grad():
        logits, mask = NeuralStudent(drafter).logits(drafter.model, [r["source_ids"] for r in records],
                                                     [r["reference_ids"] for r in records], "cpu")
    gold = torch.tensor([r["reference_ids"] for r in records])
    hits = (short[logits.argmax(-1)] == gold)[torch.isin(gold, short) & mask]
    assert hits.float().mean() > 0.8, hits.float().mean()
    # 0 = a full head
    full = train_drafter(tiny_llama, records, TrainConfig(drafter="lstm", max_steps=1, batch_size=4, progress=False),
                         progress=False, drafter_options={"dim": 16, "hidden_size": 16, "shortlist": 0})
    assert full.model.shortlist_ids is None and full.model.head.weight.shape[0] == vocab


@pytest.mark.parametrize("method", ["fkl", "tvd", "seq_kd"])
def test_kd_on_the_shortlist_lowers_the_loss(method, tiny_llama):
    from fastspec.distill.students import build_student
    from fastspec.distill.trainer import Trainer, items_from_records

    vocab = tiny_llama.config.vocab_size
    records = _records(vocab)
    sources = torch.tensor([r["source_ids"] for r in records])
    greedy = tiny_llama.generate(input_ids=sources, do_sample=False, max_new_tokens=8, pad_token_id=0)
    for r, row in zip(records, greedy[:, sources.shape[1]:].tolist()):
        r["output_ids"] = row  # the target's own outputs (a pseudo-dataset): its argmaxes lie in the shortlist
    ids = label_shortlist(records, 48, vocab, [2], references=False)
    student = build_student("lstm", tiny_llama, options={"dim": 16, "hidden_size": 16, "shortlist": ids})
    assert student.module.head.weight.shape[0] == ids.numel() < vocab and student.shortlist is not None
    config = TrainConfig(drafter="lstm", max_steps=15, batch_size=6, lr=2e-2, loss=0.0, kd_loss=1.0,
                         distill_method=method, progress=False)
    history = Trainer(student, items_from_records(records), config, teacher=tiny_llama).train().history
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-3:]) / 3
    assert last < first, (first, last)


def test_kd_from_the_topk_cache_on_the_shortlist_equals_online(tmp_path):
    """With k = V the cached teacher restricted to the shortlist gives the online loss."""
    from distill_helpers import hf_generate, tiny_llama
    from fastspec.distill.pseudo import PseudoSettings, SourceRecord, generate_pseudo_dataset, load_pseudo_dataset
    from fastspec.distill.students import build_student
    from fastspec.distill.trainer import Trainer, items_from_records

    teacher, vocab = tiny_llama(vocab_size=64, seed=5), 64
    records = _records(vocab, num=6)
    sources = [SourceRecord(i, f"d{i}", r["source_ids"], r["reference_ids"]) for i, r in enumerate(records)]
    generate_pseudo_dataset(teacher, sources, str(tmp_path / "p"), PseudoSettings(batch_size=6, max_new_tokens=6,
                            topk_logits=vocab), generate_fn=hf_generate, progress=False)
    items = items_from_records(load_pseudo_dataset(str(tmp_path / "p")))
    ids = label_shortlist([it.record for it in items], 20, vocab, [1], references=False)
    losses = {}
    for mode in ("online", "cache"):
        student = build_student("cnn", teacher, options={"dim": 16, "shortlist": ids})
        config = TrainConfig(max_steps=1, batch_size=6, loss=0.0, kd_loss=1.0, teacher_logits=mode, progress=False,
                             drafter="cnn")
        losses[mode] = Trainer(student, items, config, teacher=teacher, pseudo_dir=str(tmp_path / "p")).train().history[0]
    assert losses["cache"]["kd"] == pytest.approx(losses["online"]["kd"], rel=1e-4) and losses["cache"]["kd"] > 0
    assert losses["cache"]["tokens"] == losses["online"]["tokens"]


def test_on_policy_samples_of_a_shortlisted_student_are_target_ids_in_the_shortlist(tiny_llama):
    from fastspec.distill.students import build_student

    ids = _ids(tiny_llama.config.vocab_size, 30)
    student = build_student("cnn", tiny_llama, options={"dim": 16, "shortlist": ids})
    samples = student.sample([[5, 6, 7], [8, 9]], max_new_tokens=6, device="cpu")
    assert all(samples) and all(t in ids.tolist() for row in samples for t in row)


# --------------------------------------------------------------------------- layer-skip exit head
def _layer_skip(model, num_layers, shortlist, scale=1.0):
    from fastspec.drafters import LayerSkipDrafter
    from fastspec.drafters.layer_skip import attach_exit_head, truncated_view

    view = truncated_view(model, num_layers)
    head = attach_exit_head(view, shortlist=shortlist)
    with torch.no_grad():
        head["head"].linear.weight.mul_(scale)
    return LayerSkipDrafter(model, num_layers, view=view, exit_head=head)


def _depth(model):
    return len(model.decoder.block) if model.config.is_encoder_decoder else len(model.model.layers)


@pytest.mark.parametrize("target", ["t5", "llama"])
def test_layer_skip_with_every_id_shortlisted_in_shuffled_order_is_the_target(target, trained):
    """All layers and a head of all V ids in a random order: the id map must send every row back to
    its id, so the drafts are the target's own (greedy α = 1; sampling α ≈ 1: q is p)."""
    model, ids, mask, ref = trained[target][:4]
    vocab = model.config.vocab_size
    drafter = _layer_skip(model, _depth(model), torch.randperm(vocab, generator=torch.Generator().manual_seed(0)))
    assert drafter.shortlist is not None and drafter.vocab_size == vocab
    out = fastspec.generate(model, drafter, ids, mask, gamma=4, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(out.sequences, ref) and out.metrics.acceptance_rate == 1.0
    out = fastspec.generate(model, drafter, ids, mask, gamma=4, max_new_tokens=12, pad_token_id=0, do_sample=True,
                            temperature=0.7, top_k=40, top_p=0.9, seed=5)
    assert out.metrics.acceptance_rate > 0.97, out.metrics.acceptance_rate


@pytest.mark.parametrize("target", ["t5", "llama"])
def test_greedy_is_lossless_with_a_shortlisted_layer_skip_drafter(target, trained):
    """One layer, a head of 60 ids (some target tokens outside it): batch 3 with padding, γ 1 and 4.
    Every draft is a target id inside the shortlist."""
    model, ids, mask, ref, cnn = trained[target][:5]
    shortlist = cnn.model.shortlist_ids
    drafter = _layer_skip(model, 1, shortlist)
    assert drafter.model.lm_head.linear.weight.shape[0] == shortlist.numel() < model.config.vocab_size
    drafted = []
    original = drafter.draft

    def spy(step):
        out = original(step)
        drafted.append(out.tokens.flatten())
        return out

    drafter.draft = spy
    for gamma in (1, 4):
        out = fastspec.generate(model, drafter, ids, mask, gamma=gamma, max_new_tokens=12, pad_token_id=0)
        assert torch.equal(out.sequences, ref), (target, gamma)
    assert bool(torch.isin(torch.cat(drafted), shortlist).all())


@pytest.mark.parametrize("target", ["tiny_vocab_llama", "tiny_vocab_t5"])
def test_sampling_follows_the_target_with_a_shortlisted_layer_skip_drafter(request, target):
    """q is zero outside the shortlist (7 of 12 ids) and peaked: the first two tokens still follow the
    target's processed joint law (χ²), the ids outside the shortlist coming from the residual."""
    model = request.getfixturevalue(target)
    shortlist = [11, 3, 0, 7, 5, 9, 2]
    _assert_first_two_tokens_follow_the_target(model, _layer_skip(model, 1, shortlist, scale=8.0), shortlist)


def test_trained_shortlisted_layer_skip_saves_loads_and_quantizes(tiny_llama, llama_inputs, tmp_path):
    """train_drafter(--drafter layer_skip) heads the exit with the training labels' shortlist; the
    folder stores its size and map; load_drafter(folder, target) and int8 give the same output; a
    corrupted map or a missing one is one clear error."""
    from fastspec.errors import UserError

    vocab = tiny_llama.config.vocab_size
    records = _records(vocab)
    config = TrainConfig(drafter="layer_skip", max_steps=6, batch_size=6, lr=1e-2, loss=1.0, kd_loss=0.0,
                         progress=False, out_dir=str(tmp_path / "run"))
    drafter = train_drafter(tiny_llama, records, config, progress=False,
                            drafter_options={"num_layers": 1, "shortlist": 16})
    short = drafter.shortlist.shortlist_ids
    assert torch.equal(short, label_shortlist(records, 16, vocab, [2], outputs=False))
    assert not torch.equal(drafter.model.lm_head.linear.weight, tiny_llama.lm_head.weight[short])  # trained
    folder = str(tmp_path / "run" / "drafter")
    meta = read_config(folder)
    assert meta["config"]["shortlist_size"] == 16 and meta["config"]["exit_head"] is True
    loaded = load_drafter(folder, tiny_llama)
    assert torch.equal(loaded.shortlist.shortlist_ids, short)
    ids, mask = llama_inputs[0][:3], llama_inputs[1][:3]
    ref = tiny_llama.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=0)
    kwargs = dict(gamma=3, max_new_tokens=10, pad_token_id=0)
    a = fastspec.generate(tiny_llama, drafter, ids, mask, **kwargs)
    b = fastspec.generate(tiny_llama, loaded, ids, mask, **kwargs)
    assert torch.equal(a.sequences, ref) and torch.equal(b.sequences, ref)
    assert a.metrics.num_accepted_tokens == b.metrics.num_accepted_tokens
    int8 = quantize_drafter(loaded)
    assert int8.shortlist is not None and torch.equal(fastspec.generate(tiny_llama, int8, ids, mask, **kwargs).sequences, ref)
    # a map with a repeated id, then a config that promises a shortlist the tensors lack
    from fastspec.drafters.folder import load_folder, save_folder

    config_dict, tensors = load_folder(folder, "layer_skip")
    tensors["head.shortlist_ids"][1] = tensors["head.shortlist_ids"][0]
    save_folder(str(tmp_path / "bad"), "layer_skip", config_dict, tensors)
    with pytest.raises(UserError, match="distinct"):
        load_drafter(str(tmp_path / "bad"), tiny_llama)
    del tensors["head.shortlist_ids"]
    save_folder(str(tmp_path / "missing"), "layer_skip", config_dict, tensors)
    with pytest.raises(UserError, match="exit head does not fit"):
        load_drafter(str(tmp_path / "missing"), tiny_llama)


def test_on_policy_samples_of_a_shortlisted_layer_skip_student_are_target_ids_in_the_shortlist(tiny_llama):
    from fastspec.distill.students import build_student

    ids = _ids(tiny_llama.config.vocab_size, 30)
    student = build_student("layer_skip", tiny_llama, options={"num_layers": 1, "shortlist": ids})
    assert student.shortlist is not None and student.module["head"].linear.weight.shape[0] == 30
    samples = student.sample([[5, 6, 7], [8, 9]], max_new_tokens=6, device="cpu")
    assert all(samples) and all(t in ids.tolist() for row in samples for t in row)
