"""Experiment trackers (`output.report_to`) through Accelerate's: TensorBoard, Weights & Biases, MLflow, trackio, Comet.

Accelerate starts and logs them on the main process only. milora adds what a run folder needs: the run named
after the folder, the resolved recipe as hyperparameters, and a resumed run continuing its tracker run where
the tracker allows (the ids are kept in RUN/trackers.json):

- tensorboard: the same log folder, steps continue; events past the resumed checkpoint are purged (purge_step);
- wandb: the same run id with resume="allow";
- mlflow: the same run_id (steps logged after the checkpoint by the interrupted process stay in its history);
- trackio: the run of the same name with resume="allow";
- comet: the same experiment key with mode="get_or_create" (offline, each session's archive uploads into it).
"""

from __future__ import annotations

import importlib.util
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora_cli import atomic
from milora_cli.errors import RecipeError, first_line
from milora_cli.recipe import Recipe

STATE_FILE = "trackers.json"


@dataclass(frozen=True)
class Tracker:
    accelerate: str  # Accelerate's name for it (LoggerType)
    modules: tuple[str, ...]  # what must import
    install: str  # the packages that provide them


TRACKERS = {
    "tensorboard": Tracker("tensorboard", ("tensorboard",), "tensorboard"),
    "wandb": Tracker("wandb", ("wandb",), "wandb"),
    # the client and its default store, sqlite (all three come with the full `mlflow` package)
    "mlflow": Tracker("mlflow", ("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic"),
    "trackio": Tracker("trackio", ("trackio",), "trackio"),
    "comet": Tracker("comet_ml", ("comet_ml",), "comet_ml"),
}


def check_installed(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing, before anything loads (Accelerate would skip it silently)."""
    for name in report_to:
        if any(importlib.util.find_spec(module) is None for module in TRACKERS[name].modules):
            raise RecipeError(f"output.report_to names {name}, which is not installed: pip install {TRACKERS[name].install}")


def log_with(report_to: list[str]) -> list[str] | None:
    """Accelerator(log_with=...) for the recipe's trackers; None for none."""
    return [TRACKERS[name].accelerate for name in report_to] or None


def start(accelerator: Any, recipe: Recipe, run_path: Path, resume_step: int | None) -> None:
    """init_trackers for a fresh run (new ids), or for one resumed after `resume_step` (the ids it kept)."""
    if not recipe.output.report_to or not accelerator.is_main_process:
        return
    kept = _read_state(run_path) if resume_step is not None else {}
    ids = {"wandb": kept.get("wandb") or secrets.token_hex(6), "mlflow": kept.get("mlflow"), "comet": kept.get("comet") or secrets.token_hex(16)}
    name = run_path.resolve().name
    init_kwargs = {
        "tensorboard": {} if resume_step is None else {"purge_step": resume_step + 1},
        "wandb": {"name": name, "id": ids["wandb"], "resume": "allow", "dir": str(run_path)},
        "mlflow": {"run_name": name, "run_id": ids["mlflow"]},
        "trackio": {"name": name, "resume": "never" if resume_step is None else "allow", "embed": False},
        "comet_ml": {"experiment_key": ids["comet"], "mode": "get_or_create", "experiment_config": _comet_config(name)}
        if "comet" in recipe.output.report_to else {},
    }
    try:
        accelerator.init_trackers(recipe.output.project, config=hyperparameters(recipe), init_kwargs=init_kwargs)
    except Exception as error:  # a tracker's own refusal (no login for an online wandb, an unreachable MLflow server)
        raise RecipeError(f"output.report_to: a tracker could not start: {type(error).__name__}: {first_line(error)}") from None
    if "mlflow" in recipe.output.report_to:
        ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    atomic.write_text_atomic(run_path / STATE_FILE, json.dumps({key: ids[key] for key in ids if key in recipe.output.report_to}, indent=2))


def hyperparameters(recipe: Recipe) -> dict[str, str | int | float | bool | None]:
    """The resolved recipe flat ({"adapter.r": 8, ...}): every tracker takes scalars (TensorBoard's hparams only
    those); lists are written as JSON text."""
    flat = {}
    for section, values in recipe.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def _read_state(run_path: Path) -> dict[str, str]:
    path = run_path / STATE_FILE
    return atomic.read_json(path, "the run's tracker ids", RecipeError) if path.is_file() else {}


def _comet_config(name: str) -> Any:
    import comet_ml

    return comet_ml.ExperimentConfig(name=name)
