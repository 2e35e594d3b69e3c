"""benchmarks/gpu_check.py --tiny: the GPU check's code, run on CPU with small shapes so that it cannot rot."""

import subprocess
import sys

from helpers import REPO


def test_gpu_check_tiny_prints_the_whole_table(shared_data):
    command = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--data-dir", str(shared_data)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line[:46].strip(): line[46:].split() for line in result.stdout.splitlines() if line.startswith("(")}
    assert len(rows) == 7
    assert float(rows["(a) minor sigma max rel error vs float64"][0]) < 1e-6
    assert rows["(c) logits at init == base, bit for bit"][:2] == ["yes", "no"]  # milora exact; PEFT's bf16 residual not
    assert float(rows["(b) train tokens/s"][0]) > 0 and float(rows["(b) train tokens/s"][1]) > 0
    assert float(rows["(d) merged vs adapted logits, max rel error"][0]) < 2e-2  # bf16 rounding of the merged weights
