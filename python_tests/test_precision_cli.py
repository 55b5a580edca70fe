"""--dtype / --drafter_dtype on the CLI, drafter dtype following the target (load_drafter), and
the verify ops on 16-bit logits (no float32 copy needed)."""
import json

import pytest
import torch

from fastspec import ops, precision
from fastspec.cli import build_parser
from fastspec.drafters.hf import HFDrafter
from fastspec.drafters.io import load_drafter

from distill_helpers import tiny_t5
from test_cli import _error, _run_cli, target_dir  # noqa: F401  (target_dir: the tiny T5 target fixture)

LOADING_COMMANDS = ("train", "pseudo", "eval", "generate", "bench")


def _parse(command, *extra):
    base = {"train": ["--drafter", "lstm", "--exp_name", "x"], "pseudo": ["--out", "o"], "eval": ["--builtin", "prompt_lookup"]}
    return build_parser().parse_args([command, *base.get(command, []), *extra])


@pytest.mark.parametrize("command", LOADING_COMMANDS)
def test_every_loading_command_has_dtype_default_float32(command):
    assert _parse(command).dtype == "float32"
    assert _parse(command, "--dtype", "auto").dtype == "auto"


@pytest.mark.parametrize("command", ("eval", "generate", "bench"))
def test_drafter_dtype_flag(command):
    assert _parse(command).drafter_dtype is None and _parse(command, "--drafter_dtype", "int8").drafter_dtype == "int8"


def test_bad_dtypes_are_one_line_errors(target_dir, capsys, monkeypatch):  # noqa: F811
    _error(["generate", "--target", target_dir, "--dtype", "int4", "--text", "hi"], capsys,
           "--dtype int4: unknown dtype 'int4'; accepted: auto, float32, bfloat16, float16")
    _error(["bench", "--target", target_dir, "--drafter_dtype", "int4"], capsys,
           "--drafter_dtype 'int4': accepted: float32, bfloat16, float16, int8")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    _error(["eval", "--target", target_dir, "--builtin", "prompt_lookup", "--dtype", "float16"], capsys,
           "float16 on this CPU: it has no fp16 units")


def test_generate_in_bf16_announces_the_dtype_once(target_dir, capsys):  # noqa: F811
    precision._announced.clear()
    status, out, err = _run_cli(["generate", "--target", target_dir, "--text", "The cat sat.", "--dtype", "bf16",
                                 "--drafter", "prompt_lookup", "--max_new_tokens", "4", "--json"], capsys)
    assert status == 0, err
    assert json.loads(out)["metrics"]["num_steps"] >= 1
    assert err.count("fastspec: dtype bf16 -> bfloat16 on cpu") == 1


def test_a_float32_drafter_follows_a_bf16_target_with_one_note(target_dir, tmp_path, capsys):  # noqa: F811
    HFDrafter(tiny_t5(vocab_size=32128, seed=5, d_model=32)).save(str(tmp_path / "hf"))
    argv = ["generate", "--target", target_dir, "--text", "The cat sat.", "--ckpt_path", str(tmp_path / "hf"),
            "--max_new_tokens", "4", "--json"]
    status, out, err = _run_cli(argv + ["--dtype", "bfloat16"], capsys)
    assert status == 0, err
    notes = [line for line in err.splitlines() if "cast the drafter to bfloat16" in line]
    assert len(notes) == 1 and "stored in float32" in notes[0]
    status, out, err = _run_cli(argv + ["--drafter_dtype", "int8"], capsys)
    assert status == 0 and "cast the drafter" not in err, err


def test_load_drafter_dtype_rules(tmp_path):
    small = tiny_t5(vocab_size=64, seed=5)
    HFDrafter(small).save(str(tmp_path / "hf"))
    bf16_target = tiny_t5(vocab_size=64, seed=6).to(torch.bfloat16)
    folder = str(tmp_path / "hf")
    assert load_drafter(folder).model.dtype == torch.float32  # no target: the checkpoint's dtype
    assert load_drafter(folder, bf16_target).model.dtype == torch.bfloat16  # follows the target
    assert load_drafter(folder, bf16_target, "float32").model.dtype == torch.float32  # unless told otherwise
    assert load_drafter(folder, bf16_target, "int8").quantized


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_verify_ops_take_16_bit_logits_exactly(dtype):
    """fused_verify / verify_greedy read 16-bit logits as float32 inside: the same result as on the
    float32 upcast, so the engine needs no full-size float32 copy of the logits."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 997, generator=gen) * 4).to(dtype)
    logits[0, 1, :2] = logits[0, 1].max()  # a tie: the first maximal index must win in both
    drafts = logits.float().argmax(-1)[:, :4].clone()
    drafts[1, 2] = (drafts[1, 2] + 1) % 997  # one rejection
    for fn in (lambda l: ops.fused_verify(l, drafts), lambda l: ops.verify_greedy(l, drafts)):
        low, high = fn(logits), fn(logits.float())
        assert all(torch.equal(a, b) for a, b in zip(low, high))
    sampled = [ops.fused_verify(l, drafts, do_sample=True, temperature=0.8, top_k=50,
                                generator=torch.Generator().manual_seed(1)) for l in (logits, logits.float())]
    assert all(torch.equal(a, b) for a, b in zip(*sampled))
