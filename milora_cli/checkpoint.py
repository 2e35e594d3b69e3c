"""Checkpoint folders on disk: adapters, training state, atomic writes. Safetensors and JSON only.

A checkpoint folder holds everything needed to rebuild the adapted model without the run around it:

    adapter_model.safetensors   trained factors   {layer}.lora_A.weight (r, in), {layer}.lora_B.weight (out, r)
    adapter_init.safetensors    frozen initial factors A0, B0 under the same keys (merge/export need both)
    adapter_meta.json           init, r, lora_alpha, target layers, base model and its fingerprint, versions
    recipe.yaml                 the resolved recipe of the run
    optimizer.safetensors, trainer_state.json   (training checkpoints only) what an exact resume needs

Every folder is written under a temporary name and renamed into place, so a crash leaves either the
previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file

from milora_cli.errors import ModelError

ADAPTER_FILE = "adapter_model.safetensors"
INIT_FILE = "adapter_init.safetensors"
META_FILE = "adapter_meta.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT = "milora-adapter/1"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, default_mode(0o666))  # mkstemp's 0600 would make the file private to its writer
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_mode(mode: int) -> int:
    """`mode` less the process umask: the permissions open() or mkdir() would give a new file or folder."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic of UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def save_file_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written by write_bytes_atomic."""
    write_bytes_atomic(path, save(tensors, metadata=metadata))


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final` in one rename.

    The temporary folder is named after the process, so a later call removes what killed processes left.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = final.with_name(f".{final.name}-old")
        if final.exists():  # a folder cannot be replaced by rename: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_adapter(folder: Path, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], meta: dict[str, Any], recipe_yaml: str) -> None:
    """Write the adapter files into an (already temporary) folder."""
    save_file(trained, folder / ADAPTER_FILE, metadata={"format": FORMAT})
    save_file(initial, folder / INIT_FILE, metadata={"format": FORMAT})
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}, indent=2))
    (folder / "recipe.yaml").write_text(recipe_yaml)


def find_adapter(path: Path) -> Path | None:
    """The adapter folder at `path`: RUN -> RUN/adapter, an adapter folder (RUN/best, a checkpoint) as it is; else None."""
    return next((folder for folder in (path, path / "adapter") if (folder / META_FILE).is_file()), None)


def read_adapter(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(trained, initial, meta) of an adapter folder, with a clear error for anything missing."""
    for name in (ADAPTER_FILE, INIT_FILE, META_FILE):
        if not (folder / name).is_file():
            raise ModelError(f"{folder} is not a milora adapter folder: {name} is missing")
    return load_file(folder / ADAPTER_FILE), load_file(folder / INIT_FILE), json.loads((folder / META_FILE).read_text())


def write_training_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any], rng: dict[str, torch.Tensor]) -> None:
    """Optimizer tensors and RNG states as safetensors, the rest as JSON (no pickle anywhere)."""
    opt = optimizer.state_dict()
    tensors = {f"state.{index}.{key}": value.detach().cpu().contiguous() for index, entry in opt["state"].items() for key, value in entry.items()}
    tensors.update({f"rng.{key}": value for key, value in rng.items()})
    save_file(tensors, folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps({**state, "param_groups": opt["param_groups"]}, indent=2))


def read_training_state(folder: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load the optimizer in place; return (trainer state, RNG states)."""
    tensors = load_file(folder / OPTIMIZER_FILE)
    state = json.loads((folder / STATE_FILE).read_text())
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    rng = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "rng":
            rng[rest] = value
        else:
            index, _, name = rest.partition(".")
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
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
