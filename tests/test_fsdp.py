"""`train.distributed=fsdp` on 2 gloo processes (real FSDP2, torchrun): the adapter of one process, whole
tensors saved, a merge that reproduces it, and an interrupted run that resumes exactly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from rich.console import Console

from helpers import EXACT_FP64, REPO, rel_max_error, stopped_copy
from milora_cli import merge
from milora_cli.recipe import validate
from milora_cli.training import checkpoints
from milora_cli.training.train import train
from test_distributed import lines, torchrun, write_recipe
from test_evaluate import tiny_data_dir
from test_export import logits, token_ids, trained_model
from test_interrupt import wait_for_first_metrics_line
from test_train import factors, max_rel_diff, tiny_recipe


def test_two_fsdp_processes_train_the_adapter_of_one_process(tiny_model_dir, tiny_data, tmp_path):
    """Sharded forwards are collectives: held-out generation (2 batches), validation (3 batches: one rank
    repeats one) and the benchmarks (3 boolq batches, 1 of windows) must keep both ranks in step."""
    data_dir = str(tiny_data_dir(tmp_path))

    def recipe(out: Path) -> dict:
        raw = tiny_recipe(tiny_model_dir, tiny_data, out, "fp64", micro_batch_size=2, global_batch_size=4, distributed="fsdp",
                          max_grad_norm=0.01)  # below the gradients' norm (~0.05): clipping acts at every step
        raw["data"]["val_size"] = 6
        raw["eval"] = {"heldout": 6, "batch_size": 4, "max_new_tokens": 4, "tasks": ["boolq", "wikitext"], "data_dir": data_dir,
                       "limit": 9, "choice_max_new_tokens": 4, "ppl_window": 64}
        return raw
    one, two = tmp_path / "one", tmp_path / "two"
    train(validate(recipe(one)), Console(quiet=True))  # one process: nothing to shard, accumulation 2; float64, any thread count
    result = torchrun(write_recipe(tmp_path / "two.yaml", recipe(two)))
    assert "fsdp: " in result.stdout and "parameters on each of 2 processes" in result.stdout  # it did shard
    expected, saved = factors(one / "adapter"), factors(two / "adapter")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}  # whole tensors
    assert max_rel_diff(saved, expected) <= EXACT_FP64
    for name in ("heldout_before.jsonl", "heldout_after.jsonl", "eval/final/predictions.jsonl"):
        a, b = lines(one / name), lines(two / name)
        assert [r.get("generation") for r in b] == [r.get("generation") for r in a] and len(a) in (6, 18)
    val = [[r["val_loss"] for r in lines(run / "metrics.jsonl") if "val_loss" in r] for run in (one, two)]
    assert len(val[0]) == 2 and torch.allclose(torch.tensor(val[1]), torch.tensor(val[0]), rtol=EXACT_FP64)
    # the norm clipped is that of the whole, averaged gradients (not one rank's, not zero)
    norms = [torch.tensor([r["grad_norm"] for r in lines(run / "metrics.jsonl") if "loss" in r]) for run in (one, two)]
    assert len(norms[0]) == 3 and (norms[0] > 0.01).all() and torch.allclose(norms[1], norms[0], rtol=EXACT_FP64)
    # the saved adapter is the trained model: its merge gives the same logits
    model = trained_model(two / "adapter")
    ids = token_ids(model.config.vocab_size)
    merged = merge.merge(two, tmp_path / "merged")
    from transformers import AutoModelForCausalLM
    # A float32 check: the merge writes W + dW rounded to float32 (the tiny base's dtype), 2^-24 relative per weight,
    # and runs the forward in float32; through 2 layers of width 32-64 that is ~1e-6 of the logits at most.
    assert rel_max_error(logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids), logits(model, ids)) <= 1e-5


def test_sigterm_mid_fsdp_run_then_a_rerun_equals_a_straight_fsdp_run(tiny_model_dir, tiny_data, tmp_path):
    settings = {"dtype": "fp64", "max_steps": 40, "save_every": 10_000, "eval_every": None, "micro_batch_size": 2, "distributed": "fsdp"}
    interrupted = tmp_path / "interrupted"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tiny_model_dir, tiny_data, interrupted, **settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "milora_cli", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_metrics_line(launcher, interrupted / "metrics.jsonl")
    for worker in psutil.Process(launcher.pid).children():  # what a scheduler's SIGTERM reaches: the training processes
        os.kill(worker.pid, signal.SIGTERM)
    launcher.communicate(timeout=300)
    saved = checkpoints.training_checkpoints(interrupted)
    assert len(saved) == 1 and not (interrupted / "adapter").exists()
    assert 1 <= int(saved[0].name.removeprefix("step-")) < settings["max_steps"]
    torchrun(recipe)  # the same command resumes and finishes
    steps = [r["step"] for r in lines(interrupted / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, settings["max_steps"] + 1))
    straight = tmp_path / "straight"
    torchrun(write_recipe(tmp_path / "straight.yaml", tiny_recipe(tiny_model_dir, tiny_data, straight, **settings)))
    assert max_rel_diff(factors(interrupted / "adapter"), factors(straight / "adapter")) <= EXACT_FP64


def test_a_bf16_base_with_fp32_factors_trains_sharded(tiny_model_dir, tiny_data, tmp_path):
    """FSDP1's failure: bf16 base weights and fp32 factors in one unit. Here only the base is sharded."""
    raw = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "run", micro_batch_size=2, max_steps=4, distributed="fsdp",
                      gradient_checkpointing=True, eval_every=None)
    raw["model"]["dtype"] = "bf16"
    torchrun(write_recipe(tmp_path / "bf16.yaml", raw))
    curve = [r["loss"] for r in lines(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(curve) == 4 and all(torch.isfinite(torch.tensor(curve))) and curve[-1] < curve[0]


def test_a_sharded_run_resumes_on_another_process_count(tiny_model_dir, tiny_data, tmp_path):
    """A requeued job may get fewer or more processes than it started on: checkpoints hold whole tensors (each
    process keeps its rows on read), and the global batch fixes the accumulation, so a 2-process fsdp run resumed
    on 1 process, and a 1-process run resumed on 2 fsdp processes, each equal the straight run (float64)."""
    settings = {"dtype": "fp64", "max_steps": 6, "save_every": 3, "eval_every": None, "micro_batch_size": 2, "global_batch_size": 4,
                "distributed": "fsdp"}

    def stopped_after_step_3(straight: Path, name: str) -> dict:
        """The straight run as it was after its step-3 checkpoint (the last step writes the adapter, not one)."""
        stopped_copy(straight, tmp_path / name)
        assert [path.name for path in checkpoints.training_checkpoints(tmp_path / name)] == ["step-000003"]
        return tiny_recipe(tiny_model_dir, tiny_data, tmp_path / name, **settings)

    two = tmp_path / "two"
    torchrun(write_recipe(tmp_path / "two.yaml", tiny_recipe(tiny_model_dir, tiny_data, two, **settings)))
    onto_one = stopped_after_step_3(two, "two-then-one")
    train(validate(onto_one), Console(quiet=True), resume_at="latest")
    assert max_rel_diff(factors(Path(onto_one["output"]["dir"]) / "adapter"), factors(two / "adapter")) <= EXACT_FP64

    one = tmp_path / "one"
    train(validate(tiny_recipe(tiny_model_dir, tiny_data, one, **settings)), Console(quiet=True))
    onto_two = stopped_after_step_3(one, "one-then-two")
    result = torchrun(write_recipe(tmp_path / "onto-two.yaml", onto_two), "--resume")
    assert "resumed from" in result.stdout and "at step 3" in result.stdout and "parameters on each of 2 processes" in result.stdout
    assert max_rel_diff(factors(Path(onto_two["output"]["dir"]) / "adapter"), factors(one / "adapter")) <= EXACT_FP64
