"""Wall time of `milora svd-inspect smollm2-135m` (all 7 projection types x 30 layers), cold and warm.

Each run is the installed command in a fresh process, so the times include Python start-up, imports and
reading the weights. Cold: an empty spectra cache (a temporary MILORA_CACHE whose models/ links to the real
one, so the GGUF conversion is not re-done). Warm: the same cache, filled by the cold run.

    python benchmarks/svd_inspect_speed.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from milora_cli import models


def timed(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "milora_cli", "svd-inspect", "smollm2-135m"], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def busy_processes() -> str:
    """Other processes using the CPU now: what the times were measured beside."""
    rows = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()[1:]
    busy = [row.strip()[:110] for row in rows if float(row.split()[0]) >= 5 and "svd_inspect_speed" not in row]
    return "\n  ".join(busy) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the command (default: unset)")
    args = parser.parse_args()
    models.resolve("smollm2-135m")  # convert the GGUF once, outside the timing
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; other busy processes:\n  {busy_processes()}")
    cold, warm = [], []
    for _ in range(args.repeats):
        cache = Path(tempfile.mkdtemp(prefix="milora-bench-"))
        (cache / "models").symlink_to(models.cache_root() / "models")
        env["MILORA_CACHE"] = str(cache)
        cold.append(timed(env))
        warm.append(timed(env))
        shutil.rmtree(cache)
    print(f"OMP_NUM_THREADS={args.threads or 'unset'}; cold (s): {', '.join(f'{t:.1f}' for t in cold)}; "
          f"warm (s): {', '.join(f'{t:.1f}' for t in warm)}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
