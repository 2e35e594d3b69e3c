"""Examples as token ids: the label mask of the loss, truncation, collation into padded batches."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.text import Text

from milora_cli.data.records import Example, prompt_for_generation
from milora_cli.errors import ModelError

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool


def tokenize_example(
    ex: Example, tokenizer: Any, max_length: int, train_on_prompt: bool
) -> TokenizedExample | None:
    """Token ids and labels for one example; None when truncation leaves no token to learn from.

    Prompt and response are tokenised separately and concatenated, so the mask boundary falls exactly
    between them and the prompt tokens are the very tokens that generation is conditioned on. The
    response ends with EOS so the model learns to stop. Truncation keeps the first max_length tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no eos token; the model could not learn where a response ends")
    prompt_ids = tokenizer(prompt_for_generation(ex), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = prompt_ids + response_ids
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = prompt_labels + response_ids
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated)


@dataclass
class TokenizedDataset(torch.utils.data.Dataset):
    """Tokenized examples plus the counts `train --dry-run` reports. Usable directly by a DataLoader."""

    examples: list[TokenizedExample]
    n_truncated: int  # kept examples that lost tokens at max_length
    n_dropped: int  # examples whose response was cut away entirely
    n_tokens: int  # total input tokens of the kept examples
    n_label_tokens: int  # tokens that carry loss

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.examples[i]


def build_dataset(
    examples: Sequence[Example], tokenizer: Any, max_length: int, train_on_prompt: bool
) -> TokenizedDataset:
    tokenized = [tokenize_example(ex, tokenizer, max_length, train_on_prompt) for ex in examples]
    kept = [t for t in tokenized if t is not None]
    return TokenizedDataset(
        examples=kept,
        n_truncated=sum(t.truncated for t in kept),
        n_dropped=len(examples) - len(kept),
        n_tokens=sum(len(t.input_ids) for t in kept),
        n_label_tokens=sum(label != IGNORE_INDEX for t in kept for label in t.labels),
    )


@dataclass
class Collator:
    """Right-pads a batch to its longest example. A plain dataclass so DataLoader workers can pickle it."""

    pad_token_id: int

    def __call__(self, batch: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        width = max(len(t.input_ids) for t in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, t in enumerate(batch):
            n = len(t.input_ids)
            input_ids[row, :n] = torch.tensor(t.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(t.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def render_label_mask(tokenizer: Any, tokenized: TokenizedExample) -> Text:
    """The example as the loss sees it: masked (prompt) tokens dim, trained tokens bold green.

    Consecutive tokens with the same role are decoded together, so multi-byte characters split across
    tokens still read correctly.
    """
    text = Text()
    pairs = zip(tokenized.input_ids, tokenized.labels, strict=True)
    for trained, run in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text.append(tokenizer.decode([token for token, _ in run]), style="bold green" if trained else "dim")
    n_trained = sum(label != IGNORE_INDEX for label in tokenized.labels)
    text.append("\nprompt (no loss)", style="dim")
    text.append("  trained", style="bold green")
    text.append(f"  {n_trained} of {len(tokenized.labels)} tokens carry loss")
    text.append("; truncated at max_length" if tokenized.truncated else "")
    return text
