"""Ctrl-C during `milora train`: a checkpoint at the step end, exit 130, and a rerun that resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from helpers import EXACT_FP64, REPO
from milora_cli.training import checkpoints
from test_train import factors, max_rel_diff, tiny_recipe



def wait_for_first_metrics_line(process: subprocess.Popen, metrics: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and '"loss"' in metrics.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"no metrics line within {timeout} s (exit code {process.poll()})")


def test_sigint_checkpoints_exits_130_and_the_rerun_matches_a_straight_run(tiny_model_dir, tiny_data, tmp_path):
    settings = {"max_steps": 150, "save_every": 10_000, "eval_every": None, "micro_batch_size": 2}
    interrupted = tmp_path / "interrupted"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tiny_data, interrupted, "fp64", **settings)))
    command = [sys.executable, "-m", "milora_cli", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}  # no line wrapping in the output
    # 1. start, wait until training runs, Ctrl-C
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_first_metrics_line(process, interrupted / "metrics.jsonl")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stdout and "Traceback" not in stderr
    saved = checkpoints.training_checkpoints(interrupted)
    assert len(saved) == 1 and not (interrupted / "adapter").exists()
    stopped_at = int(saved[0].name.removeprefix("step-"))
    assert 1 <= stopped_at < settings["max_steps"]
    # 2. the same command again resumes from that checkpoint and finishes
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {saved[0]} at step {stopped_at}" in result.stdout
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, settings["max_steps"] + 1))
    # 3. the same adapter as a run that was never interrupted
    straight = tmp_path / "straight"
    straight_recipe = tmp_path / "straight.yaml"
    straight_recipe.write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tiny_data, straight, "fp64", **settings)))
    result = subprocess.run(command[:-1] + [str(straight_recipe)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert max_rel_diff(factors(interrupted / "adapter"), factors(straight / "adapter")) <= EXACT_FP64
