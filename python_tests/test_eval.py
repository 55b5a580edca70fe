"""fastspec eval: α/τ/per-position acceptance equal a hand count, reports and plots are written."""
import json
import os

import pytest
import torch

from fastspec import eval as fseval
from fastspec import report
from fastspec.drafters.oracle import OracleDrafter


class ScriptedDrafter(OracleDrafter):
    """The engine's OracleDrafter with one continuation per prompt (the AR output), corrupting
    every position i with (i + 1) % period == 0, so acceptance is partial and hand-countable.
    Logs every draft of row 0 as (num_generated, tokens), one list per request."""

    def __init__(self, scripts, period=3):
        super().__init__([[]], corrupt_every=period)
        self.scripts = scripts  # {prompt tuple: AR tokens}
        self.log = []

    def begin(self, request):
        key = tuple(request.source_ids[0][request.source_mask[0].bool()].tolist())
        self.continuations = [self.scripts[key]]
        self.log.append([])
        super().begin(request)

    def draft(self, step):
        out = super().draft(step)
        self.log[-1].append((int(step.num_generated[0]), out.tokens[0].tolist()))
        return out


def _prompts(vocab, lengths=(5, 9, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hand_count(log, reference_outputs_by_request, gamma):
    """Accepted drafts per step = longest common prefix of the draft and the AR output there."""
    accepted = drafted = steps = 0
    beta = 0.0  # Σ accepted/drafted per step: α = E[β] (steps near max_new_tokens draft fewer than γ)
    positions = [0] * gamma
    for reference, entries in zip(reference_outputs_by_request, log):
        for n, tokens in entries:
            k = 0
            while k < len(tokens) and n + k < len(reference) and tokens[k] == reference[n + k]:
                k += 1
            accepted += k
            drafted += len(tokens)
            beta += k / len(tokens)
            steps += 1
            for p in range(k):
                positions[p] += 1
    return accepted, drafted, steps, beta / steps, [p / steps for p in positions]


@pytest.mark.parametrize("gamma", [1, 4])
def test_eval_alpha_equals_hand_count(tiny_llama, gamma):
    target = tiny_llama
    vocab = target.config.vocab_size
    prompts = _prompts(vocab)
    max_new = 13
    ar = fseval.decode_all(target, [fseval.Decoder("ar")], prompts, max_new_tokens=max_new, progress=False)["ar"]
    drafter = ScriptedDrafter({tuple(p): o for p, o in zip(prompts, ar.outputs)})
    decoders = [fseval.Decoder("scripted", drafter, gamma), fseval.hf_generate_decoder(target, "hf")]
    result = fseval.evaluate(target, None, decoders, prompts, None, max_new_tokens=max_new, gamma=gamma, progress=False)
    rows = {r["name"]: r for r in result["rows"]}
    row = rows["scripted"]
    accepted, drafted, steps, alpha, positions = _hand_count(drafter.log, ar.outputs, gamma)
    assert 0 < accepted < drafted  # partial acceptance: the count is not trivially 0 or all
    assert row["num_accepted_tokens"] == accepted
    assert row["num_draft_tokens"] == drafted
    assert row["row_steps"] == steps  # drafting steps; the last step of a request may draft nothing
    assert row["acceptance_rate"] == pytest.approx(alpha)
    assert row["mean_accepted_length"] == pytest.approx((accepted + steps) / steps)
    assert row["per_position_acceptance"] == pytest.approx(positions)
    # lossless: greedy outputs are those of the autoregressive run (and of HF generate)
    assert row["identical"] is True
    assert result["runs"]["scripted"].outputs == ar.outputs
    assert result["runs"]["hf"].outputs == ar.outputs and rows["hf"]["identical"] is True
    assert rows[fseval.AR_NAME]["speedup"] == 1.0 and row["speedup"] > 0


def test_eval_detects_wrong_outputs():
    """`identical` must be able to be False: a run with different outputs is flagged."""
    ar = fseval.DecodeRun("ar", None, outputs=[[1, 2, 3]], time_s=1.0)
    other = fseval.DecodeRun("x", 4, outputs=[[1, 2, 4]], time_s=0.5)
    row = fseval.summarize(other, ar, greedy=True)
    assert row["identical"] is False
    assert row["speedup"] == pytest.approx(2.0)
    assert fseval.summarize(other, ar, greedy=False)["identical"] is None


def test_rouge_scores_match_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat is on the mat", "the quick brown dog jumps"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = {k: sum(scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)) / 2 for k in ("rouge1", "rouge2", "rougeL")}
    assert fseval.rouge_scores(preds, refs) == pytest.approx(want)
    assert fseval.rouge_scores(["same words"], ["same words"])["rouge2"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fseval.rouge_scores(["a"], [])


def test_eval_report_files(tiny_llama, tmp_path):
    target = tiny_llama
    vocab = target.config.vocab_size
    prompts = _prompts(vocab, lengths=(6, 4))
    ar = fseval.decode_all(target, [fseval.Decoder("ar")], prompts, max_new_tokens=8, progress=False)["ar"]
    drafter = ScriptedDrafter({tuple(p): o for p, o in zip(prompts, ar.outputs)})
    result = fseval.evaluate(target, None, [fseval.Decoder("scripted", drafter, 3, {"kind": "test", "training": "baseline"})],
                             prompts, None, max_new_tokens=8, gamma=3, progress=False)
    files = fseval.write_eval_report(result, str(tmp_path / "ev"), {"target": "tiny"})
    for key in ("json", "markdown", "per_position", "alpha"):
        assert os.path.getsize(files[key]) > 0
    with open(files["per_position"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.load(open(files["json"]))
    names = [r["name"] for r in data["rows"]]
    assert names == [fseval.AR_NAME, "scripted"]
    md = open(files["markdown"]).read()
    assert "| decoder |" in md and "| scripted |" in md and "baseline" in md
    alpha = data["rows"][1]["acceptance_rate"]
    assert f"{alpha:.3f}" in md


def test_markdown_table_alignment_and_escaping():
    rows = [{"name": "a|b", "x": 1.5}, {"name": "c", "x": None}]
    table = report.markdown_table(rows, [report.Column("name", "n"), report.Column("x", "x", report.fmt_float(1))])
    lines = table.splitlines()
    assert lines[0] == "| n | x |"
    assert lines[1] == "|:---|---:|"
    assert lines[2] == "| a\\|b | 1.5 |"
    assert lines[3] == "| c | – |"
    with pytest.raises(ValueError):
        report.markdown_table(rows, [])


def test_parse_checkpoints_errors(tmp_path):
    (tmp_path / "lstm_kd").mkdir()
    assert fseval.parse_checkpoints([str(tmp_path / "lstm_kd")]) == [("lstm_kd", str(tmp_path / "lstm_kd"))]
    assert fseval.parse_checkpoints([f"kd={tmp_path / 'lstm_kd'}"]) == [("kd", str(tmp_path / "lstm_kd"))]
    with pytest.raises(ValueError, match="no such drafter folder"):
        fseval.parse_checkpoints([str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="unique"):
        fseval.parse_checkpoints([str(tmp_path / "lstm_kd"), str(tmp_path / "lstm_kd")])


def save_tiny_target(folder):
    """A tiny random Llama with SmolLM2's real tokenizer (vocab 49152), saved like a user's local model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastspec.targets import load_smollm2

    _, tokenizer = load_smollm2()
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_eval_cli_baseline_vs_distilled(tmp_path):
    """`fastspec eval --ckpt_path BASE KD --builtin prompt_lookup` on a tiny local target:
    one row per drafter with its training, ROUGE equal to AR's (greedy), JSON + Markdown + plots."""
    from fastspec.cli import main as cli_main
    from fastspec.data import encode_references, load_examples
    from fastspec.distill.trainer import stamp_training
    from fastspec.drafters import NgramDrafter
    from fastspec.data import encode_prompts
    from fastspec.targets import load_target_and_tokenizer

    target_dir = save_tiny_target(tmp_path / "target")
    target, tokenizer = load_target_and_tokenizer(target_dir)
    examples = load_examples("aclsum", split="train", limit=6)
    base = NgramDrafter.create(3, 49152).fit(encode_references(tokenizer, [e.reference for e in examples], max_target_length=64))
    base.save(str(tmp_path / "ngram_base"))
    stamp_training(str(tmp_path / "ngram_base"), {"drafter": "ngram", "loss": 1.0, "kd_loss": 0.0, "distill_method": None})
    prompts = encode_prompts(tokenizer, target, [e.source for e in examples], 256)
    outputs = fseval.decode_all(target, [fseval.Decoder("ar")], prompts, max_new_tokens=8, progress=False)["ar"].outputs
    kd = NgramDrafter.create(3, 49152).fit(outputs)
    kd.save(str(tmp_path / "ngram_kd"))
    stamp_training(str(tmp_path / "ngram_kd"), {"drafter": "ngram", "loss": 0.0, "kd_loss": 1.0, "distill_method": "seq_kd"})

    out = tmp_path / "eval"
    status = cli_main(["eval", "--ckpt_path", f"base={tmp_path / 'ngram_base'}", f"kd={tmp_path / 'ngram_kd'}",
                       "--builtin", "prompt_lookup", "--target", target_dir, "--split", "train", "--num_samples", "3",
                       "--max_new_tokens", "8", "--max_source_length", "256", "--out", str(out), "--no_progress"])
    assert status == 0
    data = json.load(open(out / "results.json"))
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == [fseval.AR_NAME, "base", "kd", "prompt_lookup"]
    assert rows["base"]["training"] == "baseline" and rows["kd"]["training"] == "distilled (seq_kd)"
    assert rows["base"]["kind"] == "ngram"
    for name in ("base", "kd", "prompt_lookup"):
        assert rows[name]["identical"] is True
        for key in ("rouge1", "rouge2", "rougeL"):
            assert rows[name][key] == rows[fseval.AR_NAME][key]  # same outputs, same ROUGE
    # the n-gram fitted on the target's own outputs (the training prompts) predicts them better
    assert rows["kd"]["acceptance_rate"] > rows["base"]["acceptance_rate"]
    md = (out / "report.md").read_text()
    assert "ROUGE-1" in md and "distilled (seq_kd)" in md
    assert (out / "alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --replay: the same α, τ and per-position acceptance with no target forward per step
    replay_out = tmp_path / "replay"
    status = cli_main(["eval", "--ckpt_path", f"base={tmp_path / 'ngram_base'}", f"kd={tmp_path / 'ngram_kd'}",
                       "--builtin", "prompt_lookup", "--target", target_dir, "--split", "train", "--num_samples", "3",
                       "--max_new_tokens", "8", "--max_source_length", "256", "--out", str(replay_out),
                       "--no_progress", "--replay"])
    assert status == 0
    replayed = {r["name"]: r for r in json.load(open(replay_out / "results.json"))["rows"]}
    assert list(replayed) == ["base", "kd", "prompt_lookup"]
    for name, row in replayed.items():
        for key in ("acceptance_rate", "mean_accepted_length", "num_accepted_tokens", "num_draft_tokens", "row_steps"):
            assert row[key] == pytest.approx(rows[name][key]), (name, key)
        assert row["per_position_acceptance"] == pytest.approx(rows[name]["per_position_acceptance"])
        assert row["c"] > 0 and row["ideal_speedup"] > 0


def test_eval_cli_user_errors(tmp_path, capsys):
    from fastspec.cli import main as cli_main

    assert cli_main(["eval", "--ckpt_path", str(tmp_path / "nope"), "--target", "smollm2"]) == 2
    assert "no such drafter folder" in capsys.readouterr().err
    assert cli_main(["eval", "--target", "smollm2"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_eval_c_and_ideal_speedup_are_those_of_the_merged_engine_metrics(tiny_llama, monkeypatch):
    """eval derives α, τ, c and the ideal speedup from the sum of the engine's metrics (one
    definition, fastspec.metrics), not from its own sums; before, c divided by the time of every
    target call, prefill included, and disagreed with metrics.c."""
    from fastspec import engine
    from fastspec.metrics import GenerationMetrics

    target = tiny_llama
    prompts = _prompts(target.config.vocab_size)
    ar = fseval.decode_all(target, [fseval.Decoder("ar")], prompts, max_new_tokens=10, progress=False)["ar"]
    drafter = ScriptedDrafter({tuple(p): o for p, o in zip(prompts, ar.outputs)})
    reported = []
    real_generate = engine.generate

    def recording_generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        if args[1] is drafter:
            reported.append(out.metrics)
        return out

    monkeypatch.setattr(engine, "generate", recording_generate)
    result = fseval.evaluate(target, None, [fseval.Decoder("scripted", drafter, 3)], prompts, None,
                             max_new_tokens=10, gamma=3, progress=False)
    row = next(r for r in result["rows"] if r["name"] == "scripted")
    merged = sum(reported, GenerationMetrics())
    assert len(reported) == len(prompts) and isinstance(merged, GenerationMetrics)
    assert row["acceptance_rate"] == pytest.approx(merged.acceptance_rate) and 0 < row["acceptance_rate"] < 1
    assert row["mean_accepted_length"] == pytest.approx(merged.mean_accepted_length)
    assert row["per_position_acceptance"] == pytest.approx(merged.per_position_acceptance)
    assert row["c"] == pytest.approx(merged.c)
    assert row["ideal_speedup"] == pytest.approx(merged.ideal_speedup)
    assert result["runs"]["scripted"].metrics.c == pytest.approx(merged.c)
    # c divides by decode-step forwards only: the prefill (one target call per prompt) is not one
    assert row["verify_calls"] == merged.verify_calls == row["num_steps"] == row["target_calls"] - len(prompts)
    assert row["c"] > 0
