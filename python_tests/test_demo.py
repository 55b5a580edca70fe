"""`fastspec demo`: the main job end to end on the real SmolLM2-135M + aclsum (--quick), and
its verdict on a tiny saved target (exit status 1 when an output differs from AR)."""
import json
import subprocess
import sys

import pytest

from fastspec_subprocess import PACKAGE_ROOT as REPO, subprocess_env  # the fastspec under test
DRAFTER_ROWS = ["n-gram (pseudo)", "prompt lookup", "prompt lookup + n-gram", "LSTM (KD)", "ensemble"]
FEATURE_ROWS = ["feature (EAGLE)", "prompt lookup + feature"]
PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_demo_quick_end_to_end(tmp_path):
    """The README's `fastspec demo`, quick mode, as a subprocess through the real CLI."""
    out = tmp_path / "demo"
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, "-m", "fastspec.cli", "demo", "--quick", "--out", str(out), "--no_progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log

    results = json.load(open(out / "results.json"))
    rows = {r["name"]: r for r in results["rows"]}
    drafter_rows = DRAFTER_ROWS + FEATURE_ROWS
    assert ["autoregressive", "HF generate"] + drafter_rows == [r["name"] for r in results["rows"]]
    settings = results["settings"]
    # dtype auto: bf16 on a CPU with bf16 matrix units (AMX), else fp32
    assert settings["dtype"] in ("float32", "bfloat16") and f"{settings['dtype']} " in proc.stdout
    # greedy speculative outputs are token-for-token those of AR (in bf16: or part at a near-tie)
    exact = settings["dtype"] == "float32"
    near_tie_verdict = f"part from autoregressive decoding only at near-ties of the {settings['dtype']} target (lossless)"
    assert "all greedy outputs are identical to autoregressive decoding (lossless)" in proc.stdout or (
        not exact and near_tie_verdict in proc.stdout)
    for r in results["rows"] + results["gamma_sweep"]["rows"]:
        assert r["identical"] is True or (not exact and r["divergence_near_tie"] is True), r
    ar_tokens = rows["autoregressive"]["new_tokens"]
    assert ar_tokens > 0
    for name in drafter_rows:
        row = rows[name]
        assert row["new_tokens"] == ar_tokens or not exact
        assert row["num_draft_tokens"] > 0 and 0.0 <= row["acceptance_rate"] <= 1.0
        # τ per step that verified drafts (prompt lookup skips drafting where nothing matches)
        assert 0 < row["row_steps"] <= row["num_steps"]
        assert row["mean_accepted_length"] == pytest.approx(1 + row["num_accepted_tokens"] / row["row_steps"])
        assert row["ideal_speedup"] > 0 and row["tokens_per_s"] > 0
        assert len(row["per_position_acceptance"]) == 5
    # SmolLM2 paraphrases more than it copies (α ≈ 0.05–0.15 here), but copied phrases do get accepted
    assert rows["prompt lookup"]["num_accepted_tokens"] > 0

    report = (out / "report.md").read_text()
    assert "| decoder | γ | α | τ | tokens/s | speedup vs AR | ideal speedup | identical to AR |" in report
    for name in ["autoregressive"] + drafter_rows:
        line = next(l for l in report.splitlines() if l.startswith(f"| {name} |"))
        assert "| **NO** |" not in line or not exact, line
    alpha = rows["prompt lookup"]["acceptance_rate"]
    assert f"| prompt lookup | 5 | {alpha:.3f} |" in report
    for png in ("per_position_acceptance.png", "speedup_vs_gamma.png"):
        assert _is_png(out / png)


@pytest.fixture(scope="module")
def tiny_saved_target(tmp_path_factory):
    from test_eval import save_tiny_target

    return save_tiny_target(tmp_path_factory.mktemp("tiny_target"))


def _demo_args(target, out):
    from fastspec.cli import build_parser

    return build_parser().parse_args([
        "demo", "--target", target, "--out", str(out), "--num_train", "4", "--num_test", "2", "--max_new_tokens", "8",
        "--lstm_steps", "2", "--no_hf", "--no_progress", "--no_cache", "--feature_budget_s", "3", "--dtype", "float32",
    ])


def test_demo_on_local_target_writes_report(tiny_saved_target, tmp_path, monkeypatch):
    from fastspec import demo

    monkeypatch.setenv("FASTSPEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert demo.main(_demo_args(tiny_saved_target, out)) == 0
    results = json.load(open(out / "results.json"))
    assert [r["name"] for r in results["rows"]] == ["autoregressive"] + DRAFTER_ROWS + FEATURE_ROWS
    assert all(r["identical"] is True for r in results["rows"])
    assert results["settings"]["dtype"] == "float32"
    assert results["settings"]["feature drafter"].split()[0].isdigit()  # "<steps> steps in ..."
    report = (out / "report.md").read_text()
    assert "| prompt lookup + feature |" in report and "token agreement" in report
    assert _is_png(out / "per_position_acceptance.png") and _is_png(out / "speedup_vs_gamma.png")
    assert (out / "pseudo" / "pseudo.jsonl").exists()


def test_demo_exits_nonzero_when_outputs_differ(tiny_saved_target, tmp_path, monkeypatch, capsys):
    """A speculative output that differs from AR must fail the demo (exit status 1)."""
    import fastspec
    from fastspec import demo, engine

    real_generate = engine.generate

    def corrupted(target, drafter=None, *args, **kwargs):
        out = real_generate(target, drafter, *args, **kwargs)
        if drafter is not None:
            out.sequences[0, -1] = (out.sequences[0, -1] + 1) % 49152
        return out

    monkeypatch.setattr(engine, "generate", corrupted)
    monkeypatch.setattr(fastspec, "generate", corrupted, raising=False)
    monkeypatch.setenv("FASTSPEC_CACHE", str(tmp_path / "cache"))
    assert demo.main(_demo_args(tiny_saved_target, tmp_path / "demo")) == 1
    assert "ERROR: greedy outputs differ" in capsys.readouterr().out


def test_dataset_spec_for_flan_t5_users(tmp_path):
    """`--dataset cnn_dailymail:/path` reaches the CNN/DM loader with the path; aclsum specs pass through."""
    from fastspec.data import load_examples
    from fastspec.demo import _dataset_spec

    assert _dataset_spec("aclsum") == "aclsum" and _dataset_spec("aclsum:introduction") == "aclsum:introduction"
    path = tmp_path / "cnndm.jsonl"
    path.write_text(json.dumps({"article": "A long article about a cat.", "highlights": "Cat story."}) + "\n")
    spec = _dataset_spec(f"cnn_dailymail:{path}")
    assert spec == str(path)
    examples = load_examples(spec, split="train")
    assert [(e.source, e.reference) for e in examples] == [("A long article about a cat.", "Cat story.")]
