"""What a run reports: the metrics file (and through it the experiment trackers), the progress bar, library versions."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from milora_cli import atomic

LIBRARIES = ("milora", "torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "pydantic", "gguf")


def versions() -> dict[str, Any]:
    """Python, platform, CUDA and the versions of the libraries a run depends on."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **found,
    }


class MetricsLog:
    """metrics.jsonl in the run dir (one JSON object a line, flushed each line), milora's own record; each record
    also goes to `report` (the run's experiment trackers: Accelerator.log), numbers only."""

    def __init__(self, run_dir: Path, resume_step: int | None, report: Callable[..., None] | None = None):
        """A fresh file, or on resume the old one cut back to what the checkpoint at resume_step had seen."""
        self.path = run_dir / "metrics.jsonl"
        atomic.refuse_link(self.path)  # read and emptied below: never another file's
        kept = ""
        if resume_step is not None and self.path.is_file():
            lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]  # damaged lines are dropped
            kept = "".join(line + "\n" for line in lines if _step_of(line) <= resume_step)
        self.handle = atomic.open_to_append(self.path, empty=True)
        self.handle.write(kept)
        self.report = report

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.report is not None:
            values = {key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}
            self.report(values, step=record["step"])

    def close(self) -> None:
        self.handle.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a crash
        return float("inf")


def bar_columns(*middle: ProgressColumn) -> tuple[ProgressColumn, ...]:
    """The columns of milora's progress bars: name, bar, n/total, `middle`, elapsed, ETA."""
    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *middle, TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn())


class Progress:
    """A rich progress bar with loss, lr, tokens/s and ETA; silent off the main process."""

    def __init__(self, console: Console, total: int, start_step: int, enabled: bool):
        self.console = console
        self.enabled = enabled
        self.bar = RichProgress(*bar_columns(TextColumn("{task.fields[stats]}")), console=console, disable=not enabled)
        self.task = self.bar.add_task("train", total=total, completed=start_step, stats="")

    def __enter__(self) -> Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.bar.update(self.task, completed=step)

    def update(self, step: int, record: dict[str, Any]) -> None:
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} tok/s"
        self.bar.update(self.task, completed=step, stats=stats)
        if self.enabled and not self.console.is_terminal:  # logs and CI get a line per report
            self.console.print(f"step {step}: {stats}")

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
