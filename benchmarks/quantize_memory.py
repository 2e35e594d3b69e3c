"""Peak RSS and time of the quickstart recipe with model.quantize=nf4 and without, side by side.

    python benchmarks/quantize_memory.py [--steps 30] [--heldout 50] [--workdir DIR]

1. An unmeasured init-only run (train.max_steps=0) fills a fresh factor cache, so that both measured runs
   read the same cached factors (a quantized and an unquantized run of the same weights share the keys).
2. `milora train recipes/quickstart.yaml` with --steps steps and --heldout held-out examples scored before
   and after, once as it is (fp32 base) and once with model.quantize=nf4, each in its own process:
   children.measure gives its wall time and ru_maxrss, the peak resident memory of that child alone.
Everything lives in a temporary folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from children import measure  # benchmarks/children.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]


def train_command(out: Path, steps: int, heldout: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "milora_cli", "train", "recipes/quickstart.yaml", f"train.max_steps={steps}",
            f"eval.heldout={heldout}", f"output.dir={out}", *overrides]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--heldout", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None, help="Where the temporary folder goes (default: the system's).")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="milora-quantize-bench-", dir=args.workdir))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MILORA_CACHE": str(root / "cache")}
    try:
        # the converted model is reused from the usual cache: link it, so only the factor cache is fresh
        models = Path(os.environ.get("MILORA_CACHE") or Path.home() / ".cache" / "milora") / "models"
        (root / "cache").mkdir()
        if models.is_dir():
            (root / "cache" / "models").symlink_to(models)
        measure(train_command(root / "init", 0, 0), env, REPO, show_output=False)
        rows = {}
        for label, overrides in (("fp32 base", ()), ("nf4 base", ("model.quantize=nf4",))):
            out = root / label.split()[0]
            seconds, rss = measure(train_command(out, args.steps, args.heldout, *overrides), env, REPO, show_output=False)
            summary = json.loads((out / "summary.json").read_text())
            losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
            rows[label] = (seconds, rss, losses[-1], summary.get("heldout_before"), summary.get("heldout_after"))
        print(f"quickstart, {args.steps} steps, {args.heldout} held-out examples before and after; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
        print(f"{'':10} {'time (s)':>9} {'peak RSS (GB)':>14} {'last loss':>10} {'held-out before -> after':>25}")
        for label, (seconds, rss, loss, before, after) in rows.items():
            scores = f"{100 * before:.1f}% -> {100 * after:.1f}%" if before is not None else "-"
            print(f"{label:10} {seconds:9.1f} {rss:14.2f} {loss:10.4f} {scores:>25}")
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
