"""Atomic writes: a file or a folder is written under a temporary name and renamed into place, so a crash
leaves either the previous version or the new one, never half of one."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from milora_cli.errors import DataError, MiloraError, OutputError

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
    """Write a file through a temporary sibling and a rename: readers see the old or the new file.

    The rename replaces a symbolic link at `path` itself, never the file it points to.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_file(path.parent, f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise named(error, path) from None
        raise


def _new_file(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new file of a random name in `folder`, open for writing, with the permissions open() gives (0666 less
    the umask; mkstemp's 0600 would make it private to its writer, and reading the umask would change it)."""
    return _fresh(folder, prefix, lambda tmp: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666))


def new_folder(parent: Path, prefix: str) -> Path:
    """A new folder of a random name in `parent`, with the permissions mkdir() gives (0777 less the umask)."""
    return _fresh(parent, prefix, Path.mkdir)[1]


def _fresh(parent: Path, prefix: str, make: Callable[[Path], Any]) -> tuple[Any, Path]:
    """(make(path), path) for a new random name in `parent`; a name already taken is drawn again."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            return make(path), path
        except FileExistsError:
            continue


def named(error: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """An OSError that names the user's `path` for the CLI's one line: not the temporary `tmp` written
    instead of it, nor nothing at all (a full disk's write() names no file)."""
    if error.filename is None or (tmp is not None and str(tmp) in str(error.filename)):
        return OSError(error.errno, error.strerror or str(error), str(path))
    return error


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def refuse_link(path: Path) -> None:
    """Refuse to write, empty or delete through a symbolic link: a downloaded folder may hold one to any file."""
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link (to {os.readlink(path)}); milora writes no file through a link: "
                          "remove the link, or choose another folder")


def open_to_append(path: Path, empty: bool = False):
    """`path` opened for appending text (`empty`: emptied first), created if absent; a symbolic link is refused."""
    refuse_link(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if empty else 0) | _NOFOLLOW
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:  # a link made after the check above
            refuse_link(path)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


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
