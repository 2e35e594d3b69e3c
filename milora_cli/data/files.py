"""Data files as lists of records: a .json list, .jsonl lines, a .parquet table (hub datasets' files included)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from milora_cli import atomic, locate
from milora_cli.errors import DataError


def _read_json(path: Path) -> list[Any]:
    try:
        data = json.loads(atomic.read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); a .json data file is one list of records") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json data file must hold a list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    for line_no, line in enumerate(atomic.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {line_no}: not valid JSON ({e})") from e
    return records


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow
    import pyarrow.parquet as pq  # imported here: only parquet users pay for it

    try:
        return pq.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: not a readable parquet file ({error})") from None


_READERS: dict[str, Callable[[Path], list[Any]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def read_file(file: Path) -> list[Any]:
    """The records of one .json (a list), .jsonl or .parquet file."""
    reader = _READERS.get(file.suffix)
    if reader is None:
        raise DataError(f"{file}: unsupported file type '{file.suffix}'; use {', '.join(locate.DATA_SUFFIXES)}")
    return reader(file)
