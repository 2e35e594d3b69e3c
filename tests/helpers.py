"""What several test files share: the repository root, the CLI in a fresh interpreter, a relative error."""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def milora(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m milora_cli ARGS` as a user runs it, output captured."""
    return subprocess.run([sys.executable, "-m", "milora_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a reference in this process with the thread count of the torchrun children it is compared with:
    1 and 2 threads sum floats in different orders, and Adam turns that into ~1e-4 on near-zero elements."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
