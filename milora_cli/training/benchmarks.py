"""The recipe's benchmarks (eval.tasks) during and after training, scored by `milora eval`'s own code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from milora_cli.evaluation.suite import evaluate_model
from milora_cli.ranks import Ranks
from milora_cli.recipe import EvalConfig


class TrainingBenchmarks:
    """A recipe's eval.tasks scored during training (eval.every) into RUN/eval/step-N and after it into RUN/eval/final."""

    def __init__(self, cfg: EvalConfig, model, tokenizer, run_dir: Path, console: Console, ranks: Ranks):
        self.cfg, self.model, self.tokenizer, self.run_dir, self.console = cfg, model, tokenizer, run_dir, console
        self.ranks, self.enabled = ranks, bool(cfg.tasks)  # every process scores its share

    def at_step(self, step: int, max_steps: int) -> None:
        if self.enabled and self.cfg.every and step % self.cfg.every == 0 and step < max_steps:
            self._run(f"step-{step:06d}", step)

    def after_training(self, step: int) -> dict[str, Any]:
        """{"benchmarks": scores per task} of the final model; {} when the recipe names no tasks."""
        scores = self._run("final", step) if self.enabled else {}
        return {"benchmarks": scores["tasks"]} if scores else {}

    def _run(self, name: str, step: int) -> dict[str, Any]:
        identity = f"{self.run_dir.resolve()} at step {step}"
        self.console.print(f"benchmarks at step {step}: {', '.join(self.cfg.tasks)}")
        output = self.run_dir / "eval" / name
        return evaluate_model(self.model, self.tokenizer, self.cfg, output, identity, self.console, bars=False, ranks=self.ranks)
