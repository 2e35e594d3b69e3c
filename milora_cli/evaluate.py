"""Scoring by generation: batched greedy generation with left padding, and held-out accuracy."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from milora_cli.data import Example, prompt_for_generation

Scorer = Callable[[str, Example], bool]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of `prompts` (new text only), in batches with left padding."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # so every prompt ends at the last position and generation continues it
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            tokens = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (B, prompt_len + new)
            new = tokens[:, batch["input_ids"].shape[1] :]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def contains_answer(generation: str, example: Example) -> bool:
    """Generic rule for data with an `answer` field: the answer occurs as a whole word, any case."""
    if not example.answer:
        return False
    return re.search(rf"(?<!\w){re.escape(example.answer.strip())}(?!\w)", generation, re.IGNORECASE) is not None


def heldout_accuracy(
    model, tokenizer, examples: Sequence[Example], scorer: Scorer, max_new_tokens: int, batch_size: int
) -> tuple[float, list[dict]]:
    """Accuracy of `scorer` on greedy generations for `examples`, and one record per example."""
    prompts = [prompt_for_generation(example) for example in examples]
    generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    records = [
        {"instruction": ex.instruction, "gold": ex.answer, "generation": text, "correct": scorer(text, ex)}
        for ex, text in zip(examples, generations)
    ]
    accuracy = sum(record["correct"] for record in records) / max(1, len(records))
    return accuracy, records
