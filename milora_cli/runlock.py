"""One writer per output folder: an advisory lock held for the whole command (`milora train`, `milora eval
--output`, `milora merge --output`), so that a double launch, or a cluster's requeue while the first job still
runs, is refused at once instead of interleaving two runs in one folder.

    PARENT/.NAME.lock   beside the folder: a run folder is not created before its recipe loads, and a merge
                        replaces its folder whole by one rename; a lock inside would miss both

The lock is flock(2) on that file, exclusive and non-blocking, taken as py-filelock's UnixFileLock takes it
(the lock of pip, conda and huggingface_hub; seen in filelock/_unix.py): os.open, flock(LOCK_EX | LOCK_NB),
release by closing. The kernel drops it when the holder's last descriptor closes, so a process killed with -9
leaves the file but no lock, and the next command takes it. The file is never deleted (a process that opened
it before the deletion would lock the old file while a third locks a new one of the same name) and, once
locked, holds the holder's pid and host: what a refused command names.

Under torchrun the main process takes the lock for the job; every other rank waits for its outcome (one
collective) and is refused alike, so no rank writes before the lock is held. A hold of a folder this process
already holds (`milora train` locks before the training code loads, then train() again) is that same lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from milora_cli.errors import OutputError
from milora_cli.ranks import ONE, Ranks

_HELD: set[Path] = set()  # the lock files this process holds


def lock_path(folder: Path) -> Path:
    """The lock file of an output folder: `.NAME.lock` beside it (beside the real folder: two paths to it, one lock)."""
    place = folder.expanduser().resolve()
    return place.parent / f".{place.name}.lock"


@contextmanager
def hold(folder: Path, ranks: Ranks = ONE) -> Iterator[None]:
    """Hold `folder`'s lock for the block; an OutputError (one line, exit 2) if another process holds it."""
    path = lock_path(folder)
    fd, refusal = None, None
    if ranks.main and path not in _HELD:
        try:
            fd = _acquire(folder, path)
        except OutputError as error:
            refusal = str(error)
    refusal = ranks.gather(refusal)[0]  # the main process's outcome, on every rank
    if refusal is not None:
        raise OutputError(refusal)
    if fd is not None:
        _HELD.add(path)
    try:
        yield
    finally:
        if fd is not None:
            _HELD.discard(path)
            os.close(fd)  # closing the last descriptor releases the flock


def _acquire(folder: Path, path: Path) -> int | None:
    """The locked descriptor; None where no lock file can be made (a parent that is a file, a read-only place):
    the folder cannot be written there either, and the command's own checks say why in one line (outputs.claim)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_TRUNC (filelock's): the holder's line must stay readable
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _holder(fd)
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise OutputError(f"{folder} is in use by {holder}; wait for it to finish, or choose another folder") from None
        raise OutputError(f"{folder}: cannot lock {path} ({error.strerror}); this filesystem may not support flock") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    return fd


def _holder(fd: int) -> str:
    """'process PID on HOST' from the lock file, or a plainer phrase while the holder has not written it yet."""
    try:
        found = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"process {int(found['pid'])} on {found['host']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "another milora process"
