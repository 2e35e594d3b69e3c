"""The paper's benchmarks: where their data lives, their prompts, and how one generation is scored.

Task data comes from a folder laid out like ../shared/data (`--data-dir`) or, without one, from the
hub with `datasets.load_dataset` (the same files: LLM-Adapters' test sets, GSM8K, the MATH test sets of
math-evaluation-harness, WikiText-2).

Prompts are the training prompts (records.prompt_for_generation on the record normalised as training
normalises it), byte for byte. GSM8K and MATH add MetaMath's cue "Let's think step by step." as the
first words of the response: MetaMath writes "### Response: Let's think step by step." because its
training prompt ends "### Response:"; ours ends "### Response:\\n", so the cue follows that newline and
the prompt the model was tuned on stays an exact prefix of the prompt it is scored on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from milora_cli import atomic
from milora_cli.evaluation import answers
from milora_cli.data import records
from milora_cli.errors import EvalError
from milora_cli.recipe import BenchmarkTask

Kind = Literal["choice", "gsm8k", "math", "perplexity"]
MATH_CUE = "Let's think step by step."
_LLM_ADAPTERS = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset"
_MATH_HARNESS = "https://raw.githubusercontent.com/ZubinGou/math-evaluation-harness/main/data"


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    local: str  # path under --data-dir
    hub: dict[str, Any]  # keyword arguments of datasets.load_dataset


@dataclass(frozen=True)
class Item:
    """One example to score: a stable id (the record's index in its file), the prompt, the gold answer."""

    id: str
    prompt: str
    gold: str


def _commonsense(name: str) -> Task:
    hub = {"path": "json", "data_files": f"{_LLM_ADAPTERS}/{name}/test.json", "split": "train"}
    return Task(name, "choice", f"commonsense/{name}/test.json", hub)


TASKS: dict[str, Task] = {name: _commonsense(name) for name in answers.CHOICE_PATTERNS} | {
    "gsm8k": Task("gsm8k", "gsm8k", "math/gsm8k_test.jsonl", {"path": "openai/gsm8k", "name": "main", "split": "test"}),
    "math": Task("math", "math", "math/MATH_test.jsonl",
                 {"path": "json", "data_files": f"{_MATH_HARNESS}/math/test.jsonl", "split": "train"}),
    "math500": Task("math500", "math", "math/MATH500_test.jsonl", {"path": "HuggingFaceH4/MATH-500", "split": "test"}),
    "wikitext": Task("wikitext", "perplexity", "wikitext2/test.txt",
                     {"path": "Salesforce/wikitext", "name": "wikitext-2-v1", "split": "test"}),
}
assert set(TASKS) == set(get_args(BenchmarkTask)), "recipe.BenchmarkTask and TASKS must name the same tasks"
COMMONSENSE = list(answers.CHOICE_PATTERNS)


def max_new_tokens(task: Task, choice_tokens: int, math_tokens: int) -> int:
    return choice_tokens if task.kind == "choice" else math_tokens


def stop_strings(task: Task) -> tuple[str, ...]:
    """Strings that end a generation early; MetaMath's for the math tasks, none for commonsense."""
    return answers.MATH_STOPS if task.kind in ("gsm8k", "math") else ()


def score(task: Task, generation: str, gold: str) -> tuple[str | None, bool]:
    """(prediction, correct) of one generation under the task's protocol."""
    if task.kind == "choice":
        prediction = answers.extract_choice(generation, task.name)
        return prediction, prediction == gold
    if task.kind == "gsm8k":
        prediction = answers.extract_number(generation)
        return prediction, answers.numbers_equal(prediction, gold)
    prediction = answers.extract_math(generation)
    return prediction, answers.math_equal(prediction, gold)


def _choice_item(raw: dict, index: int, source: str) -> Item:
    example = records.normalize_record(raw, "llm_adapters", source=source, index=index)
    return Item(str(index), records.prompt_for_generation(example), str(raw["answer"]))


def _gsm8k_item(raw: dict, index: int, source: str) -> Item:
    example = records.normalize_record(raw, "gsm8k", source=source, index=index)  # training's normalisation
    return Item(str(index), records.prompt_for_generation(example) + MATH_CUE, answers.gsm8k_gold(raw["answer"]))


def _math_item(raw: dict, index: int, source: str) -> Item:
    if "problem" not in raw or "solution" not in raw:
        raise EvalError(f"{source}, record {index}: a MATH record needs 'problem' and 'solution'; keys seen: {sorted(raw)}")
    gold = answers.last_boxed(raw["solution"])
    if gold is None:
        raise EvalError(f"{source}, record {index}: the solution has no \\boxed{{...}} answer")
    return Item(str(index), records.format_prompt(raw["problem"]) + MATH_CUE, gold)


_ITEMS: dict[str, Callable[[dict, int, str], Item]] = {"choice": _choice_item, "gsm8k": _gsm8k_item, "math": _math_item}


def load_items(task: Task, data_dir: str | None, limit: int | None) -> list[Item]:
    """The first `limit` examples of a generation task, as prompts and gold answers."""
    records, source = _records(task, data_dir)
    records = records[:limit] if limit is not None else records
    try:
        return [_ITEMS[task.kind](raw, index, source) for index, raw in enumerate(records)]
    except KeyError as error:
        raise EvalError(f"{source}: records lack the key {error} that task {task.name} needs") from None


def check_data(names: list[str], data_dir: str | None, flag: str) -> None:
    """Refuse a data folder that lacks a task's file now, before a model is loaded or anything trained."""
    if data_dir is None:
        return
    if not Path(data_dir).expanduser().is_dir():
        raise EvalError(f"{flag} {data_dir} is not a folder; it must be laid out like ../shared/data")
    for name in dict.fromkeys(names):
        _local(TASKS[name], data_dir, flag)


def load_text(task: Task, data_dir: str | None) -> str:
    """The whole text of a perplexity task."""
    if data_dir is not None:
        return atomic.read_text(_local(task, data_dir), EvalError)
    return "".join(row["text"] for row in _hub(task))


def _local(task: Task, data_dir: str, flag: str = "--data-dir") -> Path:
    path = Path(data_dir).expanduser() / task.local
    if not path.is_file():
        raise EvalError(f"task {task.name}: {path} not found; {flag} must be laid out like ../shared/data ({task.local})")
    return path


def _records(task: Task, data_dir: str | None) -> tuple[list[dict], str]:
    if data_dir is None:
        return _hub(task), f"hub {task.hub['path']}"
    path = _local(task, data_dir)
    text = atomic.read_text(path, EvalError)
    try:
        found = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError as error:
        raise EvalError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(found, list) or not all(isinstance(record, dict) for record in found):
        raise EvalError(f"{path}: a benchmark file holds a list of records (JSON objects), found {type(found).__name__}")
    if not found:
        raise EvalError(f"{path}: no records; a task with no examples would score 0% and pull the average down")
    return found, str(path)


def _hub(task: Task) -> list[dict]:
    import datasets  # slow to import; only runs without --data-dir need it

    try:
        return datasets.load_dataset(**task.hub).to_list()
    except Exception as error:  # offline, moved, renamed: all one line for the user
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise EvalError(f"task {task.name}: cannot load it from the hub ({first}); pass --data-dir with a local copy") from None
