"""FeatureDrafter (EAGLE-style, fastspec/drafters/feature.py) and its training (fastspec/distill/feature.py).

A reference "engine feeder" below teacher-forces the target on each row's decoder sequence and
hands features exactly per the protocol in the drafter's module docstring.
"""
import pytest
import torch

from conftest import _llama
from fastspec.drafters.base import CommitInfo, DraftRequest, DraftStep, SamplingParams
from fastspec.drafters.folder import _write_config, read_config
from fastspec.distill.checkpoint import latest_checkpoint
from fastspec.distill.feature import (FeatureTrainConfig, agreement, build_shortlist, collate, extract_features,
                                      label_counts, layer_positions, pseudo_pairs, train_feature_drafter,
                                      unroll_weights, unrolled_loss, unrolled_outputs, window_sequence)
from fastspec.drafters.feature import FeatureDrafter, eagle3_layers
from fastspec.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny matmuls on 2 shared cores: a second thread only adds contention (60x slower seen)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _layer_features(target, seq, layers, encoder_ids=None):
    """The target's features [T,H'] at every position of one decoder sequence (teacher-forced)."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        if encoder_ids is None:
            states = target(input_ids=ids, output_hidden_states=True).hidden_states
        else:
            states = target(input_ids=torch.tensor([encoder_ids]), decoder_input_ids=ids,
                            output_hidden_states=True).decoder_hidden_states
    return torch.cat([states[i][0] for i in layers], dim=-1)


class Feeder:
    """The engine's side of the feature protocol, one row at a time, exactly as specified."""

    def __init__(self, target, layers, prompts, sources=None):
        self.target, self.layers, self.sources = target, tuple(layers), sources
        self.seqs = [[0] for _ in sources] if sources is not None else [list(p) for p in prompts]
        self.handed = [0] * len(self.seqs)

    def request(self, sampling=SamplingParams(), generator=None) -> DraftRequest:
        vocab = self.target.get_output_embeddings().weight.shape[0]
        rows = self.sources if self.sources is not None else self.seqs
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows):  # causal: left padding; seq2seq: right padding
            start = width - len(row) if self.sources is None else 0
            ids[b, start:start + len(row)], mask[b, start:start + len(row)] = torch.tensor(row), 1
        request = DraftRequest(source_ids=ids, source_mask=mask, is_encoder_decoder=self.sources is not None,
                               vocab_size=vocab, decoder_start_token_id=0 if self.sources is not None else None,
                               sampling=sampling, generator=generator)
        if self.sources is not None:
            with torch.no_grad():
                encoder = self.target.get_encoder()
                request.encoder_hidden_states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return request

    def commit(self, new_tokens, active=None) -> CommitInfo:
        """new_tokens: per row, the accepted drafts then the recovered/bonus token."""
        batch = len(self.seqs)
        active = [True] * batch if active is None else active
        width = max(len(t) for t in new_tokens)
        out = torch.full((batch, width), -1, dtype=torch.long)
        feats = []
        for b, tokens in enumerate(new_tokens):
            if not active[b]:
                feats.append(None)
                continue
            out[b, : len(tokens)] = torch.tensor(tokens)
            self.seqs[b] += list(tokens)
            enc = self.sources[b] if self.sources is not None else None
            row = _layer_features(self.target, self.seqs[b], self.layers, enc)[self.handed[b]: len(self.seqs[b]) - 1]
            self.handed[b] = len(self.seqs[b]) - 1
            feats.append(row)
        k = max((f.shape[0] for f in feats if f is not None), default=0)
        dim = next(f for f in feats if f is not None).shape[-1]
        hidden = torch.zeros(batch, k, dim)
        num = torch.zeros(batch, dtype=torch.long)
        for b, f in enumerate(feats):
            if f is not None:
                hidden[b, : f.shape[0]], num[b] = f, f.shape[0]
        info = CommitInfo(output_tokens=out, num_accepted=torch.tensor([max(len(t) - 1, 0) for t in new_tokens]),
                          active=torch.tensor(active))
        info.hidden_states, info.num_hidden = hidden, num
        return info


def _step(batch, gamma):
    return DraftStep(generated=torch.zeros(batch, 0, dtype=torch.long),
                     num_generated=torch.zeros(batch, dtype=torch.long),
                     active=torch.ones(batch, dtype=torch.bool), gamma=gamma)


def _fresh_draft(model, feeder, gamma, sampling=SamplingParams(), seed=0):
    """A new drafter fed the feeder's whole committed history in one commit, then one draft."""
    replay = Feeder(feeder.target, feeder.layers, [s[: len(s) - g] for s, g in zip(feeder.seqs, _generated(feeder))],
                    feeder.sources)
    drafter = FeatureDrafter(model)
    drafter.begin(replay.request(sampling, torch.Generator().manual_seed(seed)))
    drafter.commit(replay.commit(_generated_tokens(feeder)))
    return drafter.draft(_step(len(feeder.seqs), gamma)), drafter


def _generated(feeder):
    return [len(s) - (1 if feeder.sources is not None else len(p))
            for s, p in zip(feeder.seqs, feeder.prompts)]


def _generated_tokens(feeder):
    return [s[len(s) - g:] for s, g in zip(feeder.seqs, _generated(feeder))]


@pytest.fixture(scope="module")
def small_llama():
    return _llama(97, seed=11, hidden=32, layers=4)


PROMPTS = [[5, 9, 14, 3, 77], [8, 21], [40, 41, 42, 43, 44, 45, 46, 47]]


def _feeder(target, layers, prompts=PROMPTS, sources=None):
    feeder = Feeder(target, layers, prompts, sources)
    feeder.prompts = [list(p) for p in prompts] if sources is None else [[0]] * len(sources)
    return feeder


@pytest.mark.parametrize("layers", [(-1,), "eagle3"])
def test_ragged_rollback_matches_fresh_drafter(small_llama, layers):
    layers = eagle3_layers(4) if layers == "eagle3" else layers
    shortlist = torch.arange(3, 60)
    drafter = FeatureDrafter.from_target(small_llama, feature_layers=layers, shortlist=shortlist)
    assert drafter.hidden_state_layers == tuple(layers)
    feeder = _feeder(small_llama, layers)
    drafter.begin(feeder.request())
    first = drafter.draft(_step(3, 4))
    assert first.tokens.shape == (3, 0)  # no features yet
    drafter.commit(feeder.commit([[7], [8], [9]]))
    gen = torch.Generator().manual_seed(0)
    for accepted in ([0, 2, 4], [4, 1, 0], [3, 3, 2]):
        out = drafter.draft(_step(3, 4))
        assert out.tokens.shape == (3, 4) and out.probs is None
        assert bool(torch.isin(out.tokens, shortlist).all())
        expected, fresh = _fresh_draft(drafter.model, feeder, 4)
        assert torch.equal(out.tokens, expected.tokens)
        bonus = torch.randint(0, 97, (3,), generator=gen).tolist()
        new = [out.tokens[b, :a].tolist() + [bonus[b]] for b, a in enumerate(accepted)]
        drafter.commit(feeder.commit(new))
    _, fresh = _fresh_draft(drafter.model, feeder, 1)
    torch.testing.assert_close(drafter.last_feature(), fresh.last_feature(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target_name", ["llama", "t5"])
def test_commits_without_a_draft_run_the_layer_once_at_the_next_draft(small_llama, tiny_t5, target_name):
    """Commits only queue their features (a hybrid's fallback drafts on a minority of steps); the
    next draft runs all of them, each row's ragged chunks in order, in one layer pass, and drafts
    what a drafter fed the same history in one commit drafts."""
    target = small_llama if target_name == "llama" else tiny_t5
    sources = [[21603, 10, 8774, 296, 1], [100, 200, 1], [5, 6, 7, 8, 9, 10, 11, 1]] if target_name == "t5" else None
    drafter = FeatureDrafter.from_target(target, shortlist=torch.arange(3, 90))
    feeder = _feeder(target, (-1,), sources=sources)
    drafter.begin(feeder.request())
    passes = []
    run_layer = drafter.model.run_layer
    drafter.model.run_layer = lambda *a, **k: passes.append(a[0].shape[1]) or run_layer(*a, **k)
    for new in ([[7], [8], [9]], [[10, 11], [12], [13, 14, 15]], [[16], [17, 18, 19, 20], [21]]):
        drafter.commit(feeder.commit(new))
    assert passes == []
    out = drafter.draft(_step(3, 3))
    assert passes[0] == max(feeder.handed)  # every row's features since begin, in one block
    assert len(passes) == 1 + 2  # the queued features in one pass, then γ − 1 draft passes
    expected, fresh = _fresh_draft(drafter.model, feeder, 3)
    assert torch.equal(out.tokens, expected.tokens)
    torch.testing.assert_close(drafter.last_feature(), fresh.last_feature(), rtol=1e-4, atol=1e-4)


def test_sampled_q_is_full_vocab_and_zero_outside_shortlist(small_llama):
    shortlist = torch.arange(10, 50)
    drafter = FeatureDrafter.from_target(small_llama, shortlist=shortlist)
    sampling = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.95, repetition_penalty=1.3)
    feeder = _feeder(small_llama, (-1,))
    drafter.begin(feeder.request(sampling, torch.Generator().manual_seed(1)))
    drafter.commit(feeder.commit([[7], [8], [9]]))
    out = drafter.draft(_step(3, 3))
    assert out.tokens.shape == (3, 3) and out.probs.shape == (3, 3, 97)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(3, 3))
    outside = torch.ones(97, dtype=torch.bool)
    outside[shortlist] = False
    assert float(out.probs[..., outside].abs().max()) == 0.0
    assert bool(torch.isin(out.tokens, shortlist).all())
    chosen = out.probs.gather(-1, out.tokens[..., None])
    assert bool((chosen > 0).all())  # each token was drawn from its own q
    expected, _ = _fresh_draft(drafter.model, feeder, 3, sampling, seed=1)
    torch.testing.assert_close(out.probs[:, 0], expected.probs[:, 0], rtol=1e-4, atol=1e-5)


def test_t5_drafter_cross_attends_and_rolls_back(tiny_t5):
    shortlist = torch.arange(100, 400)
    drafter = FeatureDrafter.from_target(tiny_t5, shortlist=shortlist)
    assert drafter.model.arch == "t5"
    sources = [[21603, 10, 8774, 296, 1], [100, 200, 1], [5, 6, 7, 8, 9, 10, 11, 1]]
    feeder = _feeder(tiny_t5, (-1,), sources=sources)
    drafter.begin(feeder.request())
    assert drafter.draft(_step(3, 3)).tokens.shape == (3, 0)
    drafter.commit(feeder.commit([[150], [151], [152]]))
    for accepted in ([3, 0, 1], [1, 2, 3]):
        out = drafter.draft(_step(3, 3))
        assert out.tokens.shape == (3, 3) and bool(torch.isin(out.tokens, shortlist).all())
        expected, _ = _fresh_draft(drafter.model, feeder, 3)
        assert torch.equal(out.tokens, expected.tokens)
        drafter.commit(feeder.commit([out.tokens[b, :a].tolist() + [160 + b] for b, a in enumerate(accepted)]))
    # the encoder states matter: other sources give other drafts
    other = _feeder(tiny_t5, (-1,), sources=[[9, 9, 9, 1]] * 3)
    fresh = FeatureDrafter(drafter.model)
    fresh.begin(other.request())
    fresh.commit(other.commit([[150], [151], [152]]))
    assert not torch.allclose(fresh.last_feature(), _first_last(drafter.model, tiny_t5, sources), atol=1e-3)


def _first_last(model, target, sources):
    feeder = _feeder(target, (-1,), sources=sources)
    drafter = FeatureDrafter(model)
    drafter.begin(feeder.request())
    drafter.commit(feeder.commit([[150], [151], [152]]))
    return drafter.last_feature()


def test_save_load_round_trip_and_target_mismatch(small_llama, tmp_path):
    drafter = FeatureDrafter.from_target(small_llama, feature_layers=eagle3_layers(4), shortlist=torch.arange(3, 70))
    drafter.save(str(tmp_path / "d"))
    loaded = FeatureDrafter.load(str(tmp_path / "d"), target=small_llama)
    assert loaded.hidden_state_layers == drafter.hidden_state_layers
    assert loaded.confidence_threshold == 0.0  # saved as constructed
    drafter.confidence_threshold = 0.3
    drafter.save(str(tmp_path / "sure"))
    assert FeatureDrafter.load(str(tmp_path / "sure"), target=small_llama).confidence_threshold == 0.3
    meta = read_config(str(tmp_path / "d"))
    del meta["config"]["confidence_threshold"]  # a folder saved before the threshold was stored
    _write_config(str(tmp_path / "d"), meta)
    assert FeatureDrafter.load(str(tmp_path / "d"), target=small_llama).confidence_threshold == 0.0
    drafter.confidence_threshold = 0.0
    sampling = SamplingParams(do_sample=True, temperature=0.9)
    outs = []
    for d in (drafter, loaded):
        feeder = _feeder(small_llama, drafter.hidden_state_layers)
        d.begin(feeder.request(sampling, torch.Generator().manual_seed(3)))
        d.commit(feeder.commit([[7], [8], [9]]))
        outs.append(d.draft(_step(3, 4)))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[0].probs, outs[1].probs)
    with pytest.raises(UserError, match="vocabulary 97"):
        FeatureDrafter.load(str(tmp_path / "d"), target=_llama(101, seed=1, hidden=32, layers=4))
    with pytest.raises(UserError):
        FeatureDrafter.load(str(tmp_path / "d"))  # the embeddings come from the target
    with pytest.raises(UserError, match="vocabulary"):
        drafter.begin(DraftRequest(source_ids=torch.ones(1, 2, dtype=torch.long), source_mask=None,
                                   is_encoder_decoder=False, vocab_size=101))


def test_unrolled_training_matches_inference_drafting(small_llama):
    """Pass s of the training-time test at position n−2+s equals the drafter's s-th draft feature
    when the drafts are the true tokens."""
    prompt, output = [5, 9, 14, 3, 77], [20, 21, 22, 23, 24, 25, 26]
    data = extract_features(small_llama, [(prompt, output)], progress=False)
    drafter = FeatureDrafter.from_target(small_llama, shortlist=torch.arange(97))
    passes = unrolled_outputs(drafter.model, collate(data.sequences, 32), 3, loss_on_prompt=True)
    seq, n = prompt + output, len(prompt) + 3  # committed: the prompt and 3 output tokens
    drafter.begin(DraftRequest(source_ids=torch.tensor([prompt]), source_mask=None, is_encoder_decoder=False,
                               vocab_size=97))
    info = CommitInfo(output_tokens=torch.tensor([output[:3]]), num_accepted=torch.tensor([2]),
                      active=torch.tensor([True]))
    info.hidden_states, info.num_hidden = data.sequences[0].features[None, : n - 1].float(), torch.tensor([n - 1])
    drafter.commit(info)
    with torch.no_grad():
        torch.testing.assert_close(drafter.last_feature()[0], passes[0][0][0, n - 2], rtol=1e-4, atol=1e-4)
        feature = drafter.last_feature()
        for s in (1, 2):
            x = drafter.model.step_input(feature[:, None], torch.tensor([[seq[n - 1 + s]]]))
            feature = drafter._forward(x, torch.tensor([[n - 2 + s]]))[:, 0]
            torch.testing.assert_close(feature[0], passes[s][0][0, n - 2 + s], rtol=1e-4, atol=1e-4)
    masks = [m[0] for _, m in passes]  # pass j trains positions i ≥ j (a real root i − j)
    assert bool(masks[0][0]) and not bool(masks[1][0]) and not bool(masks[2][1]) and bool(masks[2][2])


def test_unrolled_loss_weights_are_decay_powers(small_llama):
    assert unroll_weights(4) == pytest.approx([1.0, 0.8, 0.64, 0.512])
    data = extract_features(small_llama, [([5, 9, 14], [20, 21, 22, 23, 24]), ([8, 21], [30, 31, 32])], progress=False)
    model = FeatureDrafter.from_target(small_llama, shortlist=torch.arange(10, 60)).model
    batch = collate(data.sequences, 32)
    for decay in (0.8, 0.5):
        total, per_step = unrolled_loss(model, batch, steps=3, decay=decay)
        assert len(per_step) == 3 and all(x.item() > 0 for x in per_step)
        expected = sum(decay ** i * x.item() for i, x in enumerate(per_step))
        assert total.item() == pytest.approx(expected, rel=1e-6)
    feature_only, _ = unrolled_loss(model, batch, steps=1, divergence_weight=0.0)
    token_only, _ = unrolled_loss(model, batch, steps=1, feature_weight=0.0, divergence_name="tvd")
    both, _ = unrolled_loss(model, batch, steps=1, divergence_name="tvd", divergence_weight=1.0)
    assert both.item() == pytest.approx(feature_only.item() + 10 * token_only.item(), rel=1e-5)
    assert 0.0 < token_only.item() <= 0.1  # 0.1 × TVD ≤ 0.1


def test_window_keeps_the_output_loss_and_processes_fewer_positions(small_llama):
    """Training windows: a window covering the whole prompt leaves the loss on the output positions
    unchanged (RoPE is relative: renumbering from 0 is harmless); a short window keeps every loss
    position of every pass and runs fewer positions through the drafter's layer."""
    gen = torch.Generator().manual_seed(3)
    pairs = [(torch.randint(3, 97, (40,), generator=gen).tolist(), [20, 21, 22, 23, 24]),
             (torch.randint(3, 97, (31,), generator=gen).tolist(), [30, 31, 32])]
    data = extract_features(small_llama, pairs, progress=False)
    model = FeatureDrafter.from_target(small_llama, shortlist=torch.arange(10, 60)).model
    full = collate(data.sequences, 32)
    covering = collate([window_sequence(s, 38, 3) for s in data.sequences], 32)  # 38 = first loss position
    assert torch.equal(covering.tokens, full.tokens)
    assert torch.equal(collate([window_sequence(s, None, 3) for s in data.sequences], 32).tokens, full.tokens)
    total, per_step = unrolled_loss(model, full, steps=3)
    for window in (38, 39, 1000):
        cropped = [window_sequence(s, window, 3) for s in data.sequences]
        again, again_steps = unrolled_loss(model, collate(cropped, 32), steps=3)
        torch.testing.assert_close(again, total)
        torch.testing.assert_close(torch.stack(again_steps), torch.stack(per_step))
    # a short window: the same output positions train in every pass, through far fewer layer positions
    short = collate([window_sequence(s, 4, 3) for s in data.sequences], 32)
    assert short.tokens.shape[1] == 4 + 2 + 5  # 4 context + the first loss position + 5 outputs (+1 target)
    counts = [[int(m.sum()) for _, m in unrolled_outputs(model, b, 3)] for b in (full, short)]
    assert counts[0] == counts[1] and counts[0][0] == (5 + 1) + (3 + 1)
    assert layer_positions(short, 3) * 3 < layer_positions(full, 3)
    # a window too short for the unrolled passes is widened to steps − 1 positions
    assert window_sequence(data.sequences[0], 0, 3).prompt_len == 2 + 2
    # the trainer crops too: fewer positions per step for the same batches
    stats = [train_feature_drafter(small_llama, config=FeatureTrainConfig(
        max_steps=2, batch_size=2, progress=False, shortlist_size=50, context_window=window), data=data).train_stats
        for window in (None, 4)]
    assert stats[0]["steps"] == stats[1]["steps"] == 2 and stats[1]["positions"] * 3 < stats[0]["positions"]


def test_lr_schedules_and_unroll_ramp(small_llama):
    from fastspec.distill.feature import _lr_factor

    cfg = FeatureTrainConfig(warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    assert _lr_factor(cfg, 0, 0.0) == pytest.approx(0.25)
    assert _lr_factor(cfg, 10, 0.0) == pytest.approx(1.0) and _lr_factor(cfg, 10, 1.0) == pytest.approx(0.1)
    assert _lr_factor(cfg, 10, 0.5) == pytest.approx(0.55)
    assert _lr_factor(FeatureTrainConfig(warmup_steps=1, lr_schedule="linear", min_lr_ratio=0.0), 5, 0.25) == 0.75
    assert _lr_factor(FeatureTrainConfig(warmup_steps=1), 5, 0.9) == 1.0  # constant (the default)
    with pytest.raises(UserError):
        FeatureTrainConfig(lr_schedule="step").check()
    data = extract_features(small_llama, [([5, 9, 14], [20, 21, 22, 23, 24])], progress=False)
    ramped = train_feature_drafter(small_llama, config=FeatureTrainConfig(
        max_steps=4, batch_size=1, unroll_steps=3, unroll_ramp=0.5, progress=False, bf16_autocast=False), data=data)
    # steps 0, 1 train one pass, steps 2, 3 all three: (1 + 1 + 3 + 3) passes over 7 positions
    assert ramped.train_stats["positions"] == 8 * 7 and ramped.train_stats["bf16_autocast"] is False


def test_bf16_autocast_training_runs(small_llama):
    data = extract_features(small_llama, [([5, 9, 14], [20, 21, 22, 23, 24])], progress=False)
    drafter = train_feature_drafter(small_llama, config=FeatureTrainConfig(
        max_steps=2, batch_size=1, progress=False, bf16_autocast=True), data=data)
    assert drafter.train_stats["bf16_autocast"] is True and drafter.model.fc.weight.dtype == torch.float32
    assert torch.isfinite(torch.tensor(drafter.train_stats["final_loss"]))


def test_shortlist_most_frequent_plus_eos():
    counts = torch.tensor([0, 5, 1, 9, 5, 0, 2])
    assert build_shortlist(counts, 3).tolist() == [3, 1, 4]
    assert build_shortlist(counts, 3, always=[5]).tolist() == [3, 1, 5]
    assert build_shortlist(counts, 10).tolist() == [3, 1, 4, 6, 2]
    with pytest.raises(UserError):
        build_shortlist(counts, 0)


def test_feature_data_cache_round_trip(small_llama, tmp_path):
    pairs = [([5, 9, 14], [20, 21, 22, 2]), ([8, 21], [30, 31])]
    settings = dict(layers=eagle3_layers(4), topk=8, cache_dir=str(tmp_path), progress=False)
    data = extract_features(small_llama, pairs, **settings)
    assert data.stats["tokens"] == 11 and data.stats["tokens_per_s"] > 0
    again = extract_features(small_llama, pairs, **settings)
    for a, b in zip(data.sequences, again.sequences):
        assert a.prompt_len == b.prompt_len and torch.equal(a.features, b.features) and torch.equal(a.last, b.last)
        assert a.features.dtype == torch.float16 and a.top_ids.shape == (a.tokens.numel(), 8)
    # teacher positions j ≥ max(1, prompt_len − 1): their logits score an output token (or what follows it)
    assert int(label_counts(data).sum()) == 5 + 3
    with pytest.raises(UserError, match="other pairs"):
        extract_features(small_llama, pairs[:1], **settings)


@pytest.fixture(scope="module")
def bigram_llama():
    """A target whose next token depends on the current token only (attention output zeroed):
    its greedy outputs are learnable from a few dozen sequences."""
    target = _llama(64, seed=5, hidden=64, layers=2)
    with torch.no_grad():
        for layer in target.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return target


def test_training_raises_step1_agreement_on_held_out(bigram_llama, tmp_path):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 64, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(64)]
    pairs = pseudo_pairs(bigram_llama, prompts, max_new_tokens=24, batch_size=32)
    assert all(len(out) >= 1 for _, out in pairs)
    train = extract_features(bigram_llama, pairs[:48], progress=False)
    held_out = extract_features(bigram_llama, pairs[48:], progress=False)
    shortlist = build_shortlist(label_counts(train), 8192, [2])
    untrained = agreement(FeatureDrafter.from_target(bigram_llama, shortlist=shortlist).model, held_out)[0]
    config = FeatureTrainConfig(max_steps=150, lr=2e-3, warmup_steps=10, batch_size=8, progress=False,
                                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=100)
    drafter = train_feature_drafter(bigram_llama, config=config, data=train)
    trained = agreement(drafter.model, held_out)
    assert untrained <= 0.1
    assert trained[0] >= 0.5 and trained[1] >= 0.5  # step 1, and step 2 fed its own feature
    assert drafter.train_stats["steps"] == 150 and latest_checkpoint(str(tmp_path / "ckpt")).endswith("step-00000150")


def test_training_resumes_from_checkpoint_exactly(bigram_llama, tmp_path):
    pairs = [([5, 9, 14], [20, 21, 22, 23, 2]), ([8, 21], [30, 31, 32]), ([40, 41, 42, 43], [44, 45])]
    data = extract_features(bigram_llama, pairs, progress=False)

    def run(folder, steps):
        config = FeatureTrainConfig(max_steps=steps, batch_size=2, progress=False, checkpoint_dir=folder,
                                    checkpoint_every=3, shortlist_size=40)
        return train_feature_drafter(bigram_llama, config=config, data=data)

    straight = run(str(tmp_path / "a"), 8)
    run(str(tmp_path / "b"), 5)  # "interrupted" after 5 steps (checkpoints at 3 and 5)
    resumed = run(str(tmp_path / "b"), 8)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_t5_training_lowers_the_unrolled_loss(tiny_t5):
    pairs = [([21603, 10, 8774, 296, 1], [150, 151, 152, 153, 1]), ([100, 200, 1], [160, 161, 1])]
    data = extract_features(tiny_t5, pairs, progress=False)
    assert data.sequences[0].encoder.shape == (5, 64) and data.sequences[0].prompt_len == 1
    config = FeatureTrainConfig(max_steps=30, lr=3e-3, warmup_steps=1, batch_size=2, progress=False)
    untrained = FeatureDrafter.from_target(tiny_t5, shortlist=build_shortlist(label_counts(data), 8192, [1]))
    batch = collate(data.sequences, 64)
    before, _ = unrolled_loss(untrained.model, batch)
    trained = train_feature_drafter(tiny_t5, config=config, data=data)
    after, _ = unrolled_loss(trained.model, batch)
    assert after.item() < 0.5 * before.item()
