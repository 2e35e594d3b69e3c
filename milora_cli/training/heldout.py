"""The held-out generation score of a run, before and after training.

The first eval.heldout validation examples that carry a gold answer are generated greedily and scored
by the builtin dataset's own scorer or, for other data, by whether the answer appears in the generation.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from milora_cli.data import builtin
from milora_cli.data.records import Example
from milora_cli.evaluation import generate
from milora_cli.recipe import Recipe
from milora_cli.training.run_dir import RunDir


class HeldoutScorer:
    """Scores the model on the held-out examples; the main process only."""

    def __init__(self, recipe: Recipe, model, tokenizer, val_examples: list[Example], run: RunDir, console: Console):
        self.cfg, self.model, self.tokenizer, self.run, self.console = recipe.eval, model, tokenizer, run, console
        self.examples = [ex for ex in val_examples if ex.answer][: recipe.eval.heldout] if run.main else []
        self.scorer = builtin.scorer_for(recipe.data) or generate.contains_answer

    def score(self, label: str) -> dict[str, Any]:
        """{"heldout_<label>": accuracy}, with the scored generations in RUN/heldout_<label>.jsonl; {} when off."""
        if not self.examples:
            return {}
        accuracy, scored = generate.heldout_accuracy(
            self.model, self.tokenizer, self.examples, self.scorer, self.cfg.max_new_tokens, self.cfg.batch_size
        )
        self.run.write(f"heldout_{label}.jsonl", "".join(json.dumps(r) + "\n" for r in scored))
        self.console.print(f"held-out score {label} training: [bold]{100 * accuracy:.1f}%[/] ({len(self.examples)} examples)")
        return {f"heldout_{label}": accuracy}
