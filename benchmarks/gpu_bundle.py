"""Write .gpu/: what a lent GPU machine lacks to run benchmarks/gpu_session.py (`make gpu-bundle`).

The device machine (README "GPU") has no network, Python 3.12, torch 2.11 and transformers 5.17, accelerate,
peft, typer, rich, pyyaml and safetensors, but no pydantic, and it receives at most 64 MiB of files. So:

    .gpu/wheels/      pydantic and what it needs, built for CPython 3.12 manylinux x86_64 (the versions here)
    .gpu/tokenizer/   SmolLM2-135M-Instruct's tokenizer and config, not its 514 MB of weights: every model
                      of the GPU session is built with random weights
    .gpu/data/        the part of ../shared/data the session reads: commonsense train examples for
                      gpu_check's 30 steps and the end-to-end run, BoolQ test items for its eval

    python benchmarks/gpu_bundle.py [--data-dir ../shared/data] [--out .gpu]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the packages of milora's import path that the device image lacks (device README, KINDS.md's package list)
WHEELS = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json", "generation_config.json")
TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")  # gpu_check.TRAIN_SETS
TRAIN_PER_SET, TEST_ITEMS = 600, 64  # gpu_check takes 4 x 30 x 16 examples of the four sets' union
LIMIT_MIB = 60  # the device takes 64 MiB of files in all, the repository included


def wheels(out: Path, python_version: str) -> None:
    """Download the wheels of WHEELS at the versions installed here, for CPython `python_version` on x86_64 Linux."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *platforms, "-d", str(out), *pins], check=True)


def tokenizer(out: Path) -> None:
    from milora_cli import models

    source = Path(models.resolve("smollm2-135m"))
    out.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def data(source: Path, out: Path) -> None:
    for name in TRAIN_SETS:
        records = json.loads((source / "commonsense" / name / "train.json").read_text())
        (out / "commonsense" / name).mkdir(parents=True)
        (out / "commonsense" / name / "train.json").write_text(json.dumps(records[:TRAIN_PER_SET]))
    test = json.loads((source / "commonsense" / "boolq" / "test.json").read_text())
    (out / "commonsense" / "boolq" / "test.json").write_text(json.dumps(test[:TEST_ITEMS]))


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / ".gpu")
    parser.add_argument("--python-version", default="3.12", help="the device's Python (3.12); the CPU rehearsal passes its own")
    args = parser.parse_args(argv)
    if not (args.data_dir / "commonsense").is_dir():
        parser.error(f"{args.data_dir} holds no commonsense/ folder: pass --data-dir ../shared/data")
    shutil.rmtree(args.out, ignore_errors=True)
    wheels(args.out / "wheels", args.python_version)
    tokenizer(args.out / "tokenizer")
    data(args.data_dir, args.out / "data")
    size = size_mib(args.out)
    if size > LIMIT_MIB:
        raise SystemExit(f"{args.out} is {size:.1f} MiB, over the {LIMIT_MIB} MiB the device machine takes beside the repository")
    print(f"{args.out}: {size:.1f} MiB ({', '.join(sorted(p.name for p in (args.out / 'wheels').iterdir()))})")
    return args.out


if __name__ == "__main__":
    main()
