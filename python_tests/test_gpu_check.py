"""bench/gpu_check.py --smoke runs on a CPU, so the one-command GPU check cannot rot.

The smoke run uses tiny sizes; CUDA parts report "skipped: no CUDA" here (after running their
code on the CPU), the CPU parts report real figures.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastspec_subprocess import PACKAGE_ROOT, subprocess_env

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_check.py")
PARTS = ["a_cuda_tests", "b_verify_bandwidth", "c_ngram_device_vs_cpu", "d_e2e_flan_t5_xl_shaped", "e_e2e_smollm2"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], cwd=PACKAGE_ROOT,
                          env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    report_path = out / "gpu_check.json"
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report_path.read_text()), (out / "gpu_check.md").read_text()


def test_smoke_runs_every_part_and_exits_zero(smoke):
    proc, report, md = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(report["parts"]) == PARTS
    assert report["failed_parts"] == []
    env = report["environment"]
    assert env["smoke"] is True and env["torch"] == torch.__version__
    for key in ("transformers", "python", "device"):
        assert env[key]
    for name in PARTS:
        assert name in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_parts_skip_but_run_their_code_on_the_cpu(smoke):
    _, report, _ = smoke
    parts = report["parts"]
    for name in ("a_cuda_tests", "b_verify_bandwidth", "c_ngram_device_vs_cpu"):
        assert parts[name]["status"] == "skipped: no CUDA", parts[name]
    # the CUDA tests were collected and skipped, not missing
    counts = parts["a_cuda_tests"]["results"]["counts"]
    assert counts.get("skipped", 0) > 0 and counts.get("failed", 0) == 0 and counts.get("passed", 0) == 0
    rows = parts["b_verify_bandwidth"]["results"]["cpu_dry_run"]["rows"]
    assert rows and all(r["auto_us"] > 0 and r["bytes"] == r["B"] * (r["gamma"] + 1) * r["V"] * 4 for r in rows)
    assert {r["mode"].split()[0] for r in rows} == {"greedy", "sample"}
    ngram = parts["c_ngram_device_vs_cpu"]["results"]["cpu_dry_run"]["rows"]
    assert ngram and all(r["tokens_equal"] and r["probs_equal"] and r["cpu_ms"] > 0 for r in ngram)


@pytest.mark.parametrize("part", ["d_e2e_flan_t5_xl_shaped", "e_e2e_smollm2"])
def test_end_to_end_parts_have_real_figures(smoke, part):
    _, report, _ = smoke
    entry = report["parts"][part]
    assert entry["status"] == "ok", entry
    res = entry["results"]
    assert res["errors"] == []
    rows = res["rows"]
    assert [r["B"] for r in rows] == ([1, 3] if part.startswith("d") else [1, 2])
    for row in rows:
        assert row["fastspec_ar_equals_hf"] is True  # fp32 on the CPU: token for token
        assert row["distinct_tokens"] > 1  # the random weights do not emit one token forever
        assert row["r"] > 0
        for name in ("fastspec_ar", "hf_generate", "oracle_alpha1", "oracle_alpha0.7", "prompt_lookup"):
            assert row[name]["s"] > 0 and row[name]["tokens_per_s"] > 0
            assert row[name]["identical_to_fastspec_ar"] is True  # lossless greedy
        assert row["oracle_alpha1"]["alpha"] == 1.0
        # every draft accepted: τ = 1 + the mean γ drafted (the last steps draft fewer, up to max_new_tokens)
        oracle = row["oracle_alpha1"]
        assert 1 < oracle["mean_gamma"] <= row["gamma"]
        assert oracle["tau"] == pytest.approx(1 + oracle["mean_gamma"], abs=2e-3)
        assert 0.0 < row["oracle_alpha0.7"]["alpha"] < 1.0
        assert row["oracle_alpha1"]["ideal_speedup"] > 1.0
    one = rows[0]
    assert one["hf_prompt_lookup"]["identical_to_fastspec_ar"] is True
    if part.startswith("d"):
        assert one["hf_assistant"]["s"] > 0
        assert res["target"]["d_model"] == 64 and res["target"]["vocab_size"] == 512
