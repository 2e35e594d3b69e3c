"""Scoring: batched generation with left padding (greedy or beams), held-out accuracy, and token loss."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from milora_cli import dtypes
from milora_cli.data.records import Example, prompt_for_generation

Scorer = Callable[[str, Example], bool]
TOKENS_PER_BATCH = 4096  # tokens of one loss-scoring batch (WikiText windows)


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """Dropout off while scoring; the model's training flag restored after (train.py scores mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
    num_beams: int = 1, stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy (or beam-search) continuations of `prompts` (new text only), in batches with left padding.

    A sequence that produces one of `stop_strings` stops there (the string is kept in its text).
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every prompt ends at the last position and generation continues it
    device = next(model.parameters()).device
    stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    outputs: list[str] = []
    try:
        with eval_mode(model):
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
                tokens = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=num_beams,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **stops,
                )  # (B, prompt_len + new)
                new = tokens[:, batch["input_ids"].shape[1] :]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


@torch.no_grad()
def window_losses(model, windows: Sequence[Sequence[int]], tokens_per_batch: int = TOKENS_PER_BATCH) -> list[tuple[float, int]]:
    """(summed next-token loss in nats, predicted tokens) of each token window, scored independently.

    Every token of a window but the first is predicted from the ones before it in the same window.
    Windows are right-padded into batches of about `tokens_per_batch` tokens; pads carry no loss.
    """
    device = next(model.parameters()).device
    per_batch = max(1, tokens_per_batch // max(len(w) for w in windows)) if windows else 1
    results: list[tuple[float, int]] = []
    with eval_mode(model):
        for start in range(0, len(windows), per_batch):
            chunk = windows[start : start + per_batch]
            width = max(len(w) for w in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, T)
            for row, window in enumerate(chunk):
                ids[row, : len(window)] = torch.tensor(window)
                mask[row, : len(window)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            logits = logits.to(dtypes.at_least_fp32(logits.dtype))
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
            nll = nll * mask[:, 1:]
            results += [(float(row_nll.sum()), int(row_mask.sum())) for row_nll, row_mask in zip(nll, mask[:, 1:], strict=False)]
    return results


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
        for ex, text in zip(examples, generations, strict=False)
    ]
    accuracy = sum(record["correct"] for record in records) / max(1, len(records))
    return accuracy, records
