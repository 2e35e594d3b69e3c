"""The run folder's lifecycle: claimed by one recipe, started, resumed, written to, finished.

    RUN/recipe.yaml          the resolved recipe: it claims the folder (another recipe is refused)
    RUN/versions.json        library versions of the run
    RUN/checkpoints/step-N   periodic checkpoints (training/checkpoints.py), the newest keep_checkpoints kept
    RUN/best, RUN/adapter    the adapter of the best validation loss, the final adapter (adapter_folder.py)
    RUN/summary.json         what the run measured, written last

Only the main process writes; every other process keeps the same calls and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from rich.console import Console
from rich.markup import escape

from milora_cli import adapter, adapter_folder, atomic, outputs
from milora_cli.errors import AdapterError, ModelError, RecipeError
from milora_cli.recipe import dump_recipe, validate
from milora_cli.runlog import versions
from milora_cli.ranks import Ranks
from milora_cli.training import checkpoints, distributed

COMPLETE = "complete"
LATEST = "latest"  # `--resume` without a checkpoint


class RunDir:
    """One run's folder as seen by the process that trains it."""

    def __init__(self, path: Path, recipe_yaml: str, main: bool):
        self.path, self.recipe_yaml, self.main = path, recipe_yaml, main

    def claim(self, console: Console, resume: str | None = None) -> list[Path] | str | None:
        """Start, resume or refuse: returns None (start), the checkpoints to resume from (oldest first: the newest
        intact one is taken), or COMPLETE.

        `resume` (`milora train --resume [CHECKPOINT]`): LATEST or a checkpoint folder of this run; either
        must exist. Without it an existing folder resumes from its latest checkpoint, if any.
        Writes nothing: a recipe that then fails to load its model or data leaves no folder that would
        refuse the next, corrected recipe.
        """
        outputs.claim(self.path, "run", "output.dir")
        saved = self.path / "recipe.yaml"
        if not saved.is_file():
            if resume is not None:
                raise RecipeError(f"--resume: {self.path} holds no run to resume; train without --resume to start it")
            return None
        differ = _differences(atomic.read_text(saved, RecipeError), self.recipe_yaml)
        if differ:
            raise RecipeError(
                f"output.dir {self.path} holds a run of a different recipe ({differ}); choose another output.dir"
            )
        if (self.path / "adapter" / adapter_folder.META_FILE).is_file():
            console.print(f"{self.path} already holds this run, complete; to train it again, add output.dir=NEW_DIR")
            return COMPLETE
        found = checkpoints.training_checkpoints(self.path)
        if resume is None or resume == LATEST:
            if resume and not found:
                raise RecipeError(f"--resume: {self.path} holds no checkpoint yet (train.save_every writes them, and Ctrl-C)")
            return found or None
        # the run's own entry, not the resolved path: a link named by --resume must not make another run's folder
        # the one whose later checkpoints are deleted
        named = next((path for path in found if path.resolve() == Path(resume).resolve()), None)
        if named is None:
            have = ", ".join(path.name for path in found) or "none"
            raise RecipeError(f"--resume: {resume} is not a checkpoint of {self.path} (its checkpoints: {have})")
        return [named]

    def start(self) -> None:
        """A fresh run's folder: its resolved recipe (which claims the folder) and the library versions."""
        if self.main:
            atomic.write_text_atomic(self.path / "recipe.yaml", self.recipe_yaml)
            atomic.write_text_atomic(self.path / "versions.json", json.dumps(versions(), indent=2))

    def write(self, name: str, text: str) -> None:
        """A file of the run (summary.json, heldout_after.jsonl, ...), written atomically by the main process."""
        if self.main:
            atomic.write_text_atomic(self.path / name, text)


def _differences(saved_yaml: str, recipe_yaml: str) -> str:
    """The keys whose values differ between the saved recipe (with today's defaults) and this one; "" if none."""
    try:
        saved = _flat(yaml.safe_load(dump_recipe(validate(_without_retired(yaml.safe_load(saved_yaml) or {})))))
    except (RecipeError, yaml.YAMLError, AttributeError):
        return "its recipe.yaml is not a valid recipe"
    now = _flat(yaml.safe_load(recipe_yaml))
    keys = [key for key in dict.fromkeys([*saved, *now]) if saved.get(key) != now.get(key)]
    shown = "; ".join(f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now" for key in keys[:3])
    return shown + (f"; and {len(keys) - 3} more" if len(keys) > 3 else "")


# Keys a recipe.yaml of an older milora holds and today's schema does not, that change nothing a resume depends on:
# output.tensorboard (before output.report_to, b575e9d) wrote TensorBoard logs beside the run when the package was there.
_RETIRED = (("output", "tensorboard"),)


def _without_retired(tree: dict) -> dict:
    """A saved recipe without _RETIRED's keys, so that a run an older milora started still resumes."""
    for section, key in _RETIRED:
        if isinstance(tree.get(section), dict):
            tree[section].pop(key, None)
    return tree


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for name, value in tree.items():
        flat |= _flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value}
    return flat


class Saver:
    """Writes adapter folders (final, best, periodic with training state) on the main process only; each carries
    the run's data.chat_template (`chat_template`), if any, so that eval and merge use what the adapter learned."""

    def __init__(self, run: RunDir, adapters: dict[str, adapter.MiloraLinear], meta: dict, accelerator: Accelerator, keep: int,
                 chat_template: str | None = None):
        self.run, self.adapters, self.meta, self.accelerator, self.keep = run, adapters, meta, accelerator, keep
        self.chat_template = chat_template

    def save(self, kind: str, step: int, val_loss: float | None = None, optimizer=None, best: float | None = None) -> None:
        # every process's RNG, gathered by all of them before the main process writes alone
        rng = distributed.gathered_rng(Ranks.of(self.accelerator)) if kind == "periodic" else {}
        # whole tensors, gathered by every process under fsdp (collectives), before the main process writes alone
        trained, initial = adapter.adapter_tensors(self.adapters, keep=self.run.main)
        opt = checkpoints.whole_optimizer_state(optimizer, keep=self.run.main) if kind == "periodic" else None
        self.accelerator.wait_for_everyone()
        if not self.run.main:
            return
        root = self.run.path
        final = {"best": root / "best", "final": root / "adapter"}.get(kind, root / "checkpoints" / f"step-{step:06d}")
        with atomic.atomic_folder(final) as folder:
            adapter_folder.write_adapter(folder, trained, initial, {**self.meta, "step": step, "val_loss": val_loss}, self.run.recipe_yaml,
                                         self.chat_template)
            if kind == "periodic":
                checkpoints.write_training_state(folder, opt, {"step": step, "best_val_loss": best}, rng)
        if kind == "periodic":
            checkpoints.prune(root, self.keep)


def resume(found: list[Path], adapters: dict[str, adapter.MiloraLinear], optimizer: torch.optim.Optimizer,
           ranks: Ranks, console: Console, template: tuple[str, str] | None = None) -> tuple[int, float]:
    """Load the newest intact periodic checkpoint into the adapters, the optimizer and this rank's RNG; return
    (step, best validation loss). A damaged checkpoint is reported and skipped; none intact is an AdapterError.
    Later checkpoints, of the continuation being replaced (or damaged), are deleted.

    `template`: (data.chat_template, its text now); a checkpoint that kept another text is a RecipeError: the
    recipe names the same file, but the run would go on with another template than it trained with."""
    for folder in reversed(found):
        try:
            step, best = _load(folder, adapters, optimizer, ranks, template)
        except AdapterError as error:
            console.print(f"[yellow]warning:[/] skipping a damaged checkpoint: {escape(str(error))}")
            continue
        console.print(f"resumed from {folder} at step {step}")
        return step, best
    raise AdapterError(
        f"no intact checkpoint to resume from in {found[0].parent}; delete the damaged ones to start over, or choose another output.dir"
    )


def _load(folder: Path, adapters: dict[str, adapter.MiloraLinear], optimizer: torch.optim.Optimizer, ranks: Ranks,
          template: tuple[str, str] | None) -> tuple[int, float]:
    found = adapter_folder.read_adapter(folder)
    if template is not None and found.chat_template not in (None, template[1]):  # None: kept before templates were
        raise RecipeError(f"data.chat_template {template[0]} has changed since {folder} was written with it; restore it to resume, "
                          "or choose another output.dir to train with the new one")
    try:
        adapter.load_adapter_tensors(adapters, found.trained, found.initial)
    except ModelError as error:
        raise AdapterError(f"{folder}: {error}") from None
    state, rng = checkpoints.read_training_state(folder, optimizer)
    distributed.restore_rng(rng, ranks)
    if ranks.main:
        for later in checkpoints.training_checkpoints(folder.parent.parent):
            if later.name > folder.name:
                shutil.rmtree(later)
    return state["step"], state["best_val_loss"]
