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
    assert meta["kind"] == "feature" and training["steps"] == 6 and training["feature_data"] == "pseudo"
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
