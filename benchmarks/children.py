"""One benchmark step in its own process: its wall time and its peak RSS, nothing of the parent's.

ru_maxrss of os.wait4 is the peak resident memory of that child alone (KiB on Linux); the measuring
parent imports no torch, so nothing it holds is inherited at fork and counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
            show_output: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `command`; exits with the tail of its stderr when it fails.

    `show_output=False` discards its stdout and keeps its stderr in a file (a pipe read after the wait
    would block a child that writes more than the pipe holds).
    """
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=None if show_output else subprocess.DEVNULL,
                                   stderr=None if show_output else stderr)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            stderr.seek(0)
            sys.exit(f"failed ({code}): {' '.join(command[:6])}\n{stderr.read().decode(errors='replace')[-3000:]}")
    return seconds, usage.ru_maxrss * 1024 / 1e9
