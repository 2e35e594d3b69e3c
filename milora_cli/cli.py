"""The `milora` command: one thin command per verb; user mistakes become one line and exit code 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from milora_cli.errors import MiloraError

app = typer.Typer(
    help="Fine-tune LLMs with MiLoRA: LoRA adapters initialised from the minor singular components.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()


@app.callback()
def _root() -> None:
    """Fine-tune LLMs with MiLoRA: LoRA adapters initialised from the minor singular components."""

errors = Console(stderr=True)


def user_errors(command):
    """Turn known errors into `error: ...` on stderr and exit code 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MiloraError as error:
            errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).", show_default=False)],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides, e.g. adapter.r=16 train.lr=1e-4 output.dir=out/x.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved recipe, one tokenised example and parameter counts; train nothing.")
    ] = False,
) -> None:
    """Train a MiLoRA / PiSSA / LoRA adapter from a recipe. An existing run dir of the same recipe resumes."""
    from milora_cli.recipe import load_recipe
    from milora_cli.train import describe, train as run_training

    resolved = load_recipe(recipe, overrides or [])
    if dry_run:
        describe(resolved, console)
        return
    run_training(resolved, console)


def main() -> None:  # pragma: no cover - `python -m milora_cli`
    sys.exit(app())
