"""`fastspec train --drafter feature` end to end on a tiny FLAN-T5-architecture target saved to
disk (the same one test_cli.py builds): the target's own outputs as data, a loadable drafter
folder, `--resume` continuing to the same weights as one straight run, cheap data kinds, errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastspec.cli import main
from fastspec.drafters import FeatureDrafter, load_drafter
from fastspec.drafters.feature import TRAINED_CONFIDENCE_THRESHOLD
from fastspec.targets import load_target_and_tokenizer
from test_cli import target_dir  # noqa: F401  (the tiny saved target fixture)
from test_feature_drafter import one_thread  # noqa: F401  (autouse: one torch thread)




def _train(target_dir, root, name, *extra):
    argv = ["train", "--drafter", "feature", "--target", target_dir, "--exp_name", name, "--output_root", str(root),
            "--dataset", "aclsum", "--num_samples", "4", "--max_source_length", "48", "--max_target_length", "6",
            "--batch_size", "2", "--shortlist", "64", "--unroll", "2", "--distill_method", "jsd", "--kd_temp", "2",
            "--ckpt_every", "2", "--no_progress", *extra]
    return main(argv)


def test_train_writes_a_loadable_drafter_and_resume_continues(target_dir, tmp_path, capsys):  # noqa: F811
    assert _train(target_dir, tmp_path, "straight", "--max_steps", "6") == 0
    assert _train(target_dir, tmp_path, "resumed", "--max_steps", "4") == 0
    assert _train(target_dir, tmp_path, "resumed", "--max_steps", "6", "--resume") == 0
    out = capsys.readouterr().out
    assert "6 steps" in out
    folder = tmp_path / "resumed" / "drafter"
    meta = json.load(open(folder / "config.json"))
    training = meta["config"]["training"]
    assert meta["kind"] == "feature" and training["steps"] == 6 and training["feature_data"] == ["pseudo", "references", "papers"]
    assert training["distill_method"] == "jsd" and training["unroll"] == 2 and training["shortlist"] <= 64
    # resuming from step 4 reaches the weights of one straight 6-step run
    resumed, straight = load_file(str(folder / "model.safetensors")), load_file(
        str(tmp_path / "straight" / "drafter" / "model.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
    target, _ = load_target_and_tokenizer(target_dir)
    drafter = FeatureDrafter.load(str(folder), target=target)
    assert drafter.hidden_state_layers == (-1,) and drafter.model.head.out_features == training["shortlist"]
    from fastspec.drafters.io import load_drafter

    assert isinstance(load_drafter(str(folder), target), FeatureDrafter)


def test_feature_data_kinds_are_pooled(target_dir, tmp_path):  # noqa: F811
    """--feature_data references sources: both kinds' pairs, in that order, one of each per record."""
    assert _train(target_dir, tmp_path, "one", "--max_steps", "1", "--feature_data", "references") == 0
    assert _train(target_dir, tmp_path, "two", "--max_steps", "1", "--feature_data", "sources") == 0
    assert _train(target_dir, tmp_path, "both", "--max_steps", "1", "--feature_data", "references", "sources",
                  "references") == 0
    pairs = {name: json.load(open(tmp_path / name / "feature_pairs.json")) for name in ("one", "two", "both")}
    assert pairs["both"] == pairs["one"] + pairs["two"]
    meta = json.load(open(tmp_path / "both" / "drafter" / "config.json"))
    assert meta["config"]["training"]["feature_data"] == ["references", "sources"]


@pytest.mark.parametrize("kind", ["references", "sources"])
def test_teacher_forced_data_needs_no_generation(target_dir, tmp_path, kind, monkeypatch):  # noqa: F811
    import fastspec.distill.feature as feature

    def no_generation(*args, **kwargs):
        raise AssertionError("generated with --feature_data " + kind)

    monkeypatch.setattr(feature, "pseudo_pairs", no_generation)
    assert _train(target_dir, tmp_path, kind, "--max_steps", "1", "--feature_data", kind) == 0
    pairs = json.load(open(tmp_path / kind / "feature_pairs.json"))
    assert len(pairs) == 4 and all(len(output) > 0 for _, output in pairs)


def test_sequence_level_methods_are_user_errors(target_dir, tmp_path, capsys):  # noqa: F811
    assert _train(target_dir, tmp_path, "bad", "--max_steps", "1", "--distill_method", "seq_kd") == 2
    assert "--drafter feature takes --distill_method" in capsys.readouterr().err


def test_training_options_reach_the_trainer_and_the_metadata(target_dir, tmp_path, monkeypatch):  # noqa: F811
    import fastspec.distill.train_cli as train_cli

    seen = {}
    real = train_cli.train_feature_drafter

    def spy(target, pairs, config):
        seen["config"] = config
        return real(target, pairs, config)

    monkeypatch.setattr(train_cli, "train_feature_drafter", spy)
    assert _train(target_dir, tmp_path, "opts", "--max_steps", "3", "--feature_data", "references",
                  "--context_window", "4", "--lr_schedule", "cosine", "--min_lr_ratio", "0.2", "--unroll_ramp", "0.5",
                  "--time_budget_s", "600", "--topk", "8", "--feature_layers", "0,-1") == 0
    config = seen["config"]
    assert (config.context_window, config.lr_schedule, config.min_lr_ratio, config.unroll_ramp) == (4, "cosine", 0.2, 0.5)
    assert (config.time_budget_s, config.topk, config.feature_layers) == (600.0, 8, (0, -1))
    folder = tmp_path / "opts" / "drafter"
    training = json.load(open(folder / "config.json"))["config"]["training"]
    assert training["context_window"] == 4 and training["lr_schedule"] == "cosine" and training["min_lr_ratio"] == 0.2
    assert training["unroll_ramp"] == 0.5 and training["time_budget_s"] == 600 and training["topk"] == 8
    assert training["feature_layers"] == [0, -1] and training["steps"] == 3
    target, _ = load_target_and_tokenizer(target_dir)
    loaded = FeatureDrafter.load(str(folder), target=target)
    assert loaded.hidden_state_layers == (0, -1)
    # the default threshold is saved with the drafter, and load() / load_drafter apply it
    assert training["confidence_threshold"] == TRAINED_CONFIDENCE_THRESHOLD == 0.4
    assert loaded.confidence_threshold == 0.4 and load_drafter(str(folder), target).confidence_threshold == 0.4
    assert FeatureDrafter.load(str(folder), target=target, confidence_threshold=0.0).confidence_threshold == 0.0
    # -1: whole sequences (no window); the defaults are FeatureTrainConfig's
    assert _train(target_dir, tmp_path, "whole", "--max_steps", "1", "--feature_data", "references",
                  "--context_window", "-1") == 0
    assert seen["config"].context_window is None and seen["config"].lr_schedule == "constant"
    assert seen["config"].shortlist_size == 64 and seen["config"].topk == 32
    assert _train(target_dir, tmp_path, "eager", "--max_steps", "1", "--feature_data", "references",
                  "--confidence_threshold", "0") == 0
    assert FeatureDrafter.load(str(tmp_path / "eager" / "drafter"), target=target).confidence_threshold == 0.0


@pytest.mark.parametrize("flags, message", [
    (["--context_window", "-2"], "--context_window must be >= 0, or -1"),
    (["--topk", "0"], "--topk must be >= 1"),
    (["--min_lr_ratio", "1.5"], "--min_lr_ratio must be in [0, 1]"),
    (["--unroll_ramp", "1"], "--unroll_ramp must be in [0, 1)"),
    (["--time_budget_s", "0"], "--time_budget_s must be > 0"),
    (["--confidence_threshold", "1"], "--confidence_threshold must be in [0, 1)"),
    (["--feature_layers", "2,x"], "--feature_layers '2,x': give comma-separated"),
    (["--feature_layers", "5"], "hidden_states are indexed -2..1"),
])
def test_bad_training_options_are_one_line_errors(target_dir, tmp_path, capsys, flags, message):  # noqa: F811
    assert _train(target_dir, tmp_path, "bad", "--max_steps", "1", "--feature_data", "references", *flags) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("fastspec train: error: ") and message in errors[0], errors


def test_papers_are_the_training_records_own_papers_cut_and_capped(target_dir, tmp_path):  # noqa: F811
    """--feature_data papers: 256-token pieces of the train records' full papers only (never a test
    paper: a paper holds its abstract and summary), ≤ --paper_tokens tokens, no generation."""
    from fastspec.data import load_examples
    from fastspec.distill.feature_data import text_chunk_pairs
    from fastspec.targets import load_target_and_tokenizer

    assert _train(target_dir, tmp_path, "papers", "--max_steps", "1", "--feature_data", "papers",
                  "--paper_tokens", "700") == 0
    pairs = json.load(open(tmp_path / "papers" / "feature_pairs.json"))
    _, tokenizer = load_target_and_tokenizer(target_dir)
    train_ids = [e.id for e in load_examples("aclsum", "train", limit=4)]
    papers = {p.id: p.source for p in load_examples("aclsum_papers", "all")}
    expected = text_chunk_pairs(tokenizer, [papers[i] for i in train_ids], budget=700, seq2seq=True)
    assert pairs == [[list(p), list(o)] for p, o in expected]
    assert 700 <= sum(len(o) for _, o in pairs) < 700 + 256 and all(len(o) <= 256 for _, o in pairs)
    first_paper = tokenizer(papers[train_ids[0]], add_special_tokens=False, verbose=False)["input_ids"]
    assert pairs[0][1] == first_paper[:256]  # T5: the decoder reads the encoder's piece


def test_text_chunk_pairs_causal_pieces_rebuild_the_text():
    class Words:  # a stand-in tokenizer: one id per word
        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": [len(w) for w in text.split()]}

    from fastspec.distill.feature_data import text_chunk_pairs

    texts = ["a bb ccc dddd eeeee", "ff g", "hhh ii"]
    pairs = text_chunk_pairs(Words(), texts, chunk=3, budget=7)
    assert pairs == [([1], [2, 3]), ([4], [5]), ([2], [1])]  # 3 + 2 + 2 tokens: the budget reached, then stop
    assert all(len(p) + len(o) <= 3 for p, o in pairs)


def test_papers_need_aclsum_records(target_dir):  # noqa: F811
    from fastspec.distill.students import TrainingError
    from fastspec.distill.train_cli import feature_pairs
    from fastspec.targets import load_target_and_tokenizer

    target, tokenizer = load_target_and_tokenizer(target_dir)
    with pytest.raises(TrainingError, match="not aclsum examples"):
        feature_pairs(target, [{"id": "cnn-0001", "source_ids": [5, 6]}], "papers", max_new_tokens=4, tokenizer=tokenizer)


def test_feature_runs_are_bounded_by_time_by_default(target_dir, tmp_path, monkeypatch):  # noqa: F811
    """No --max_steps and no --time_budget_s: the feature run stops after FEATURE_TIME_BUDGET_S, uncapped in steps."""
    from dataclasses import replace

    import fastspec.distill.train_cli as train_cli

    seen = {}
    real = train_cli.train_feature_drafter

    def spy(target, pairs, config):
        seen["config"] = config
        return real(target, pairs, replace(config, max_steps=1))

    monkeypatch.setattr(train_cli, "train_feature_drafter", spy)
    assert _train(target_dir, tmp_path, "timed", "--feature_data", "references") == 0
    assert seen["config"].max_steps is None and seen["config"].time_budget_s == train_cli.FEATURE_TIME_BUDGET_S == 900
    assert _train(target_dir, tmp_path, "stepped", "--feature_data", "references", "--max_steps", "2") == 0
    assert seen["config"].max_steps == 2 and seen["config"].time_budget_s is None
