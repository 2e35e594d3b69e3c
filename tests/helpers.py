"""What several test files share: the repository root, the CLI in a fresh interpreter, a relative error, the
float64 tolerance of exact equalities, a run as a stop after a checkpoint leaves it."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def milora(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m milora_cli ARGS` as a user runs it, output captured."""
    return subprocess.run([sys.executable, "-m", "milora_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def stopped_copy(straight: Path, stopped: Path) -> None:
    """`straight`'s run folder as `stopped`, as a stop after its last checkpoint would have left it: without the
    final and best adapters and the summary, its recipe.yaml naming `stopped` as its output.dir."""
    shutil.copytree(straight, stopped, ignore=shutil.ignore_patterns("adapter", "best", "summary.json"))
    (stopped / "recipe.yaml").write_text((straight / "recipe.yaml").read_text().replace(str(straight), str(stopped)))


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64 (exact for float32 inputs)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# What "equal" means for two float64 computations that are equal in exact arithmetic but sum in other orders
# (micro-batches, processes, shards, fused kernels, a resume): float64's unit roundoff is 2^-53 ~ 1.1e-16, the
# tiny model's sums have < 10^4 terms, and Adam (lr 1e-2, eps 1e-8) turns a gradient's absolute error d into at
# most lr * d / eps in a factor, so the factors agree to ~1e-12 relative, losses to ~1e-14. A real difference
# (a wrong normalisation, batch, RNG stream or state) shows at 1e-4 or more. float32 runs of the same tests
# differ by up to 4e-4 on one CPU and more on another: that is why the equalities are tested in float64.
EXACT_FP64 = 1e-10
