"""Training checkpoints: an adapter folder (adapter_folder.py) plus the optimizer and RNG state an exact
resume needs, kept under RUN/checkpoints/step-NNNNNN. Safetensors and JSON only, never pickle. Whole
tensors whatever the process count: under fsdp gathered to write, and each process keeps its rows on read.

    optimizer.safetensors   optimizer tensors as state.{param index}.{name}, RNG states as rng.{name}
    trainer_state.json      step, best validation loss, the optimizer's param_groups
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from milora_cli import adapter_folder, atomic, dtensor
from milora_cli.errors import AdapterError
from milora_cli.training import distributed

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def whole_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """optimizer.state_dict() with whole tensors. Under fsdp AdamW's moments are sharded as their parameters are:
    each is gathered (a collective: every process calls this at the same point) and moved to the host one at a
    time; a process without `keep` drops them and gets the state without its tensors."""
    opt = optimizer.state_dict()
    state = {}
    for index, entry in sorted(opt["state"].items()):
        gathered = {name: dtensor.whole(value).cpu() if dtensor.is_sharded(value) else value for name, value in entry.items()}
        if keep:
            state[index] = gathered
    return opt | {"state": state}


def write_training_state(folder: Path, opt: dict[str, Any], state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """Optimizer tensors (`opt`: whole_optimizer_state) and RNG states as safetensors, the rest as JSON (no pickle anywhere)."""
    tensors = {f"state.{index}.{key}": value.detach().cpu().contiguous() for index, entry in opt["state"].items() for key, value in entry.items()}
    tensors.update({f"rng.{key}": value for key, value in rng.items()})
    data = save(tensors)
    (folder / OPTIMIZER_FILE).write_bytes(data)
    checksums = {OPTIMIZER_FILE: adapter_folder.sha256(data)}
    (folder / STATE_FILE).write_text(json.dumps({**state, "param_groups": opt["param_groups"], "checksums": checksums}, indent=2))


def read_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the optimizer in place; return (trainer state, RNG states). A damaged file is an AdapterError."""
    state = atomic.read_json(folder / STATE_FILE, f"the checkpoint {folder}", AdapterError)
    if not (isinstance(state.get("step"), int) and isinstance(state.get("best_val_loss"), (int, float))
            and isinstance(state.get("param_groups"), list)):
        raise AdapterError(f"{folder / STATE_FILE} is damaged: step, best_val_loss or param_groups is missing or of the wrong type")
    tensors = adapter_folder.read_tensors(folder / OPTIMIZER_FILE, (state.pop("checksums", None) or {}).get(OPTIMIZER_FILE))
    rng = {key.partition(".")[2]: value for key, value in tensors.items() if key.startswith("rng.")}
    has_rng = "torch" in distributed.rank_rng(rng, 0)  # one process's state, or rank 0's of several
    if not has_rng or not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        raise AdapterError(f"{folder / OPTIMIZER_FILE} is damaged: no RNG state, or NaN or infinite values")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("rng."):
            index, _, name = key.partition(".")[2].partition(".")  # state.{index}.{name}
            per_param.setdefault(int(index), {})[name] = value
    params = [param for group in optimizer.param_groups for param in group["params"]]  # the state dict's indices
    for index, entry in per_param.items():  # a sharded parameter's moments: this process's rows of the whole ones
        if index < len(params):
            per_param[index] = {name: dtensor.local_like(value, params[index]) if value.shape == params[index].shape else value
                                for name, value in entry.items()}
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    except (ValueError, KeyError, TypeError) as error:
        raise AdapterError(f"{folder / OPTIMIZER_FILE} does not fit this run's optimizer ({error})") from None
    return state, rng


def training_checkpoints(run_dir: Path) -> list[Path]:
    """Periodic checkpoint folders of a run, oldest first (temporary folders are not listed)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(path for path in root.glob("step-*") if (path / STATE_FILE).is_file())


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints."""
    for old in training_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
