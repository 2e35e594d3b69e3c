"""`milora --help` answers at once and shell completion works: the heavy libraries load inside the commands only."""

import os
import shlex
import subprocess
import sys

import pytest
import typer.main

from helpers import REPO
from milora_cli.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)
# What takes seconds to import; none of it is needed to print help or complete a word. (pydantic is not here: Typer
# itself converts a command's parameters with it.)
HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors.torch", "bitsandbytes")


def _imported(*args: str) -> set[str]:
    """The modules `python -m milora_cli ARGS` imports, as `-X importtime` lists them (one per line on stderr)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "milora_cli", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", [[]] + [[name] for name in COMMANDS], ids=lambda c: " ".join(c) or "milora")
def test_help_imports_no_heavy_library(command):
    imported = _imported(*command, "--help")
    assert "milora_cli.cli" in imported  # the listing is real: it holds the CLI module itself
    assert not [name for name in HEAVY if name in imported]


def test_importing_the_cli_module_leaves_torch_and_transformers_out():
    code = "import sys, milora_cli.cli; print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _complete(words: str, cword: int) -> list[str]:
    """Typer's bash completion as the script `milora --install-completion` installs runs it (COMP_WORDS, COMP_CWORD)."""
    env = {**os.environ, "_MILORA_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    result = subprocess.run([sys.executable, "-m", "milora_cli"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_completion_of_commands_and_choices():
    assert _complete("milora svd", 1) == ["svd-inspect"]
    assert sorted(_complete("milora ", 1)) == COMMANDS
    # the choices come from recipe.py's Literals
    assert sorted(_complete("milora merge --format ", 3)) == ["merged", "peft"]


def test_show_completion_prints_the_script():
    # Typer takes the shell from the process tree (shellingham), not from an argument or $SHELL: run it from a
    # bash (a second command after it keeps bash from exec-ing it away), as a user types it in one; a test run
    # whose parents hold no shell (a daemonised CI job) otherwise gets "Shell  not supported."
    command = f"{shlex.quote(sys.executable)} -m milora_cli --show-completion; exit $?"
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "_MILORA_COMPLETE=complete_bash" in result.stdout
