"""The first GPU session, rehearsed on the CPU (issue 24): the bundle is built, fits the device's limit, and the
device's command runs in a clean virtual environment that has what the device image has and nothing else.

What differs from the device, and why: Python 3.11 and torch 2.13 (the CPU build on this machine's disk; PyPI
serves torch 2.11 for Linux only as a CUDA build of several GB), so the bundle's wheels are fetched for 3.11
here and for 3.12 there. The rest is the device's: transformers 5.17, no pydantic installed (it comes from the
bundle, through PYTHONPATH only), no ../shared beside the repository, no hub access (HF_HUB_OFFLINE).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

# The device image's packages that milora's import path needs (device KINDS.md), transformers at its version.
DEVICE_PACKAGES = ["transformers==5.17.0", "accelerate", "peft", "typer", "rich", "pyyaml", "safetensors", "numpy", "jinja2"]
DEVICE_LIMIT_MIB = 64


def tree_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and ".git" not in p.parts) / 2**20


@pytest.mark.slow
def test_the_gpu_session_runs_from_the_bundle_in_the_device_image_on_cpu(tmp_path, shared_data, smollm2_path):
    # 1. the repository as the device receives it: tracked files, no ../shared beside it
    repo = tmp_path / "device" / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, repo / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    bundle = ["--data-dir", str(shared_data), "--out", str(repo / ".gpu"), "--python-version", version]
    subprocess.run([sys.executable, "benchmarks/gpu_bundle.py", *bundle], cwd=REPO, check=True, capture_output=True, text=True)
    assert tree_mib(repo / ".gpu") < 60 and tree_mib(repo) < DEVICE_LIMIT_MIB
    # 2. a clean environment with the device image's packages and without pydantic
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, capture_output=True, text=True)
    subprocess.run([*pip, *DEVICE_PACKAGES], check=True, capture_output=True, text=True)
    # typer's newest releases require pydantic; the device image's typer does not have it: remove it as the image lacks it
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "--yes", "pydantic", "pydantic-core"], check=True)
    absent = subprocess.run([str(venv / "bin" / "python"), "-c", "import pydantic"], capture_output=True, text=True)
    assert absent.returncode != 0  # the bundle must bring it
    # 3. the device's command, in its CPU mode
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "MILORA_SHARED_DATA")}
    env |= {"PATH": f"{venv / 'bin'}:{env['PATH']}", "GPU_SITE": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MILORA_CACHE": str(tmp_path / "cache"), "OUT": str(tmp_path / "out")}
    result = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--cpu"], cwd=repo, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (tmp_path / "out" / "gpu_session.txt").read_text().splitlines()
    assert lines[0].startswith("session: CPU") and "transformers 5.17.0" in lines[0]
    smoke = [line for line in lines if line.startswith("smoke: ") and (" ok" in line or "FAILED" in line)]
    assert len(smoke) == 7 and not [line for line in smoke if "FAILED" in line], "\n".join(smoke)
    rows = [line for line in lines if line.startswith("(")]
    assert len(rows) == 7 and lines[-1].startswith("gpu_check: exit 0 ")
