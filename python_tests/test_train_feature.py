"""`fastspec train --drafter feature` end to end on a tiny FLAN-T5-architecture target saved to
disk (the same one test_cli.py builds): the target's own outputs as data, a loadable drafter
folder, `--resume` continuing to the same weights as one straight run, cheap data kinds, errors."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastspec.cli import main
from fastspec.drafters import FeatureDrafter
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
    assert meta["kind"] == "feature" and training["steps"] == 6 and training["feature_data"] == ["pseudo"]
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
    assert FeatureDrafter.load(str(folder), target=target).hidden_state_layers == (0, -1)
    # -1: whole sequences (no window); the defaults are FeatureTrainConfig's
    assert _train(target_dir, tmp_path, "whole", "--max_steps", "1", "--feature_data", "references",
                  "--context_window", "-1") == 0
    assert seen["config"].context_window is None and seen["config"].lr_schedule == "constant"
    assert seen["config"].shortlist_size == 64 and seen["config"].topk == 32


@pytest.mark.parametrize("flags, message", [
    (["--context_window", "-2"], "--context_window must be >= 0, or -1"),
    (["--topk", "0"], "--topk must be >= 1"),
    (["--min_lr_ratio", "1.5"], "--min_lr_ratio must be in [0, 1]"),
    (["--unroll_ramp", "1"], "--unroll_ramp must be in [0, 1)"),
    (["--time_budget_s", "0"], "--time_budget_s must be > 0"),
    (["--feature_layers", "2,x"], "--feature_layers '2,x': give comma-separated"),
    (["--feature_layers", "5"], "hidden_states are indexed -2..1"),
])
def test_bad_training_options_are_one_line_errors(target_dir, tmp_path, capsys, flags, message):  # noqa: F811
    assert _train(target_dir, tmp_path, "bad", "--max_steps", "1", "--feature_data", "references", *flags) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("fastspec train: error: ") and message in errors[0], errors
