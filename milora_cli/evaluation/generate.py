"""Scoring: batched generation with left padding (greedy or beams), held-out accuracy, and token loss."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from milora_cli import dtypes
from milora_cli.data import chat
from milora_cli.data.records import Record, prompt_for_generation

Scorer = Callable[[str, Record], bool]
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


@contextmanager
def gathered(model) -> Iterator[None]:
    """Under FSDP2, keep each unit's weights gathered from its first forward until the generation ends, instead of
    all-gathering every layer again for every decoded token; so only when every process has room for the whole
    model twice over (the decision is shared: a process that kept its weights while another gathered again
    would wait forever). A model sharded because it does not fit one device gathers per token, as before.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule) and module is not model]  # the root keeps its own rule
    if not units or not _all_have_room_for(model):
        yield
        return
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def _all_have_room_for(model) -> bool:
    """Whether every process has free memory for twice the whole model (parameters at their global size)."""
    device = next(model.parameters()).device
    whole = sum(p.numel() * p.element_size() for p in model.parameters())  # a DTensor's numel is the global one
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_host_memory()
    room = torch.tensor([int(free >= 2 * whole)], device=device)
    torch.distributed.all_reduce(room, op=torch.distributed.ReduceOp.MIN)
    return bool(room.item())


def _available_host_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none: keep gathering per token)."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
    num_beams: int = 1, stop_strings: Sequence[str] = (), add_special_tokens: bool = True,
) -> list[str]:
    """Greedy (or beam-search) continuations of `prompts` (new text only), in batches with left padding.

    A sequence that produces one of `stop_strings` stops there (the string is kept in its text). Prompts
    rendered by a chat template pass add_special_tokens=False: the template writes any BOS itself.
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # so every prompt ends at the last position and generation continues it
    device = next(model.parameters()).device
    stops = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    outputs: list[str] = []
    try:
        with eval_mode(model), gathered(model):
            for start in range(0, len(prompts), batch_size):
                batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True,
                                  add_special_tokens=add_special_tokens).to(device)
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


def contains_answer(generation: str, example: Record) -> bool:
    """Generic rule for data with an `answer` field: the answer occurs as a whole word, any case."""
    if not example.answer:
        return False
    return re.search(rf"(?<!\w){re.escape(example.answer.strip())}(?!\w)", generation, re.IGNORECASE) is not None


def prompt_text(example: Record, tokenizer) -> str:
    """The text generation continues: the Alpaca prompt of an instruction, or a conversation before its last
    assistant turn through the chat template with the generation prompt (exactly the tokens that training masked)."""
    if isinstance(example, chat.Conversation):
        return chat.render(tokenizer, example.prompt_messages, generation_prompt=True)
    return prompt_for_generation(example)


def heldout_accuracy(
    model, tokenizer, examples: Sequence[Record], scorer: Scorer, max_new_tokens: int, batch_size: int
) -> tuple[float, list[dict]]:
    """Accuracy of `scorer` on greedy generations for `examples`, and one record per example.

    The examples come from one validation source, so they are all conversations or all instructions.
    """
    prompts = [prompt_text(example, tokenizer) for example in examples]
    conversations = bool(examples) and isinstance(examples[0], chat.Conversation)
    generations = generate(model, tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens=not conversations)
    records = [
        {"instruction": ex.instruction, "gold": ex.answer, "generation": text, "correct": scorer(text, ex)}
        for ex, text in zip(examples, generations, strict=False)
    ]
    accuracy = sum(record["correct"] for record in records) / max(1, len(records))
    return accuracy, records
