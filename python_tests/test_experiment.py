"""``fastspec experiment distill``: bootstrap intervals, the grid on a tiny target (α equal to the
engine's, ratios, failed cells reported and retried, resume), and the real --quick grid (slow)."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastspec import engine
from fastspec.distill.pseudo import SourceRecord
from fastspec.drafters.io import load_drafter
from fastspec.errors import UserError
from fastspec.eval import experiment
from fastspec.eval.bootstrap import alpha_interval, ratio_interval, ratio_of_sums, resample_indices
from fastspec.eval.experiment import GridSettings, check_finite, check_settings, prepare_data, read_cell, run_grid
from fastspec_subprocess import subprocess_env  # the fastspec under test (installed in CI, with fastspec._C)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    widths = []
    for prompts in (20, 320):
        steps = rng.integers(5, 15, size=prompts).astype(float)
        beta = rng.binomial(steps.astype(int), 0.4).astype(float)
        index = resample_indices(prompts, 2000, seed=1)
        low, high = alpha_interval(beta, steps, index)
        alpha = beta.sum() / steps.sum()
        assert low < alpha < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(16) = 1/4 in theory


def test_bootstrap_coverage_is_near_95_percent():
    """Draw many data sets with a known α; the 95% interval must hold it in about 95% of them."""
    rng = np.random.default_rng(3)
    hits, trials = 0, 300
    for trial in range(trials):
        steps = np.full(40, 10.0)
        beta = rng.binomial(10, 0.3, size=40).astype(float)
        low, high = alpha_interval(beta, steps, resample_indices(40, 400, seed=trial))
        hits += low <= 0.3 <= high
    assert 0.89 <= hits / trials <= 0.99


def test_paired_ratio_interval():
    steps = np.full(30, 10.0)
    base = np.arange(30, dtype=float) % 7
    index = resample_indices(30, 500, seed=0)
    assert ratio_interval((base, steps), (base, steps), index) == (1.0, 1.0)  # same cell: exactly 1
    low, high = ratio_interval((2 * base, steps), (base, steps), index)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)  # paired: the draw cancels
    doubled = ratio_of_sums(base, steps, index)
    assert doubled.shape == (500,)


def test_bootstrap_bad_input():
    with pytest.raises(UserError, match="≥ 1 prompt"):
        resample_indices(0, 10)
    with pytest.raises(UserError, match=r"\[P\] arrays"):
        ratio_of_sums([1.0, 2.0], [1.0], resample_indices(2, 3))


# --------------------------------------------------------------------------- the grid on a tiny target


def _records(seed, count, vocab=3001):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        source = torch.randint(3, vocab, (int(torch.randint(6, 14, (1,), generator=gen)),), generator=gen).tolist()
        reference = torch.randint(3, vocab, (8,), generator=gen).tolist() + [2]
        out.append(SourceRecord(i, f"r{i}", source, reference))
    return out


TINY = dict(target="tiny", num_train=6, num_test=4, max_new_tokens=10, gamma=3, topk_logits=8, pseudo_batch_size=3,
            batch_size=3, neural_steps=3, layer_skip_steps=2, layer_skip_layers=1, feature_steps=3,
            on_policy_max_new_tokens=4, speed_prompts=2, resamples=200, max_source_length=64, max_target_length=16,
            workers=1)


@pytest.fixture(scope="module")
def grid(tiny_llama, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grid"))
    settings = GridSettings(**TINY, drafters=("ngram", "cnn", "lstm", "layer_skip", "feature"),
                            methods=("baseline", "seq_kd", "fkl_T2", "on_policy"))
    check_settings(out, settings)
    test_prompts = [r.source_ids for r in _records(99, 4)]
    data = prepare_data(tiny_llama, _records(1, 6), test_prompts, settings, os.path.join(out, "data"), progress=False)
    summary = run_grid(tiny_llama, data, settings, out, progress=False)
    return out, settings, data, summary


def test_grid_cells_and_files(grid):
    out, settings, _, summary = grid
    names = {(c["drafter"], c["method"]) for c in summary["cells"]}
    expected = {(d, m) for d in settings.drafters for m in settings.methods if experiment.applies(d, m)}
    assert names == expected and ("ngram", "fkl_T2") not in names and ("feature", "on_policy") not in names
    assert all(c["status"] == "ok" for c in summary["cells"]), [c.get("error") for c in summary["cells"]]
    saved = json.load(open(os.path.join(out, "results.json")))
    assert len(saved["cells"]) == len(expected) and saved["settings"]["num_test"] == 4
    assert os.path.getsize(os.path.join(out, "alpha.png")) > 1000
    assert "| drafter | method | α |" in open(os.path.join(out, "results.md")).read()
    for cell in saved["cells"]:
        low, high = cell["alpha_ci"]
        assert low <= cell["alpha"] + 1e-12 and cell["alpha"] <= high + 1e-12
        if cell["method"] != "baseline":
            base = next(c for c in saved["cells"] if c["drafter"] == cell["drafter"] and c["method"] == "baseline")
            if base["alpha"] > 0:
                assert cell["ratio"] == pytest.approx(cell["alpha"] / base["alpha"])
    # the speed check ran the real engine with each drafter's best cell: identical to AR, c measured
    for drafter, row in summary["speed"].items():
        assert row["identical"] is True and row["ar_matches_cache"] is True and row["c"] > 0


def test_grid_alpha_equals_the_engine(grid, tiny_llama):
    """Replay's α of a cell = the α the engine measures with that cell's drafter, prompt by prompt."""
    out, settings, data, summary = grid
    for name in ("lstm-fkl_T2", "feature-seq_kd", "ngram-baseline"):
        drafter = load_drafter(os.path.join(out, "cells", name, "drafter"), tiny_llama)
        beta, steps = 0.0, 0
        for prompt in data.test_prompts:
            result = engine.generate(tiny_llama, drafter, torch.tensor([prompt]), gamma=settings.gamma,
                                     max_new_tokens=settings.max_new_tokens, do_sample=False)
            beta, steps = beta + result.metrics.beta_sum, steps + result.metrics.row_steps
        cell = next(c for c in summary["cells"] if f"{c['drafter']}-{c['method']}" == name)
        assert cell["alpha"] == pytest.approx(beta / steps, abs=1e-12)


def test_workers_give_the_cells_one_process_gives(grid, tiny_llama, tmp_path):
    """--workers 2: the cells run in spawned processes and come out as in one process."""
    out, settings, data, summary = grid
    names = ("lstm-seq_kd", "feature-baseline", "feature-fkl_T2", "ngram-seq_kd")
    parallel = replace(settings, workers=2)
    cells = [tuple(name.split("-", 1)) for name in names]
    results = {f"{r['drafter']}-{r['method']}": r for r in
               experiment.run_cells(tiny_llama, data, parallel, str(tmp_path), cells, progress=False)}
    assert sorted(results) == sorted(names)
    for name in names:
        one = read_cell(out, *name.split("-", 1))
        assert results[name]["status"] == "ok", results[name].get("error")
        assert results[name]["alpha"] == one["alpha"] and results[name]["beta_sums"] == one["beta_sums"]
        assert read_cell(str(tmp_path), *name.split("-", 1))["alpha"] == one["alpha"]


def test_on_policy_cells_continue_the_baseline_drafter(grid, tiny_llama, tmp_path):
    """on_policy = the baseline cell's drafter + on_policy_steps of KD on its own samples: same sizes
    and shortlist as the baseline, weights moved a little from it (a fresh init is far away). Without
    a finished baseline the cell fails with one line."""
    out, settings, data, _ = grid
    for kind in ("cnn", "lstm", "layer_skip"):
        base, on = (load_drafter(os.path.join(out, "cells", f"{kind}-{m}", "drafter"), tiny_llama)
                    for m in ("baseline", "on_policy"))
        if kind == "layer_skip":
            a, b = base.exit_head.state_dict(), on.exit_head.state_dict()
            assert torch.equal(base.shortlist.shortlist_ids, on.shortlist.shortlist_ids)
        else:
            a, b = base.model.state_dict(), on.model.state_dict()
            assert torch.equal(base.model.shortlist_ids, on.model.shortlist_ids)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
        assert moved, kind
        for k in moved:
            assert float((b[k] - a[k]).norm() / a[k].norm().clamp_min(1e-6)) < 0.5, (kind, k)
    result = experiment.run_cell(tiny_llama, data, "cnn", "on_policy", settings, str(tmp_path), progress=False)
    assert result["status"] == "failed" and "cnn-baseline cell, which has not finished" in result["error"]


def test_failed_cell_is_reported_and_retried(tiny_llama, tmp_path):
    out = str(tmp_path)
    settings = GridSettings(**TINY, drafters=("lstm",), methods=("baseline", "fkl_T1"))
    check_settings(out, settings)
    data = prepare_data(tiny_llama, _records(1, 6), [r.source_ids for r in _records(5, 3)], settings,
                        os.path.join(out, "data"), progress=False)
    logits_dir = os.path.join(data.pseudo_dir, "logits")
    files = sorted(os.listdir(logits_dir))
    good = {f: open(os.path.join(logits_dir, f), "rb").read() for f in files}
    for f in files:  # a corrupt cache file
        with open(os.path.join(logits_dir, f), "wb") as handle:
            handle.write(b"not safetensors")
    summary = run_grid(tiny_llama, data, settings, out, progress=False)
    status = {c["method"]: c for c in summary["cells"]}
    assert status["baseline"]["status"] == "ok"
    assert status["fkl_T1"]["status"] == "failed" and "\n" not in status["fkl_T1"]["error"]
    assert "FAILED" in open(os.path.join(out, "results.md")).read()
    baseline_stamp = os.path.getmtime(os.path.join(out, "cells", "lstm-baseline", "result.json"))
    for f, content in good.items():
        with open(os.path.join(logits_dir, f), "wb") as handle:
            handle.write(content)
    summary = run_grid(tiny_llama, data, settings, out, progress=False)  # the rerun: retries only the failed cell
    assert all(c["status"] == "ok" for c in summary["cells"])
    assert os.path.getmtime(os.path.join(out, "cells", "lstm-baseline", "result.json")) == baseline_stamp
    assert read_cell(out, "lstm", "fkl_T1")["status"] == "ok"


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    check_settings(str(tmp_path), GridSettings(**TINY))
    check_settings(str(tmp_path), GridSettings(**dict(TINY, resamples=50)))  # free: does not change a cell
    with pytest.raises(UserError, match="other settings.*neural_steps"):
        check_settings(str(tmp_path), GridSettings(**dict(TINY, neural_steps=9)))


def test_nan_weights_fail_the_cell(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.0, float("nan")])}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="NaN"):
        check_finite(str(tmp_path))
    with pytest.raises(UserError, match="loss became NaN"):
        check_finite(str(tmp_path), [float("nan")])


def test_cli_rejects_bad_flags(tmp_path):
    from fastspec.cli import main

    assert main(["experiment", "distill", "--out", str(tmp_path), "--num_test", "0"]) == 2
    assert main(["experiment", "distill", "--out", str(tmp_path), "--methods", "seq_kd"]) == 2
    assert main(["experiment", "distill", "--out", str(tmp_path), "--workers", "-1"]) == 2


# --------------------------------------------------------------------------- the real grid


@pytest.mark.slow
def test_quick_grid_on_smollm2(tmp_path):
    """`fastspec experiment distill --quick` end to end on the real SmolLM2 + aclsum (≤ 10 min)."""
    out = str(tmp_path / "grid")
    run = subprocess.run([sys.executable, "-m", "fastspec.cli", "experiment", "distill", "--out", out, "--quick",
                          "--no_progress"], capture_output=True, text=True, timeout=1500, env=subprocess_env(),
                         cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.load(open(os.path.join(out, "results.json")))
    cells = {(c["drafter"], c["method"]) for c in saved["cells"]}
    assert len(cells) == sum(experiment.applies(d, m) for d in experiment.DRAFTERS for m in experiment.METHODS)
    assert all(c["status"] == "ok" for c in saved["cells"])
    assert all(row["identical"] is True for row in saved["speed"].values())
    assert set(saved["speed"]) == set(experiment.DRAFTERS)
