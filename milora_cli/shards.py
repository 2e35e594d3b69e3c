"""Model weights as safetensors shards, read and written one tensor at a time.

Reading uses safetensors' safe_open on the files a model folder's index names (or its single
model.safetensors), so nothing but the requested tensor is ever in memory. Writing plans the shards
from names, dtypes and shapes alone, then writes each file's header first and streams its tensors after
it: the header of a safetensors file is all that needs to be known up front.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from milora_cli import atomic, dtypes
from milora_cli.errors import ModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]


Entry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape) of a tensor to write


def read_index(folder: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a model folder's tensors, file by file, from the safetensors headers."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = atomic.read_json(index, f"the model {folder}", ModelError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelError(f"{index} is damaged: it has no weight_map")
        files = sorted(set(map(str, weight_map.values())))
    elif (folder / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ModelError(f"{folder} has no {SINGLE_FILE} nor {INDEX_FILE}; milora reads safetensors weights only")
    tensors = {}
    for file in files:
        try:
            with safe_open(model_file(folder, file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                    part = handle.get_slice(name)
                    if part.get_dtype() not in dtypes.SAFETENSORS:
                        raise ModelError(f"tensor '{name}' of {folder} has dtype {part.get_dtype()}, which milora does not handle")
                    tensors[name] = TensorInfo(folder / file, part.get_dtype(), tuple(part.get_shape()))
        except SafetensorError as error:
            raise ModelError(f"{folder / file} is damaged: not a readable safetensors file ({error})") from None
    return tensors


def model_file(folder: Path, name: str) -> Path:
    """folder/name, for a file that a model folder names (an index entry) or holds (a file merge copies).

    `name` must be a plain file name, and the file, links followed, must lie inside the folder or, for a hub
    cache snapshot, inside its repository's blobs/: huggingface_hub lays a snapshot out as relative links
    snapshots/<commit>/<file> -> ../../blobs/<sha> (see tests/hub_cache.py). Anything else is a ModelError:
    a downloaded folder must not make milora read (and merge publish) a file from elsewhere.
    """
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ModelError(f"{folder} names the file '{name}', which is not a plain file name in that folder; "
                         "milora reads no file outside a model folder")
    path = folder / name
    real, inside = path.resolve(), folder.resolve()
    roots = [inside]
    blobs = inside.parent.parent / "blobs"
    if inside.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink():
        roots.append(blobs)
    if not any(real.is_relative_to(root) for root in roots):
        raise ModelError(f"{path} is a link to {real}, outside the model folder {folder}; milora reads no file outside "
                         "a model folder: remove the link")
    return path


def read_tensors(tensors: dict[str, TensorInfo], names: Iterable[str]) -> Iterator[torch.Tensor]:
    """The named tensors in order, each a view of its file's memory map.

    The pages a tensor touches count as resident until its file is closed, so the file is opened per
    tensor (parsing a header costs microseconds): memory holds one tensor, not a whole shard.
    """
    for name in names:
        with safe_open(tensors[name].file, "pt") as handle:
            yield handle.get_tensor(name)


class LazyWeights(Mapping):
    """{layer: base weight in `dtype`}, read on access: fingerprinting or decomposing holds one weight at a time.

    `bytes_read`: the checkpoint bytes read so far (each access reads its whole tensor).
    """

    def __init__(self, tensors: dict[str, TensorInfo], layers: list[str], dtype: torch.dtype):
        self.tensors, self.layers, self.dtype = tensors, layers, dtype
        self.bytes_read = 0

    def __getitem__(self, layer: str) -> torch.Tensor:
        info = self.tensors[f"{layer}.weight"]
        self.bytes_read += nbytes((layer, info.dtype, info.shape))
        return next(read_tensors(self.tensors, [f"{layer}.weight"])).to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


def nbytes(entry: Entry) -> int:
    return math.prod(entry[2]) * dtypes.SAFETENSORS[entry[1]].itemsize


def plan_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Consecutive tensors grouped into shards of at most max_shard_size bytes (a bigger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + nbytes(entry) > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes(entry)
    return shards


def write_sharded(folder: Path, entries: list[Entry], tensors: Iterator[torch.Tensor], max_shard_size: int) -> int:
    """Hugging Face weight files in `folder`: model.safetensors, or numbered shards and their index.

    `tensors` yields the tensors of `entries` in order; returns the number of shards.
    """
    shards = plan_shards(entries, max_shard_size)
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for file, shard in zip(files, shards, strict=False):
        write_safetensors(folder / file, shard, itertools.islice(tensors, len(shard)))
    if n > 1:
        weight_map = {name: file for file, shard in zip(files, shards, strict=False) for name, _, _ in shard}
        index = {"metadata": {"total_size": sum(nbytes(entry) for entry in entries)}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return n


def write_safetensors(path: Path, entries: list[Entry], tensors: Iterable[torch.Tensor]) -> None:
    """One safetensors file written tensor by tensor: its header comes from the planned shapes, first."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        name, dtype, shape = entry
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes(entry)]}
        offset += nbytes(entry)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)  # little-endian u64 header length, then the header
        for (name, dtype, shape), tensor in zip(entries, tensors, strict=True):
            assert tensor.dtype == dtypes.SAFETENSORS[dtype] and tuple(tensor.shape) == shape, name
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        handle.flush()
        os.fsync(handle.fileno())
