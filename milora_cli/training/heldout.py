"""The held-out generation score of a run, before and after training.

The first eval.heldout validation examples that carry a gold answer are generated greedily and scored
by the builtin dataset's own scorer or, for other data, by whether the answer appears in the generation.
Instructions are prompted with the Alpaca prompt; conversations (which carry an `answer` key) with their
turns before the last assistant turn, through the chat template with the generation prompt, so the
generation is the assistant's answer (generate.prompt_text).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from milora_cli.data import builtin
from milora_cli.data.records import Record
from milora_cli.evaluation import generate
from milora_cli.recipe import Recipe
from milora_cli.ranks import Ranks, shared_rounds
from milora_cli.training.run_dir import RunDir


class HeldoutScorer:
    """Scores the model on the held-out examples, each process generating its share of the batches."""

    def __init__(self, recipe: Recipe, model, tokenizer, val_examples: list[Record], run: RunDir, console: Console, ranks: Ranks):
        self.cfg, self.model, self.tokenizer, self.run, self.console, self.ranks = recipe.eval, model, tokenizer, run, console, ranks
        self.examples = [ex for ex in val_examples if ex.answer][: recipe.eval.heldout]
        self.scorer = builtin.scorer_for(recipe.data) or generate.contains_answer

    def score(self, label: str) -> dict[str, Any]:
        """{"heldout_<label>": accuracy}, with the scored generations in RUN/heldout_<label>.jsonl; {} when off.

        The batches are those of one process, shared out over the processes (ranks.shared_rounds),
        so the score is the same on any number of them.
        """
        if not self.examples:
            return {}
        size = self.cfg.batch_size
        batches = [self.examples[start : start + size] for start in range(0, len(self.examples), size)]
        scored: list[dict] = []
        shared_rounds(batches, self.ranks, self._score_batch, scored.extend)
        if not self.ranks.main:
            return {}
        accuracy = sum(record["correct"] for record in scored) / len(scored)
        self.run.write(f"heldout_{label}.jsonl", "".join(json.dumps(r) + "\n" for r in scored))
        self.console.print(f"held-out score {label} training: [bold]{100 * accuracy:.1f}%[/] ({len(self.examples)} examples)")
        return {f"heldout_{label}": accuracy}

    def _score_batch(self, batch: list[Record]) -> list[dict]:
        return generate.heldout_accuracy(self.model, self.tokenizer, batch, self.scorer, self.cfg.max_new_tokens, self.cfg.batch_size)[1]
