"""Examples as token ids: the label mask of the loss, truncation, collation into padded batches."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rich.text import Text

from milora_cli.data import chat
from milora_cli.data.records import Record, prompt_for_generation
from milora_cli.errors import ModelError

IGNORE_INDEX = -100  # label value that torch's cross-entropy skips


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool

    @property
    def n_targets(self) -> int:
        """Tokens that carry loss: every label but the first (which no earlier token predicts)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def tokenize_example(
    ex: Record, tokenizer: Any, max_length: int, train_on_prompt: bool
) -> TokenizedExample | None:
    """Token ids and labels for one example; None when truncation leaves no token to learn from.

    Instructions: prompt and response are tokenised separately and concatenated, so the mask boundary falls
    exactly between them and the prompt tokens are the very tokens that generation is conditioned on. The
    response ends with EOS so the model learns to stop. Conversations: the chat template's pieces, the loss on
    the assistant turns (chat.py). Truncation keeps the first max_length tokens.
    """
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no eos token; the model could not learn where a response ends")
    if isinstance(ex, chat.Conversation):
        input_ids, trained = chat.tokenize_conversation(tokenizer, ex)
    else:
        prompt_ids = tokenizer(prompt_for_generation(ex), add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids, trained = prompt_ids + response_ids, [False] * len(prompt_ids) + [True] * len(response_ids)
    labels = [token if (on or train_on_prompt) else IGNORE_INDEX for token, on in zip(input_ids, trained, strict=True)]
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated)


def _tokenized(ex: Record, tokenizer: Any, max_length: int, train_on_prompt: bool) -> list[TokenizedExample | None]:
    """An example as the rows it trains: a document is cut into pieces of max_length, each trained on every token."""
    if isinstance(ex, chat.Text):
        return [TokenizedExample(ids, list(ids), truncated=False) for ids in chat.text_chunks(tokenizer, ex, max_length)]
    return [tokenize_example(ex, tokenizer, max_length, train_on_prompt)]


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
    examples: Sequence[Record], tokenizer: Any, max_length: int, train_on_prompt: bool
) -> TokenizedDataset:
    tokenized = [t for ex in examples for t in _tokenized(ex, tokenizer, max_length, train_on_prompt)]
    kept = [t for t in tokenized if t is not None]
    return TokenizedDataset(
        examples=kept,
        n_truncated=sum(t.truncated for t in kept),
        n_dropped=len(tokenized) - len(kept),
        n_tokens=sum(len(t.input_ids) for t in kept),
        n_label_tokens=sum(label != IGNORE_INDEX for t in kept for label in t.labels),
    )


@dataclass
class Batch:
    """A micro-batch as the loss takes it, with the label bookkeeping done on the CPU.

    `positions` index the flattened (B*T) token grid: the tokens whose NEXT token carries loss, and `targets`
    are those next tokens. The loss gathers them instead of masking on the device (a boolean mask of a
    device tensor makes the host wait for it).
    """

    inputs: dict[str, torch.Tensor]  # input_ids and attention_mask (padded) or position_ids (packed), (B, T) each
    labels: torch.Tensor  # (B, T) IGNORE_INDEX where no loss is taken (kept for inspection; the loss uses positions)
    positions: torch.Tensor  # (N,)
    targets: torch.Tensor  # (N,)
    n_tokens: int  # input tokens, padding excluded

    def to(self, device: torch.device | str) -> Batch:
        """The batch on `device`; to a GPU, through pinned memory, so the copies overlap with compute.

        A non_blocking copy from pageable memory is staged through a pinned buffer by the driver anyway and
        does not overlap; pinning here makes it truly asynchronous (the collate runs on the CPU meanwhile).
        """
        device = torch.device(device)
        if device.type == "cpu":
            return self
        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.pin_memory().to(device, non_blocking=True)

        return Batch({key: move(value) for key, value in self.inputs.items()}, self.labels, move(self.positions), move(self.targets), self.n_tokens)


def _label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets) of a (B, T) label grid: token t of a row predicts label t + 1."""
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
    rows, cols = keep.nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, labels[:, 1:][keep]


@dataclass
class Collator:
    """Builds a Batch: padded rows, or the examples packed into rows. A plain dataclass (picklable).

    padded   each example a row, right-padded to the longest, with an attention mask
    packed   the examples packed whole into rows of at most `row_tokens` tokens (a longer example gets a row
             of its own), position_ids restarting at 0 for each; transformers then attends only within an
             example (its packed-sequence masks), so little compute goes to padding. Rows are capped because
             attention with a mask costs the square of a row's length where no varlen kernel runs (sdpa or
             eager, on CPU): one row of 16 examples costs ~16x the attention of 16 rows. The rows are padded to
             the longest, and that padding is a segment of its own (positions from 0 again), so no attention
             mask is needed. Which example goes to which row is `pack_rows`.
    one row  (`row_tokens=None`) the whole micro-batch packed into a single row: what flash attention needs, since
             transformers takes its variable-length path only for a batch of one row
             (modeling_flash_attention_utils._is_packed_sequence); with more rows it would attend across the
             examples of a row. Flash attention's varlen kernel costs no square of the row's length.
    """

    pad_token_id: int
    packed: bool = False
    row_tokens: int | None = 256

    def __call__(self, batch: list[TokenizedExample]) -> Batch:
        return self._packed(batch) if self.packed else self._padded(batch)

    def _padded(self, batch: list[TokenizedExample]) -> Batch:
        width = max(len(t.input_ids) for t in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, t in enumerate(batch):
            n = len(t.input_ids)
            input_ids[row, :n] = torch.tensor(t.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(t.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        positions, targets = _label_positions(labels)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return Batch(inputs, labels, positions, targets, sum(len(t.input_ids) for t in batch))

    def _packed(self, batch: list[TokenizedExample]) -> Batch:
        lengths = [len(t.input_ids) for t in batch]
        rows = [list(range(len(batch)))] if self.row_tokens is None else pack_rows(lengths, self.row_tokens)
        used = [sum(lengths[i] for i in row) for row in rows]  # tokens of each row
        grid = [[], [], []]  # input ids, position ids, labels of each row, its padding a segment of its own
        for row, n in zip(rows, used, strict=True):
            examples = [batch[i] for i in row]
            pad = max(used) - n
            # An example's first label would be the target of the previous example's last token: never trained,
            # exactly as the first label of a padded row is never a target.
            grid[0].append([token for t in examples for token in t.input_ids] + [self.pad_token_id] * pad)
            grid[1].append([p for t in examples for p in range(len(t.input_ids))] + list(range(pad)))
            grid[2].append([label for t in examples for label in (IGNORE_INDEX, *t.labels[1:])] + [IGNORE_INDEX] * pad)
        input_ids, position_ids, labels = (torch.tensor(part, dtype=torch.long) for part in grid)  # (R, T) each
        positions, targets = _label_positions(labels)
        return Batch({"input_ids": input_ids, "position_ids": position_ids}, labels, positions, targets, sum(lengths))


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Rows of example indices (each index once, a row's indices ascending) whose rows x width is small.

    The batch costs (number of rows) x (longest row) tokens of compute, so the rows should be few and even.
    1. Start from the examples in order, a new row when the next does not fit (always possible).
    2. For R rows from the fewest that can hold the tokens, and each width W from the least possible up
       to the cap: the examples go longest first each into the fullest row it still fits (best-fit
       decreasing); the first W that holds them all is R's. The smallest R x W wins.
    On Commonsense170K-like mixes at batch 16 and 256 tokens this pads ~9% of a batch where step 1 alone
    padded ~24% (padding each example to the longest: ~46%).
    """
    cap, longest, total = max(row_tokens, *lengths), max(lengths), sum(lengths)  # a longer example: a row of its own
    best = _in_order(lengths, cap)
    best_area = _area(best, lengths)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep batch order
    for n_rows in range(-(-total // cap), len(lengths) + 1):
        if n_rows * longest >= best_area:
            break  # from here on even the least width is no better
        for width in range(max(-(-total // n_rows), longest), cap + 1):
            if n_rows * width >= best_area:
                break
            rows = _best_fit(order, lengths, n_rows, width)
            if rows is not None:
                best, best_area = rows, _area(rows, lengths)
                break
    return sorted(sorted(row) for row in best)


def _area(rows: list[list[int]], lengths: list[int]) -> int:
    return len(rows) * max(sum(lengths[i] for i in row) for row in rows)


def _in_order(lengths: list[int], cap: int) -> list[list[int]]:
    rows, used = [[]], 0
    for i, n in enumerate(lengths):
        if rows[-1] and used + n > cap:
            rows, used = [*rows, []], 0
        rows[-1].append(i)
        used += n
    return rows


def _best_fit(order: list[int], lengths: list[int], n_rows: int, width: int) -> list[list[int]] | None:
    """The examples in `order`, each into the fullest of `n_rows` rows of `width` it fits; None if one does not fit."""
    rows, used = [[] for _ in range(n_rows)], [0] * n_rows
    for i in order:
        fits = [r for r in range(n_rows) if used[r] + lengths[i] <= width]
        if not fits:
            return None
        r = max(fits, key=lambda r: used[r])
        rows[r].append(i)
        used[r] += lengths[i]
    return [row for row in rows if row]


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
