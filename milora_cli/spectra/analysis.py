"""Singular-value spectra of a model's linear weights, and where a fine-tuning run moved them.

Per weight W (out x in) with singular values s_1 >= ... >= s_k (k = min(out, in)) and a band width r:

    condition number    s_1 / s_k
    effective rank      exp(H(p)),  p_i = s_i / sum_j s_j,  H(p) = -sum_i p_i log p_i    (Roy & Vetterli 2007)
    minor energy        sum of s_i^2 over the r smallest / sum_i s_i^2    (principal energy: the r largest)

Per adapted weight of a run, with the learned update dW = s (B A - B0 A0) and W = U diag(S) V^T:

    principal share     ||U_p^T dW V_p||_F / ||dW||_F     U_p, V_p: the r leading singular vectors of W
    minor share         ||U_m^T dW V_m||_F / ||dW||_F     U_m, V_m: the r trailing ones
    rotation            principal angles theta_i between the top-r left singular subspaces of W and W + dW:
                        sin theta_i = singular values of (I - U_p U_p^T) U'_p (accurate for small angles);
                        reported as the largest angle in degrees and the mean of sin^2 theta_i

Weights are read one tensor at a time from safetensors files; no model is built. The decompositions are
svd.py's, in float64, on CUDA when present. Singular values are cached under cache_root()/spectra/,
keyed by the sha256 of the tensor's bytes, so a second inspection of the same weights decomposes nothing.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from milora_cli import adapter_folder, atomic, dtypes, models, shards, svd
from milora_cli.errors import InspectError
import contextlib

SPECTRA_DIR = "spectra"
FORMAT = "milora-spectrum/1"  # float64 singular values by svd.singular_values; a new way of computing them bumps it
_BLOCK = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Llama-style block order
# 2-D weights that are not linear projections: embeddings, the output head, norms.
_NOT_PROJECTION = re.compile(r"embed|lm_head|norm|\bwte\b|\bwpe\b|(^|\.)ln_?\w*$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------- math


def spectrum_stats(S: torch.Tensor, r: int) -> dict[str, float]:
    """Largest, smallest, condition number, effective rank, and the energy shares of the r minor and principal."""
    p = S / S.sum()  # (k,)
    p = p[p > 0]
    energy = S.square()  # (k,)
    return {
        "largest": S[0].item(),
        "smallest": S[-1].item(),
        "condition": (S[0] / S[-1]).item() if S[-1] > 0 else math.inf,
        "effective_rank": torch.exp(-(p * p.log()).sum()).item(),
        "minor_energy": (energy[-r:].sum() / energy.sum()).item(),
        "principal_energy": (energy[:r].sum() / energy.sum()).item(),
    }


@dataclass(frozen=True)
class UpdateStats:
    """Where a learned update dW of one weight W lies, relative to W's singular subspaces."""

    relative_norm: float  # ||dW||_F / ||W||_F
    principal_share: float  # ||U_p^T dW V_p||_F / ||dW||_F  (nan when dW = 0)
    minor_share: float  # ||U_m^T dW V_m||_F / ||dW||_F
    max_angle: float  # the largest principal angle between top-r left subspaces of W and W + dW, degrees
    mean_sin2: float  # mean of sin^2 over the r principal angles


def update_stats(base: svd.Svd, weight: torch.Tensor, delta: torch.Tensor, r: int) -> UpdateStats:
    """The module docstring's measures of `delta` (dW) against `base`, the float64 SVD of `weight` (W)."""
    delta = delta.to(base.U)
    norm = torch.linalg.matrix_norm(delta)

    def share(U: torch.Tensor, Vh: torch.Tensor) -> float:
        return (torch.linalg.matrix_norm(U.T @ delta @ Vh.T) / norm).item() if norm > 0 else math.nan  # (r, r) core

    top = base.U[:, :r]  # (out, r)
    moved = svd.decompose(weight.to(delta) + delta).U[:, :r]  # (out, r)
    sines = torch.linalg.svdvals(moved - top @ (top.T @ moved)).clamp(max=1.0)  # (r,) sin of the principal angles
    return UpdateStats(
        relative_norm=(norm / torch.linalg.matrix_norm(weight.to(delta))).item(),
        principal_share=share(base.U[:, :r], base.Vh[:r]),
        minor_share=share(base.U[:, -r:], base.Vh[-r:]),
        max_angle=math.degrees(math.asin(sines.max().item())),
        mean_sin2=sines.square().mean().item(),
    )


# ------------------------------------------------------------------------------- weights and caching


@dataclass(frozen=True)
class Spectrum:
    """The singular values of one weight matrix."""

    name: str  # module path, e.g. model.layers.0.self_attn.q_proj
    shape: tuple[int, int]  # (out, in)
    S: torch.Tensor  # (k,) float64, descending

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)


def layer_index(name: str) -> int | None:
    """The first numeric part of a module path (model.layers.12.mlp.up_proj -> 12), None if it has none."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def projection_weights(folder: Path) -> dict[str, shards.TensorInfo]:
    """Module path -> weight of every 2-D linear projection in a model folder (not embeddings, lm_head, norms).

    In layer order, and within a layer in the order of a transformer block (q, k, v, o, gate, up, down),
    not in the alphabetical order of the safetensors files.
    """
    weights = {
        name.removesuffix(".weight"): info
        for name, info in shards.read_index(folder).items()
        if name.endswith(".weight") and len(info.shape) == 2 and info.dtype in dtypes.FLOATING
        and not _NOT_PROJECTION.search(name.removesuffix(".weight"))
    }
    return dict(sorted(weights.items(), key=lambda item: _block_order(item[0])))


def _block_order(name: str) -> tuple[int, int, str]:
    module = name.rsplit(".", 1)[-1]
    layer = layer_index(name)
    return (-1 if layer is None else layer, _BLOCK.index(module) if module in _BLOCK else len(_BLOCK), name)


def parse_layers(text: str) -> set[int]:
    """'0-3,7' -> {0, 1, 2, 3, 7}."""
    chosen: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise InspectError(f"--layers: '{text}' is not a list of layer indices and ranges like 0-3,7")
        chosen.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return chosen


def select(names: Iterable[str], modules: str | None, layers: str | None) -> list[str]:
    """The module paths of the chosen module types (`q_proj,v_proj`) and layers (`0-3`), in their order."""
    names = list(names)
    chosen = names
    if modules:
        types = [part.strip() for part in modules.split(",") if part.strip()]
        known = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
        for kind in types:
            if kind not in known:
                raise InspectError(f"--modules: '{kind}' is not a projection of this model; it has: {', '.join(known)}")
        chosen = [name for name in chosen if name.rsplit(".", 1)[-1] in types]
    if layers:
        wanted = parse_layers(layers)
        present = sorted({index for index in map(layer_index, names) if index is not None})
        if not wanted & set(present):
            span = f"{present[0]}-{present[-1]}" if present else "none"
            raise InspectError(f"--layers: '{layers}' matches no layer; the model's layers are {span}")
        chosen = [name for name in chosen if layer_index(name) in wanted]
    return chosen


def by_module(names: list[str]) -> dict[str, list[str]]:
    """Module paths grouped by module type (q_proj, ...), in order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return groups


def singular_values(weight: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, bool]:
    """(float64 singular values of `weight`, descending; whether they came from the cache)."""
    key = hashlib.sha256(f"{FORMAT}:{models.tensor_digest(weight)}".encode()).hexdigest()
    path = models.cache_root() / SPECTRA_DIR / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(path)["S"], True
        except (OSError, SafetensorError, KeyError):  # a damaged entry is recomputed and rewritten
            pass
    S = svd.singular_values(weight.to(device), "float64").cpu()  # (k,)
    _store(path, S)
    return S, False


def _store(path: Path, S: torch.Tensor) -> None:
    """Write a cache entry atomically; an unwritable cache only costs speed."""
    with contextlib.suppress(OSError, SafetensorError):
        atomic.save_file_atomic(path, {"S": S.contiguous()})


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def limit_cpu_threads() -> None:
    """Decompose on one CPU thread when the cores are busy (load average + torch's threads > cores).

    The OpenMP threads of a LAPACK call wait for each other at every step; on shared, busy cores one of
    them is often descheduled, and the call gets 10x slower (svdvals of 2048x2048 in float64: 28 s on 2
    threads, 2.4 s on 1, at load 4 on 2 cores). Left so for the rest of the process: setting any thread
    count, even the one before, makes MKL thread every later small op (12 ms each on busy cores).
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device().type == "cpu" and torch.get_num_threads() > 1 and load + torch.get_num_threads() > (os.cpu_count() or 1):
        torch.set_num_threads(1)


def model_spectra(weights: dict[str, shards.TensorInfo], names: list[str]) -> tuple[list[Spectrum], int]:
    """(the spectra of the named weights, how many came from the cache), one tensor in memory at a time."""
    files = {f"{name}.weight": weights[name] for name in names}  # read_tensors takes tensor names
    spectra, cached = [], 0
    for name, weight in zip(names, shards.read_tensors(files, list(files)), strict=False):
        S, hit = singular_values(weight, device())
        spectra.append(Spectrum(name, tuple(weight.shape), S))
        cached += hit
    return spectra, cached


# ---------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """A trained adapter and the base it was trained on."""

    label: str  # the path as the user gave it
    adapter: adapter_folder.Adapter  # RUN/adapter, RUN/best or a checkpoint
    base: Path  # the base model's local folder

    @property
    def meta(self) -> dict[str, Any]:
        return self.adapter.meta

    def delta(self, layer: str) -> torch.Tensor:
        """dW = s (B A - B0 A0) of one layer, float64 (the difference of two close products needs it)."""
        return self.adapter.delta(layer, torch.float64)  # (out, in)


def open_run(path: Path, base: str | None = None) -> Run:
    """The run at `path` (RUN, RUN/best, a checkpoint) and its base: --base, else the one it trained on."""
    found = adapter_folder.open_adapter(path, "MODEL")
    return Run(str(path), found, adapter_folder.locate_base(base, found.meta, download=True)[2])


def run_updates(runs: list[Run], names: list[str], rank: int | None) -> dict[str, dict[str, UpdateStats]]:
    """run label -> layer -> UpdateStats; each base weight (one base for all runs) is decomposed once."""
    results: dict[str, dict[str, UpdateStats]] = {run.label: {} for run in runs}
    index = shards.read_index(runs[0].base) if runs else {}
    for name in names:
        users = [run for run in runs if name in run.meta["target_modules"]]
        if not users:
            continue
        weight = next(shards.read_tensors(index, [f"{name}.weight"])).to(device(), torch.float64)  # (out, in)
        base = svd.decompose(weight)
        for run in users:
            results[run.label][name] = update_stats(base, weight, run.delta(name).to(weight), rank or run.meta["r"])
    return results


@dataclass(frozen=True)
class Inspection:
    model: str  # what the spectra are of: the model named, or the base of the (first) run
    folder: Path
    note: str | None  # the quantisation note of a model converted from a quantised file
    rank: int
    spectra: list[Spectrum]
    cached: int  # how many spectra came from the cache
    runs: list[Run]
    updates: dict[str, dict[str, UpdateStats]]  # run label -> layer -> stats
