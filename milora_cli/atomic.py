"""Atomic writes: a file or a folder is written under a temporary name and renamed into place, so a crash
leaves either the previous version or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from milora_cli.errors import DataError, MiloraError

if TYPE_CHECKING:  # torch loads only where a tensor is written: the CLI imports this module through recipe.py
    import torch


def read_text(path: Path, error: type[MiloraError] = DataError) -> str:
    """A UTF-8 text file; text in another encoding is `error`, naming the file and the first bad byte."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as bad:
        raise error(f"{path} is not UTF-8 text (byte 0x{bad.object[bad.start]:02x} at offset {bad.start}); save it as UTF-8") from None


def read_json(path: Path, what: str, error: type[MiloraError] = DataError) -> dict:
    """A JSON object from `path`, which `what` needs; a missing, damaged or non-object file is `error`."""
    if not path.is_file():
        raise error(f"{path} is missing: {what} is incomplete")
    try:
        data = json.loads(read_text(path, error))
    except json.JSONDecodeError as bad:
        raise error(f"{path} is damaged: not valid JSON ({bad}); {what} cannot be used") from None
    if not isinstance(data, dict):
        raise error(f"{path} is damaged: a JSON object was expected, found {type(data).__name__}")
    return data


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
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise named(error, path) from None
        raise


def named(error: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """An OSError that names the user's `path` for the CLI's one line: not the temporary `tmp` written
    instead of it, nor nothing at all (a full disk's write() names no file)."""
    if error.filename is None or (tmp is not None and str(tmp) in str(error.filename)):
        return OSError(error.errno, error.strerror or str(error), str(path))
    return error


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
    from safetensors.torch import save

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
    try:
        tmp.mkdir()
        yield tmp
        old = final.with_name(f".{final.name}-old")
        if final.exists():  # a folder cannot be replaced by rename: move the old one aside first
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):
            raise named(error, final, tmp) from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
