"""The training loop: accumulation equivalence, resume, init-only runs, and the real-model acceptance runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from helpers import EXACT_FP64, milora, stopped_copy
from milora_cli import adapter_folder, atomic
from milora_cli.recipe import validate
from milora_cli.training.step import BatchStream, learning_rate
from milora_cli.training.train import train



def tiny_recipe(model_dir: str, data_path: str, out: Path, dtype: str = "fp32", **train_overrides) -> dict:
    """The tiny model's recipe; dtype="fp64" for the equalities that are exact in exact arithmetic (helpers.EXACT_FP64)."""
    return {
        "model": {"name_or_path": model_dir, "dtype": dtype},
        "adapter": {"init": "milora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": data_path, "val_size": 8, "max_length": 64},
        "train": {"max_steps": 3, "lr": 1e-2, "warmup_steps": 1, "log_every": 1, "eval_every": 2, **train_overrides},
        "output": {"dir": str(out)},
    }


def run(raw: dict) -> dict:
    return train(validate(raw), Console(quiet=True))


def factors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / adapter_folder.ADAPTER_FILE)


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)).item() for k in a)


def test_accumulation_4x2_equals_micro_batch_8(tiny_model_dir, tiny_data, tmp_path):
    one = tmp_path / "one"
    run(tiny_recipe(tiny_model_dir, tiny_data, one, "fp64", micro_batch_size=8, gradient_accumulation_steps=1))
    four = tmp_path / "four"
    run(tiny_recipe(tiny_model_dir, tiny_data, four, "fp64", micro_batch_size=2, gradient_accumulation_steps=4))
    # Same loss and same full-gradient norm at every step (the loss is normalised by the label tokens
    # of the whole global batch, not per micro-batch; the micro-batches here differ in token counts).
    def metrics(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    for a, b in zip(metrics(one), metrics(four), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=EXACT_FP64)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=EXACT_FP64)
    assert factors(one / "adapter")["model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float64
    assert max_rel_diff(factors(four / "adapter"), factors(one / "adapter")) < EXACT_FP64


def test_max_steps_zero_saves_the_initialised_adapter(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "init"
    summary = run(tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=0))
    assert summary["steps"] == 0
    found = adapter_folder.read_adapter(out / "adapter")
    trained, initial, meta = found.trained, found.initial, found.meta
    assert trained.keys() == initial.keys() and all(torch.equal(trained[k], initial[k]) for k in trained)
    assert meta["init"] == "milora" and meta["step"] == 0 and len(meta["target_modules"]) == 14


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    plain, written = tmp_path / "plain.txt", tmp_path / "atomic.txt"
    plain.write_text("x")
    atomic.write_text_atomic(written, "x")  # through mkstemp, whose files start private (0600)
    assert written.stat().st_mode == plain.stat().st_mode and written.read_text() == "x"
    assert not list(tmp_path.glob(".*"))  # no temporary file left beside it


def test_resume_gives_the_same_adapter_as_a_straight_run(tiny_model_dir, tiny_data, tmp_path):
    straight = tmp_path / "straight"
    run(tiny_recipe(tiny_model_dir, tiny_data, straight, "fp64", max_steps=6, save_every=3))
    # A run that stopped after its step-3 checkpoint: the same folder without what came later.
    stopped = tmp_path / "stopped"
    stopped_copy(straight, stopped)
    raw = tiny_recipe(tiny_model_dir, tiny_data, stopped, "fp64", max_steps=6, save_every=3)
    run(raw)
    assert max_rel_diff(factors(stopped / "adapter"), factors(straight / "adapter")) <= EXACT_FP64
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(steps) and steps.count(4) == 1  # the log was cut back to the checkpoint


def test_a_run_dir_of_another_recipe_is_refused(tiny_model_dir, tiny_data, tmp_path):
    from milora_cli.errors import RecipeError

    out = tmp_path / "taken"
    run(tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=0))
    with pytest.raises(RecipeError, match="different recipe"):
        run(tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=1))
    assert run(tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=0))["complete"]
    # a run an older milora started: its recipe.yaml holds output.tensorboard (retired for output.report_to, b575e9d)
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    saved["output"]["tensorboard"] = True
    (out / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert run(tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=0))["complete"]  # the same run, not "not a valid recipe"


def test_a_recipe_that_fails_to_load_does_not_claim_its_run_dir(tiny_model_dir, tiny_data, tmp_path):
    from milora_cli.errors import DataError

    out = tmp_path / "run"
    broken = tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=0)
    broken["data"]["path"] = str(tmp_path / "missing.json")
    with pytest.raises(DataError, match="data file not found"):
        run(broken)
    assert not out.exists()
    assert run(tiny_recipe(tiny_model_dir, tiny_data, out, max_steps=0))["steps"] == 0  # the fixed recipe starts there


def test_batch_stream_splits_the_global_batch_across_processes():
    one = BatchStream(40, seed=1, micro=4, accumulation=1, rank=0, world=1)
    two = [BatchStream(40, seed=1, micro=2, accumulation=1, rank=rank, world=2) for rank in (0, 1)]
    for step in range(12):  # crosses epoch boundaries
        assert sorted(one.step(step)[0]) == sorted(two[0].step(step)[0] + two[1].step(step)[0])
    epoch = [i for step in range(10) for i in one.step(step)[0]]
    assert sorted(epoch) == list(range(40))


def test_learning_rate_schedules():
    recipe = validate({"data": {"builtin": "quickstart"}, "train": {"lr": 1.0, "warmup_steps": 2, "scheduler": "cosine"}})
    lrs = [learning_rate(step, recipe.train, 10) for step in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2] == 1.0 and all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 0


@pytest.mark.slow
def test_quickstart_short_run_writes_safetensors_and_reproduces(smollm2_path, tmp_path):
    """The acceptance run on the real model: safetensors + recipe.yaml, no pickle; same seed, same losses."""
    first, second = tmp_path / "a", tmp_path / "b"
    common = ["train.max_steps=6", "train.log_every=1", "eval.heldout=0"]
    result = milora("train", "recipes/quickstart.yaml", *common, f"output.dir={first}")
    assert result.returncode == 0, result.stderr
    files = {p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()}
    assert {"recipe.yaml", "versions.json", "metrics.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_init.safetensors"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))]
    # rerun from the saved recipe into another dir: the same loss curve
    result = milora("train", str(first / "recipe.yaml"), f"output.dir={second}")
    assert result.returncode == 0, result.stderr
    def curve(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(curve(first)) == 6 and curve(first) == curve(second)
    assert curve(first)[-1] < curve(first)[0]


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, tiny_data, tmp_path):
    plain, checkpointed = tmp_path / "plain", tmp_path / "ckpt"
    run(tiny_recipe(tiny_model_dir, tiny_data, plain, "fp64", micro_batch_size=4))
    run(tiny_recipe(tiny_model_dir, tiny_data, checkpointed, "fp64", micro_batch_size=4, gradient_checkpointing=True))
    assert max_rel_diff(factors(checkpointed / "adapter"), factors(plain / "adapter")) < EXACT_FP64


def test_compiled_layers_train_the_same_adapter(tiny_model_dir, tiny_data, tmp_path):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    run(tiny_recipe(tiny_model_dir, tiny_data, plain, "fp64", micro_batch_size=4, max_steps=4))
    try:
        run(tiny_recipe(tiny_model_dir, tiny_data, compiled, "fp64", micro_batch_size=4, max_steps=4, compile=True))
    finally:
        torch._dynamo.reset()  # the compiled code belongs to this test's model
    curves = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in line] for d in (plain, compiled)]
    assert len(curves[0]) == 4 and curves[1] == pytest.approx(curves[0], rel=EXACT_FP64)
    # Fused kernels sum in another order: equal within float64 rounding (helpers.EXACT_FP64).
    assert max_rel_diff(factors(compiled / "adapter"), factors(plain / "adapter")) < EXACT_FP64


@pytest.mark.parametrize("dtype, mixed", [("bf16", "no"), ("bf16", "bf16")])
def test_bf16_base_and_bf16_autocast_train(tiny_model_dir, tiny_data, tmp_path, dtype, mixed):
    raw = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "run", mixed_precision=mixed, max_steps=4)
    raw["model"]["dtype"] = dtype
    summary = run(raw)
    curve = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert summary["steps"] == 4 and all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0]


def test_autocast_follows_the_base_dtype_and_a_mismatch_is_refused(tiny_model_dir, tiny_data, tmp_path):
    from milora_cli.errors import RecipeError
    from milora_cli.training.train import autocast_dtype

    assert [autocast_dtype("auto", dtype, cuda=True) for dtype in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]
    assert [autocast_dtype("auto", dtype, cuda=False) for dtype in ("fp32", "bf16")] == ["no", "no"]
    raw = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "run", mixed_precision="bf16")  # an fp32 base
    with pytest.raises(RecipeError, match="mixed_precision=bf16 with model.dtype=fp32 would recast every frozen weight"):
        run(raw)
    assert not (tmp_path / "run").exists()


def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tiny_model_dir, tiny_data, tmp_path):
    """torchrun --nproc_per_node 2 with micro-batch b trains the same adapter as 1 process with 2b."""
    import yaml

    one, two = tmp_path / "one", tmp_path / "two"
    run(tiny_recipe(tiny_model_dir, tiny_data, one, "fp64", micro_batch_size=4))
    recipe = tmp_path / "two.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tiny_data, two, "fp64", micro_batch_size=2)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "milora_cli", "train", str(recipe)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("adapter written to") == 1  # only the main process reports
    assert max_rel_diff(factors(two / "adapter"), factors(one / "adapter")) < EXACT_FP64
