"""`fastspec` CLI end to end on a tiny FLAN-T5-architecture target saved to disk (real T5
tokenizer, aclsum data): pseudo (+ kill/resume, + torchrun), train, generate, error paths."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from distill_helpers import t5_tokenizer_dir, tiny_t5
from fastspec.cli import main

from fastspec_subprocess import PACKAGE_ROOT as REPO, subprocess_env  # the fastspec under test


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny FLAN-T5-architecture target (vocab 32128) + the real T5 tokenizer, on disk."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("target")
    model = tiny_t5(vocab_size=32128, seed=3, d_model=32)
    with torch.no_grad():  # spread-out weights: varied outputs instead of one token forever
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
    model.generation_config.max_length = None
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(t5_tokenizer_dir()).save_pretrained(folder)
    return str(folder)


def _run_cli(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _env():
    env = subprocess_env(OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


PSEUDO = ["pseudo", "--dataset", "aclsum", "--max_new_tokens", "6", "--no_progress", "--max_source_length", "64"]


def test_pseudo_matches_target_greedy(target_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    out = tmp_path / "pseudo"
    status, stdout, _ = _run_cli(PSEUDO + ["--target", target_dir, "--num_samples", "5", "--batch_size", "2", "--out", str(out)], capsys)
    assert status == 0 and "5 records" in stdout
    records = [json.loads(l) for l in open(out / "pseudo.jsonl")]
    model = T5ForConditionalGeneration.from_pretrained(target_dir).eval()
    tok = AutoTokenizer.from_pretrained(target_dir)
    from fastspec.data import load_aclsum

    for rec, ex in zip(records, load_aclsum("train", limit=5)):
        ids = tok("summarize: " + ex.source, truncation=True, max_length=64)["input_ids"]
        assert rec["source_ids"][:3] == ids[:3] and len(rec["source_ids"]) <= 64 and rec["id"] == ex.id
        hf = model.generate(torch.tensor([rec["source_ids"]]), max_new_tokens=6, do_sample=False)[0, 1:].tolist()
        if 1 in hf:
            hf = hf[: hf.index(1) + 1]
        assert rec["output_ids"] == hf
        assert rec["reference_ids"][-1] == 1 and rec["generation"] == {"max_new_tokens": 6, "do_sample": False}


@pytest.mark.slow  # ~20 s idle, ~70 s on a loaded box; test_pseudo.py covers the crash in-process by default
def test_pseudo_killed_subprocess_resumes_without_duplicates(target_dir, tmp_path, capsys):
    n = 24
    args = PSEUDO + ["--target", target_dir, "--num_samples", str(n), "--batch_size", "1", "--max_new_tokens", "12"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    cmd = [sys.executable, "-m", "fastspec.cli"] + args
    proc = subprocess.Popen(cmd + ["--out", str(cut)], env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cursor = cut / "shards" / "part-00000-of-00001.cursor.json"
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = json.load(open(cursor))["batches_done"]
        except (OSError, ValueError):
            done = 0
        if done >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert 3 <= json.load(open(cursor))["batches_done"] < n, "the run was not interrupted mid-way"
    assert not (cut / "pseudo.jsonl").exists()
    assert _run_cli(args + ["--out", str(cut)], capsys)[0] == 0  # resume (in-process)
    assert _run_cli(args + ["--out", str(full)], capsys)[0] == 0  # the uninterrupted run, in-process
    assert (cut / "pseudo.jsonl").read_bytes() == (full / "pseudo.jsonl").read_bytes()
    indices = [json.loads(l)["index"] for l in open(cut / "shards" / "part-00000-of-00001.jsonl")]
    assert indices == list(range(n))


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_equal_one_process(target_dir, tmp_path):
    args = PSEUDO + ["--target", target_dir, "--num_samples", "7", "--batch_size", "2", "--do_sample", "--seed", "5"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "fastspec.cli"] + args + ["--out", str(one)], env=_env(), cwd=REPO,
                   check=True, capture_output=True)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "fastspec.cli"] + args + ["--out", str(two)],
        env=_env(), cwd=REPO, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shards = [[json.loads(l)["index"] for l in open(two / "shards" / f"part-0000{r}-of-00002.jsonl")] for r in (0, 1)]
    assert shards == [[0, 1, 4, 5], [2, 3, 6]]  # disjoint, batch b on rank b mod 2
    assert (two / "pseudo.jsonl").read_bytes() == (one / "pseudo.jsonl").read_bytes()


def test_train_hf_drafter_and_resume(target_dir, tmp_path, capsys):
    pseudo = tmp_path / "pseudo"
    assert _run_cli(PSEUDO + ["--target", target_dir, "--num_samples", "6", "--out", str(pseudo)], capsys)[0] == 0
    common = ["train", "--drafter", "t5small", "--target", target_dir, "--output_root", str(tmp_path / "runs"),
              "--pseudo_dataset_path", str(pseudo), "--loss", "0.5", "--kd_loss", "1", "--kd_temp", "2",
              "--distill_method", "fkl", "--batch_size", "2", "--max_steps", "4", "--ckpt_every", "2",
              "--eval_samples", "2", "--eval_max_new_tokens", "4", "--no_progress", "--max_source_length", "64",
              "--drafter_config", '{"d_model": 16, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}']
    status, out, err = _run_cli(common + ["--exp_name", "kd"], capsys)
    assert status == 0, err
    folder = tmp_path / "runs" / "kd" / "drafter"
    meta = json.load(open(folder / "config.json"))
    assert meta["kind"] == "hf" and meta["config"]["training"]["distill_method"] == "fkl"
    log = [json.loads(l) for l in open(tmp_path / "runs" / "kd" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and 0.0 <= log[-1]["eval_alpha"] <= 1.0
    from fastspec.drafters.io import load_drafter, read_config

    drafter = load_drafter(str(folder))
    assert drafter.vocab_size == 32128
    # --resume of a finished run: nothing left to do, same weights
    status, _, err = _run_cli(common + ["--exp_name", "kd", "--resume"], capsys)
    assert status == 0, err
    # n-gram: fitted on the target's outputs (distilled) or on the references (baseline)
    ngram = ["train", "--drafter", "ngram", "--target", target_dir, "--output_root", str(tmp_path / "runs"),
             "--pseudo_dataset_path", str(pseudo), "--ngram_n", "3", "--no_progress"]
    assert _run_cli(ngram + ["--exp_name", "ng_kd", "--loss", "0", "--kd_loss", "1"], capsys)[0] == 0
    assert _run_cli(ngram + ["--exp_name", "ng_ref", "--loss", "1", "--kd_loss", "0"], capsys)[0] == 0
    kd_drafter = load_drafter(str(tmp_path / "runs" / "ng_kd" / "drafter"))
    records = [json.loads(l) for l in open(pseudo / "pseudo.jsonl")]
    first = records[0]["output_ids"]
    # the fitted table continues the target's own first output from its first two tokens
    ctx = torch.tensor([[0] + first[:2]])
    assert kd_drafter.table.draft(ctx, 1)[0, 0].item() in {r["output_ids"][2] for r in records if r["output_ids"][:2] == first[:2]}
    assert read_config(str(tmp_path / "runs" / "ng_ref" / "drafter"))["config"]["training"]["distill_method"] is None


def _error(argv, capsys, pattern):
    status, out, err = _run_cli(argv, capsys)
    assert status == 2, (out, err)
    assert "Traceback" not in err, err
    last = err.strip().replace("\r", "\n").splitlines()[-1]  # (transformers may print a loading bar first)
    assert last.startswith(f"fastspec {argv[0]}: error: ") and pattern in last, err
    assert err.count("error:") == 1
    return err


def test_user_errors_are_one_line(target_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse: unknown drafter
        main(["train", "--drafter", "gpt", "--exp_name", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'gpt'" in capsys.readouterr().err
    _error(["generate", "--target", target_dir, "--ckpt_path", str(tmp_path / "nope"), "--text", "hi"], capsys,
           "no such drafter folder")
    _error(["train", "--drafter", "t5small", "--exp_name", "x", "--target", str(tmp_path / "missing")], capsys,
           "no such folder")
    _error(["train", "--drafter", "lstm", "--exp_name", "x", "--drafter_config", "{bad"], capsys, "not valid JSON")
    _error(["train", "--drafter", "lstm", "--exp_name", "x", "--pseudo_dataset_path", str(tmp_path / "nope")], capsys,
           "no such folder")
    _error(["train", "--drafter", "lstm", "--exp_name", "x", "--kd_loss", "1", "--kd_temp", "0"], capsys, "--kd_temp must be > 0")
    _error(["train", "--drafter", "cnn", "--exp_name", "x", "--target", target_dir, "--num_samples", "2", "--eval_samples",
            "0", "--output_root", str(tmp_path), "--drafter_config", '{"num_layers": 0}'], capsys,
           "--drafter_config does not fit --drafter cnn: num_layers and kernel_size must be >= 1")
    _error(["train", "--drafter", "lstm", "--exp_name", "x", "--output_root", str(tmp_path), "--resume"], capsys,
           "no checkpoint")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "pseudo.jsonl").write_text('{"index": 0, "source_ids": [1]}\n{trunc')
    _error(["train", "--drafter", "t5small", "--exp_name", "x", "--target", target_dir, "--pseudo_dataset_path",
            str(corrupt), "--output_root", str(tmp_path)], capsys, "corrupt pseudo-dataset record")
    _error(["pseudo", "--target", target_dir, "--dataset", str(tmp_path / "no.jsonl"), "--out", str(tmp_path / "o")],
           capsys, "no such file")
    # wrong vocab: a drafter for a 64-token vocabulary against the 32128-token target
    from fastspec.drafters.hf import HFDrafter

    small = tiny_t5(vocab_size=64)
    HFDrafter(small).save(str(tmp_path / "small_vocab"))
    _error(["generate", "--target", target_dir, "--ckpt_path", str(tmp_path / "small_vocab"), "--text", "hi"], capsys,
           "wrong vocab")
    # corrupt checkpoint file
    (tmp_path / "small_vocab" / "config.json").write_text("{not json")
    _error(["generate", "--target", target_dir, "--ckpt_path", str(tmp_path / "small_vocab"), "--text", "hi"], capsys,
           "corrupted drafter config")


def test_generate_text_in_text_out(target_dir, capsys):
    status, out, err = _run_cli(["generate", "--target", target_dir, "--text", "The cat sat on the mat.", "--drafter",
                                 "none", "--max_new_tokens", "5", "--json"], capsys)
    assert status == 0, err
    result = json.loads(out)
    assert isinstance(result["text"], str) and result["metrics"]["num_steps"] >= 1


def test_demo_and_eval_are_wired(capsys):
    from fastspec.cli import build_parser

    parser = build_parser()
    help_text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "--ckpt_path" in help_text and "--device" in help_text


def test_bench_prints_interleaved_table(target_dir, capsys):
    status, out, err = _run_cli(["bench", "--target", target_dir, "--num_samples", "2", "--max_new_tokens", "4",
                                 "--repeats", "1", "--no_progress", "--max_source_length", "64"], capsys)
    assert status == 0, err
    assert "2 prompts × 1 repeats" in out and "prompt_lookup" in out and "autoregressive" in out


@pytest.mark.slow
def test_torchrun_ddp_training_two_gloo_ranks(target_dir, tmp_path):
    pseudo = tmp_path / "pseudo"
    subprocess.run([sys.executable, "-m", "fastspec.cli"] + PSEUDO + ["--target", target_dir, "--num_samples", "8",
                   "--out", str(pseudo)], env=_env(), cwd=REPO, check=True, capture_output=True)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519", "-m",
         "fastspec.cli", "train", "--drafter", "lstm", "--exp_name", "ddp", "--target", target_dir, "--output_root",
         str(tmp_path / "runs"), "--pseudo_dataset_path", str(pseudo), "--loss", "0", "--kd_loss", "1",
         "--batch_size", "4", "--max_steps", "3", "--eval_samples", "0", "--no_progress",
         "--drafter_config", '{"dim": 16, "hidden_size": 16}'],
        env=_env(), cwd=REPO, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = [json.loads(l) for l in open(tmp_path / "runs" / "ddp" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["kd"] > 0 for r in log)
    from fastspec.drafters.io import load_drafter

    assert load_drafter(str(tmp_path / "runs" / "ddp" / "drafter")).vocab_size == 32128


@pytest.mark.parametrize("argv", [
    ["generate", "--device", "cuda", "--text", "hi"],
    ["eval", "--builtin", "prompt_lookup", "--device", "cuda"],
    ["pseudo", "--device", "cuda:1", "--out", "unused"],
])
def test_missing_cuda_device_is_one_line_naming_the_available_devices(argv, capsys, monkeypatch):
    """Checked before any model is loaded: no traceback, the devices this machine has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _error(argv, capsys, f"--device {argv[argv.index('--device') + 1]}: CUDA is not available here")
    assert err.strip().endswith("available: cpu")


def test_unknown_device_is_one_line(capsys):
    _error(["demo", "--device", "tpu", "--quick"], capsys, "--device tpu: not a torch device; available: cpu")
    _error(["bench", "--device", "mps"], capsys, "--device mps: fastspec runs on cpu or cuda")


def test_only_user_errors_become_one_line_messages(capsys, monkeypatch):
    """A UserError is the user's: one line, exit 2. Anything else is a bug: it keeps its traceback,
    even a ValueError (which the old CLI swallowed)."""
    import fastspec
    from fastspec import cli

    assert fastspec.UserError is cli.UserError and issubclass(fastspec.UserError, ValueError)

    def user_mistake(args):
        raise fastspec.UserError("the input file is empty\nsecond line is dropped")

    monkeypatch.setitem(cli.COMMANDS, "generate", user_mistake)
    status, _, err = _run_cli(["generate", "--text", "x"], capsys)
    assert status == 2 and err == "fastspec generate: error: the input file is empty\n"

    for bug in (ValueError("shape mismatch in the engine"), OSError("disk"), KeyError("k")):
        def broken(args, bug=bug):
            raise bug

        monkeypatch.setitem(cli.COMMANDS, "generate", broken)
        with pytest.raises(type(bug)):
            main(["generate", "--text", "x"])
    # --debug shows the traceback of a user error too
    monkeypatch.setitem(cli.COMMANDS, "generate", user_mistake)
    with pytest.raises(fastspec.UserError):
        main(["--debug", "generate", "--text", "x"])


def test_bad_generation_flags_are_user_errors(capsys):
    _error(["generate", "--text", "x", "--gamma", "0"], capsys, "--gamma must be >= 1")
    _error(["generate", "--text", "x", "--do_sample", "--top_p", "1.5"], capsys, "--top_p in (0, 1]")
    _error(["bench", "--repeats", "0"], capsys, "--repeats must be >= 1")


def test_layer_skip_has_one_name(tmp_path, capsys):
    """`--drafter layer_skip`, config kind `layer_skip`, module fastspec.drafters.layer_skip."""
    from fastspec.cli import DRAFTERS, build_parser

    assert "layer_skip" in DRAFTERS and "layerskip" not in DRAFTERS
    args = build_parser().parse_args(["train", "--drafter", "layer_skip", "--exp_name", "x"])
    assert args.drafter == "layer_skip"
