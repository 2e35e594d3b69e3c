"""Several processes (real torch.distributed over gloo, launched by torchrun): shared scoring that equals one
process's, the global batch for any process count, per-rank RNG and exact resume, `--resume`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from helpers import EXACT_FP64, REPO, milora, stopped_copy
from milora_cli.errors import RecipeError
from milora_cli.recipe import validate
from milora_cli.training import checkpoints, distributed
from milora_cli.training.train import train
from test_evaluate import tiny_data_dir
from test_train import factors, max_rel_diff, tiny_recipe


def torchrun(recipe: Path, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m milora_cli train RECIPE ARGS` on CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "milora_cli", "train", str(recipe), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_global_batch_size_sets_the_accumulation_for_any_process_count():
    cfg = validate({"data": {"builtin": "quickstart"}, "train": {"micro_batch_size": 4, "global_batch_size": 16,
                                                                 "gradient_accumulation_steps": 3}}).train
    assert [distributed.accumulation_steps(cfg, world) for world in (1, 2, 4)] == [4, 2, 1]  # it wins over the 3
    with pytest.raises(RecipeError, match=r"not a multiple of micro_batch_size x processes = 4 x 8 = 32; choose a micro_batch_size that divides 2"):
        distributed.accumulation_steps(cfg, 8)
    unset = validate({"data": {"builtin": "quickstart"}, "train": {"gradient_accumulation_steps": 3}}).train
    assert distributed.accumulation_steps(unset, 8) == 3


def test_two_processes_score_exactly_what_one_process_scores(tiny_model_dir, tiny_data, tmp_path):
    """Held-out scoring, validation and eval.every benchmarks shared over 2 ranks, uneven splits included
    (3 held-out batches, 3 validation batches, 2 boolq batches): the same records as one process."""
    data_dir = str(tiny_data_dir(tmp_path))

    def recipe(out: Path) -> dict:
        raw = tiny_recipe(tiny_model_dir, tiny_data, out, "fp64", micro_batch_size=2, global_batch_size=4, max_steps=3)
        raw["data"]["val_size"] = 6
        raw["eval"] = {"heldout": 6, "batch_size": 2, "max_new_tokens": 4, "tasks": ["boolq", "wikitext"],
                       "data_dir": data_dir, "limit": 5, "every": 2, "choice_max_new_tokens": 4, "ppl_window": 64}
        return raw
    one, two = tmp_path / "one", tmp_path / "two"
    train(validate(recipe(one)), Console(quiet=True))  # 1 process: accumulation 2; float64, so any thread count
    result = torchrun(write_recipe(tmp_path / "two.yaml", recipe(two)))  # 2 processes: accumulation 1
    assert result.stdout.count("adapter written to") == 1  # only the main process reports
    for name in ("heldout_before.jsonl", "heldout_after.jsonl"):
        assert lines(two / name) == lines(one / name) and len(lines(one / name)) == 6
    for step in ("step-000002", "final"):
        a, b = lines(one / "eval" / step / "predictions.jsonl"), lines(two / "eval" / step / "predictions.jsonl")
        assert [r["id"] for r in b] == [r["id"] for r in a] and len(a) == 10  # 5 questions, 5 windows
        assert [r["generation"] for r in b] == [r["generation"] for r in a]
        nll = [[r["nll"] for r in run if r["task"] == "wikitext"] for run in (a, b)]
        assert len(nll[0]) == 5 and nll[1] == pytest.approx(nll[0], rel=EXACT_FP64)
    val = [[r["val_loss"] for r in lines(run / "metrics.jsonl") if "val_loss" in r] for run in (one, two)]
    assert len(val[0]) == 2 and val[1] == pytest.approx(val[0], rel=EXACT_FP64)
    assert max_rel_diff(factors(two / "adapter"), factors(one / "adapter")) < EXACT_FP64


def test_two_process_resume_with_dropout_equals_a_straight_two_process_run(tiny_model_dir, tiny_data, tmp_path):
    settings = {"max_steps": 6, "save_every": 3, "eval_every": None, "micro_batch_size": 2}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    raw = tiny_recipe(tiny_model_dir, tiny_data, straight, "fp64", **settings)
    raw["adapter"]["dropout"] = 0.2
    torchrun(write_recipe(tmp_path / "straight.yaml", raw))
    saved = load_file(checkpoints.training_checkpoints(straight)[0] / checkpoints.OPTIMIZER_FILE)
    assert not torch.equal(saved["rng.0.torch"], saved["rng.1.torch"])  # each rank its own dropout stream
    # A run that stopped after its step-3 checkpoint: the same folder without what came later.
    stopped_copy(straight, stopped)
    raw["output"]["dir"] = str(stopped)
    result = torchrun(write_recipe(tmp_path / "stopped.yaml", raw), "--resume")
    assert "resumed from" in result.stdout and "at step 3" in result.stdout
    assert max_rel_diff(factors(stopped / "adapter"), factors(straight / "adapter")) <= EXACT_FP64


def test_resume_from_a_named_checkpoint_replaces_the_later_ones(tiny_model_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    raw = tiny_recipe(tiny_model_dir, tiny_data, run, "fp64", max_steps=6, save_every=2, keep_checkpoints=3, eval_every=None)
    train(validate(raw), Console(quiet=True))
    straight = factors(run / "adapter")
    shutil.rmtree(run / "adapter")
    first, later = checkpoints.training_checkpoints(run)
    stale = later / "stale.txt"
    stale.write_text("from the continuation being replaced")
    train(validate(raw), Console(quiet=True), resume_at=str(first))
    assert max_rel_diff(factors(run / "adapter"), straight) <= EXACT_FP64
    assert later.is_dir() and not stale.exists()  # deleted at the resume, written again at step 4


def test_resume_without_a_checkpoint_is_a_one_line_error(tiny_model_dir, tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "run", max_steps=0))
    result = milora("train", str(recipe), "--resume")
    assert result.returncode == 2 and "holds no run to resume" in result.stderr and "Traceback" not in result.stderr
    assert milora("train", str(recipe)).returncode == 0
    result = milora("train", str(recipe), "--resume", str(tmp_path / "run" / "adapter"), "output.dir=" + str(tmp_path / "run"))
    assert result.returncode == 0 and "already holds this run, complete" in " ".join(result.stdout.split())  # rich wraps lines
    second = write_recipe(tmp_path / "s.yaml", tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "two", max_steps=0))
    shutil.copytree(tmp_path / "run", tmp_path / "two")
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    (tmp_path / "two" / "recipe.yaml").write_text(saved.replace(str(tmp_path / "run"), str(tmp_path / "two")))
    shutil.rmtree(tmp_path / "two" / "adapter")
    result = milora("train", str(second), "--resume", "train.max_steps=0")
    assert result.returncode == 2 and "holds no checkpoint yet" in " ".join(result.stderr.split())
    result = milora("train", str(second), "train.global_batch_size=5")
    assert result.returncode == 2 and "train.global_batch_size=5 is not a multiple" in " ".join(result.stderr.split())


def _score_share(rank: int, folder: str) -> None:
    """One of 2 gloo processes: scores its share of 5 batches through ranks.shared_rounds."""
    from milora_cli import ranks as ranks_module

    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    scored, emitted = [], []
    ranks = ranks_module.Ranks(rank, 2)
    ranks_module.shared_rounds([[0, 1], [2, 3], [4, 5], [6, 7], [8]], ranks, lambda batch: scored.append(batch) or list(batch),
                               emitted.extend)
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"scored": scored, "emitted": emitted}))
    torch.distributed.destroy_process_group()


def test_shared_rounds_give_each_rank_its_batches_and_the_main_process_all_in_order(tmp_path):
    torch.multiprocessing.spawn(_score_share, args=(str(tmp_path),), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert zero["scored"] == [[0, 1], [4, 5], [8]] and zero["emitted"] == list(range(9))
    assert one["scored"] == [[2, 3], [6, 7], [8]] and one["emitted"] == []  # the last batch again, dropped: 3 forwards each
