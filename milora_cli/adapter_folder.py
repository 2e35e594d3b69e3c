"""Adapter folders on disk: the one format train writes and merge, eval and svd-inspect read. Safetensors and JSON only.

An adapter folder holds everything needed to rebuild the adapted model without the run around it:

    adapter_model.safetensors   trained factors   {layer}.lora_A.weight (r, in), {layer}.lora_B.weight (out, r)
    adapter_init.safetensors    frozen initial factors A0, B0 under the same keys (merge/export need both)
    adapter_meta.json           init, r, lora_alpha, target layers, base model and its fingerprint, versions
    recipe.yaml                 the resolved recipe of the run

A training checkpoint (training/checkpoints.py) is an adapter folder plus what an exact resume needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from milora_cli.errors import ModelError

ADAPTER_FILE = "adapter_model.safetensors"
INIT_FILE = "adapter_init.safetensors"
META_FILE = "adapter_meta.json"
FORMAT = "milora-adapter/1"


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
