"""The `milora` command: one thin command per verb; user mistakes become one line and exit code 2."""

from __future__ import annotations

import contextlib
import enum
import functools
import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.text import Text

from milora_cli import terminal
from milora_cli.choices import DEFAULT_SHARD_SIZE
from milora_cli.choices import Dtype as DtypeName
from milora_cli.choices import MergeFormat as MergeFormatName
from milora_cli.choices import PromptStyle as PromptStyleName
from milora_cli.choices import Quantize as QuantizeName
from milora_cli.errors import MiloraError

app = typer.Typer(
    help="Fine-tune LLMs with MiLoRA: LoRA adapters initialised from the minor singular components.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = terminal.console()


@app.callback()
def _root() -> None:
    """Fine-tune LLMs with MiLoRA: LoRA adapters initialised from the minor singular components."""


errors = terminal.console(stderr=True)


def user_errors(command):
    """Turn known errors into `error: ...` on stderr and exit code 2, without a traceback.

    An OSError (a read-only place, a full disk, a file where a folder must be) is a user error too: it names
    the path and the reason. The message is printed literally: `[fp32]` in it is text, not markup.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (MiloraError, OSError) as error:
            errors.print(Text("error: ", style="bold red") + Text(describe(error)), highlight=False, soft_wrap=True)
            code = 2
        except KeyboardInterrupt:
            errors.print("interrupted")
            code = 130
        _leave_process_group()  # under torchrun: the rank exits with its code, not SIGABRT
        raise typer.Exit(code)

    return wrapper


def _leave_process_group() -> None:
    """Tear down the torch.distributed group, if any, before a failed command exits: a gloo rank that exits with
    it alive aborts at times ('terminate called without an active exception'), and torchrun reports SIGABRT, not
    exit code 2 (1 in 12 two-process refusals here). Collected first: a DDP wrapper freed after the teardown
    once left a gloo thread waiting (train.py)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch: `milora --help` stays fast
    if dist is not None and dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def describe(error: Exception) -> str:
    """One line for a user error; an OSError as `PATH: reason`."""
    if isinstance(error, OSError) and not isinstance(error, MiloraError):
        where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        return f"{where}: {error.strerror or error}" if where else f"{error.strerror or error}"
    return str(error)


# What only the command line may allow (a recipe, a run folder or a model from elsewhere never can): models.Trust
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the model repository's own Python code (auto_map). Only for code you trust.")
]
AllowPickleWeights = Annotated[
    bool, typer.Option("--allow-pickle-weights", help="Also load .bin (pickle) weights of a local model. Default: safetensors only.")
]


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
    resume: Annotated[
        str | None,
        typer.Option("--resume", metavar="[CHECKPOINT]", show_default=False,
                     help="Resume output.dir from its latest checkpoint, or from CHECKPOINT (one of its checkpoints/step-N); "
                          "an error if there is none."),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle_weights: AllowPickleWeights = False,
) -> None:
    """Train a MiLoRA / PiSSA / LoRA adapter from a recipe. An existing run dir of the same recipe resumes."""
    from milora_cli import runlock
    from milora_cli.models import Trust
    from milora_cli.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    if resolved.model.trust_remote_code and not trust_remote_code:
        errors.print("note: model.trust_remote_code in the recipe runs no code by itself; add --trust-remote-code to run the "
                     "model repository's code, only if you trust it", highlight=False, soft_wrap=True)
    trust = Trust(remote_code=trust_remote_code, pickle_weights=allow_pickle_weights)
    if dry_run:
        from milora_cli.training.build import describe

        describe(resolved, console, trust)
        return
    # The run folder locked before the training code loads (seconds of imports), so a second command on it is refused
    # at once; under torchrun train() locks it on the main process for every rank.
    alone = os.environ.get("WORLD_SIZE", "1") == "1"
    with runlock.hold(Path(resolved.output.dir)) if alone else contextlib.nullcontext():
        from milora_cli.training.train import train as run_training

        run_training(resolved, console, resume_at=resume, trust=trust)


def _choices(name: str, literal: Any) -> type[enum.Enum]:
    """A typer choice type from one of the recipe's Literals (choices.py), so the CLI and the recipe offer the same values."""
    return enum.Enum(name, {value: value for value in get_args(literal)}, type=str)


# --base of eval and svd-inspect (merge has its own help: the base to export onto)
BaseOption = Annotated[
    str | None,
    typer.Option(help="Base model of the run(s) (folder, hub id, smollm2-135m). Default: the one it trained on.", show_default=False),
]
MergeFormat = _choices("MergeFormat", MergeFormatName)
Dtype = _choices("Dtype", DtypeName)


QuantizeChoice = _choices("QuantizeChoice", QuantizeName)
PromptChoice = _choices("PromptChoice", PromptStyleName)


@app.command()
@user_errors
def merge(
    adapter: Annotated[Path, typer.Option(help="A run dir (its adapter/) or an adapter folder (RUN/best, a checkpoint).", show_default=False)],
    output: Annotated[Path, typer.Option(help="The folder to write; it must not exist (see --force).", show_default=False)],
    base: Annotated[
        str | None,
        typer.Option(help="Base model: folder, hub id or smollm2-135m. Default: the one the run trained on.", show_default=False),
    ] = None,
    fmt: Annotated[
        MergeFormat, typer.Option("--format", help="merged: a Hugging Face model folder; peft: a PEFT LoRA of the original base.")
    ] = MergeFormat.merged,
    dtype: Annotated[
        Dtype | None,
        typer.Option(help="dtype of the written weights. Default: the base's (merged), fp32 (peft).", show_default=False),
    ] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest weight file of a merged folder, e.g. 5GB, 500MB.")] = DEFAULT_SHARD_SIZE,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output folder, once the new one is complete.")] = False,
    rank: Annotated[
        int | None,
        typer.Option(min=1, help="--format peft: compress each layer's update to this rank by SVD (the error is printed). "
                     "Default: the update's own rank (2r for milora/pissa).", show_default=False),
    ] = None,
) -> None:
    """Merge a trained adapter into the ORIGINAL base model, or export it as a plain PEFT LoRA of that base."""
    from milora_cli.merge import merge as run_merge

    run_merge(
        adapter, output, base=base, fmt=fmt.value, dtype=dtype.value if dtype else None, max_shard_size=max_shard_size, force=force, console=console,
        rank=rank,
    )


@app.command("svd-inspect")
@user_errors
def svd_inspect(
    model: Annotated[
        list[str],
        typer.Argument(help="Model folder, hub id or smollm2-135m; or training run dir(s) (RUN, RUN/best, a checkpoint).", show_default=False),
    ],
    modules: Annotated[
        str | None, typer.Option(help="Module types, e.g. q_proj,v_proj. Default: all linear projections.", show_default=False)
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Layer indices, e.g. 0-3 or 0,5,10-12. Default: all.", show_default=False)] = None,
    rank: Annotated[
        int | None, typer.Option(min=1, help="r of the minor / principal bands. Default: the run's r, else 8.", show_default=False)
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="The arguments are runs: show their updates side by side (implied by several runs).")
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write per matrix its name, shape, statistics and all singular values.", show_default=False)
    ] = None,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Write one row of statistics per matrix.", show_default=False)] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG of the normalised spectra per module type (needs matplotlib).", show_default=False)
    ] = None,
    base: BaseOption = None,
) -> None:
    """Singular-value spectra of a model's linear weights; for runs, where the learned update lies in them."""
    from milora_cli.spectra.inspect import inspect

    inspect(
        model, modules=modules, layers=layers, rank=rank, compare=compare, json_path=json_path, csv_path=csv_path, plot_path=plot,
        console=console, base=base,
    )


# eval's recipe keys -> the flags that set them, so that an error names what the user typed
_EVAL_FLAGS = {"tasks": "--tasks", "data_dir": "--data-dir", "limit": "--limit", "batch_size": "--batch-size",
               "num_beams": "--num-beams", "prompt": "--prompt", "choice_max_new_tokens": "--max-new-tokens",
               "math_max_new_tokens": "--max-new-tokens"}


_MODEL_OR_RUN = "Model folder, hub id or smollm2-135m; a merged folder; or a run dir / adapter folder (base + adapter, unmerged)."
_TASKS = "Comma-separated: boolq,piqa,social_i_qa,hellaswag,winogrande,ARC-Easy,ARC-Challenge,openbookqa,gsm8k,math,math500,wikitext."
_DATA_DIR = ("Task data laid out like ../shared/data: a folder, or a hub dataset id holding the same files. "
             "Default: each task's public hub dataset (gsm8k, math500, wikitext).")


@app.command("eval")
@user_errors
def eval_(
    model_or_run: Annotated[str, typer.Argument(help=_MODEL_OR_RUN, show_default=False)],
    tasks: Annotated[str, typer.Option(help=_TASKS, show_default=False)],
    data_dir: Annotated[str | None, typer.Option(help=_DATA_DIR, show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(help="First N examples per task (WikiText: N windows). Default: all.", show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch. Default: 16.", show_default=False)] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width; 1 (the default) is greedy.", show_default=False)] = None,
    prompt: Annotated[
        PromptChoice,
        typer.Option(help="alpaca: the paper's prompt, as milora trains instructions; chat: the question as one user turn "
                          "through the model's chat template (for chat models, or runs tuned on conversations; a run that "
                          "trained with data.chat_template uses that template)."),
    ] = PromptChoice.alpaca,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens generated per example. Default: 32 commonsense, 512 GSM8K/MATH.", show_default=False)
    ] = None,
    dtype: Annotated[
        Dtype | None, typer.Option(help="dtype of the model. Default: a run's base dtype, else the dtype the model was saved in.", show_default=False)
    ] = None,
    quantize: Annotated[
        QuantizeChoice | None,
        typer.Option(help="Hold the base in nf4/fp4/int8 (bitsandbytes) or not (none). Default: a run's as trained, else none.", show_default=False),
    ] = None,
    output: Annotated[
        Path, typer.Option(help="Results folder; an existing one of the same settings resumes, one of another kind is refused (see --force).")
    ] = Path("out/eval"),
    base: BaseOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an --output folder that holds another kind of result (a run, a merge, a model).")
    ] = False,
    trust_remote_code: TrustRemoteCode = False,
    allow_pickle_weights: AllowPickleWeights = False,
) -> None:
    """Score a model or a run on the paper's benchmarks: per-example JSONL, summary JSON and a table. Resumes."""
    from milora_cli.evaluation.suite import run as run_eval
    from milora_cli.models import Trust
    from milora_cli.recipe import eval_settings

    names = [name.strip() for name in tasks.split(",") if name.strip()]
    cfg = eval_settings({"tasks": names, "data_dir": data_dir, "limit": limit, "batch_size": batch_size, "num_beams": num_beams,
                         "prompt": prompt.value, "choice_max_new_tokens": max_new_tokens, "math_max_new_tokens": max_new_tokens}, _EVAL_FLAGS)
    run_eval(model_or_run, cfg, output, dtype.value if dtype else None, console, quantize.value if quantize else None, base=base, force=force,
             trust=Trust(remote_code=trust_remote_code, pickle_weights=allow_pickle_weights))


def main() -> None:  # pragma: no cover - `milora` and `python -m milora_cli`
    sys.exit(app(args=bare_resume(sys.argv[1:]), prog_name="milora"))


def bare_resume(args: list[str]) -> list[str]:
    """`--resume` without a value, as `--resume=latest` (click options cannot take an optional value).

    It is bare when it comes last or before another option, an override (`train.lr=1e-4`) or a recipe.
    """
    if "--resume" not in args:  # run_dir loads torch: `milora --help` and completion must not wait for it
        return list(args)
    from milora_cli.training.run_dir import LATEST

    args = list(args)
    for i, arg in enumerate(args):
        after = args[i + 1] if i + 1 < len(args) else None
        if arg == "--resume" and (after is None or after.startswith("-") or "=" in after or after.endswith((".yaml", ".yml"))):
            args[i] = f"--resume={LATEST}"
    return args
