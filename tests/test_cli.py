"""The installed `milora` command: --help of every command, one-line errors with exit code 2, --dry-run."""

from pathlib import Path

import pytest
import typer.main

from helpers import milora
from milora_cli.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def test_commands_are_registered():
    assert "train" in COMMANDS


@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS], ids=lambda c: " ".join(c) or "milora")
def test_help(command):
    result = milora(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_unknown_recipe_key_is_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("data: {builtin: quickstart}\nadapter:\n  rnak: 16\n")
    result = milora("train", str(recipe))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rnak" in lines[0] and "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "does-not-exist.yaml"], "recipe not found"),
        (["train", "recipes/quickstart.yaml", "adapter.r=-3"], "adapter.r"),
        (["train", "recipes/quickstart.yaml", "data.builtin=null", "data.path=/nope/x.json"], "data file not found"),
        (["train", "recipes/quickstart.yaml", "--dry-run", "adapter.target_modules=[q_prj]"], "q_prj"),
        (["train", "recipes/quickstart.yaml", "--dry-run", "model.name_or_path=/no/such/model"], "model.name_or_path"),
    ],
)
def test_user_mistakes_exit_2_without_traceback(args, needle, smollm2_path, tmp_path):
    run_dir = tmp_path / "run"  # never the repository's out/: the README runs the quickstart there
    result = milora(*args, f"output.dir={run_dir}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()  # a recipe that fails leaves no run folder to refuse the corrected one


def test_dry_run_shows_recipe_mask_and_counts(smollm2_path):
    result = milora("train", "recipes/quickstart.yaml", "--dry-run", "output.dir=/nonexistent/never-written")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "init: milora" in out and "### Response:" in out and "carry loss" in out
    assert "trainable parameters" in out and "nothing trained" in out
    assert not Path("/nonexistent/never-written").exists()
