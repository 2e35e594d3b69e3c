"""The paper's benchmarks: where their data lives, their prompts, and how one generation is scored.

Task data comes from `--data-dir`: a folder laid out like ../shared/data, or a hub dataset id whose files
are laid out the same way. Without it, the tasks that a public hub dataset holds are read from there:
GSM8K from openai/gsm8k (config main, split test), MATH-500 from HuggingFaceH4/MATH-500 (test), WikiText-2
from Salesforce/wikitext (wikitext-2-v1, test), each split resolved and fetched alone as training data is
(data/hub.py; offline: read from the cache, locate.py) and read with milora's own readers. No hub dataset
is known to hold LLM-Adapters' commonsense test sets or the 5,000 MATH test problems of
math-evaluation-harness: those tasks need `--data-dir`.

Prompts are the training prompts (records.prompt_for_generation on the record normalised as training
normalises it), byte for byte. GSM8K and MATH add MetaMath's cue "Let's think step by step." as the
first words of the response: MetaMath writes "### Response: Let's think step by step." because its
training prompt ends "### Response:"; ours ends "### Response:\\n", so the cue follows that newline and
the prompt the model was tuned on stays an exact prefix of the prompt it is scored on. With eval.prompt chat
(`milora eval --prompt chat`) the question is one user turn through the model's chat template instead, and
the cue opens the assistant's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from milora_cli import atomic, locate
from milora_cli.data import chat, hub, records
from milora_cli.errors import DataError, EvalError
from milora_cli.evaluation import answers
from milora_cli.recipe import BenchmarkTask, PromptStyle

Kind = Literal["choice", "gsm8k", "math", "perplexity"]
MATH_CUE = "Let's think step by step."


@dataclass(frozen=True)
class HubFiles:
    """Where a public hub dataset holds a task's data: the repository, its config (None: the default) and
    split, resolved as training data is (data/hub.py)."""

    repo: str
    config: str | None
    split: str


@dataclass(frozen=True)
class Task:
    name: str
    kind: Kind
    local: str  # path under --data-dir (a folder, or a hub dataset laid out like it)
    hub: HubFiles | None  # the task's public hub dataset, read when there is no --data-dir


@dataclass(frozen=True)
class Item:
    """One example to score: a stable id (the record's index in its file), the prompt, the gold answer."""

    id: str
    prompt: str
    gold: str


TASKS: dict[str, Task] = {name: Task(name, "choice", f"commonsense/{name}/test.json", None) for name in answers.CHOICE_PATTERNS} | {
    "gsm8k": Task("gsm8k", "gsm8k", "math/gsm8k_test.jsonl", HubFiles("openai/gsm8k", "main", "test")),
    "math": Task("math", "math", "math/MATH_test.jsonl", None),
    "math500": Task("math500", "math", "math/MATH500_test.jsonl", HubFiles("HuggingFaceH4/MATH-500", None, "test")),
    "wikitext": Task("wikitext", "perplexity", "wikitext2/test.txt", HubFiles("Salesforce/wikitext", "wikitext-2-v1", "test")),
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


Prompter = Callable[[str, str], str]  # (instruction, input) -> the prompt text


def prompter(style: PromptStyle, tokenizer) -> Prompter:
    """eval.prompt: the paper's Alpaca prompt (records.format_prompt), or one user turn through the model's chat
    template with the generation prompt (chat.user_prompt), for chat models tuned on conversations."""
    return records.format_prompt if style == "alpaca" else chat.user_prompt(tokenizer)


def _choice_item(raw: dict, index: int, source: str, prompt: Prompter) -> Item:
    example = records.normalize_record(raw, "llm_adapters", source=source, index=index)
    return Item(str(index), prompt(example.instruction, example.input), str(raw["answer"]))


def _gsm8k_item(raw: dict, index: int, source: str, prompt: Prompter) -> Item:
    example = records.normalize_record(raw, "gsm8k", source=source, index=index)  # training's normalisation
    return Item(str(index), prompt(example.instruction, example.input) + MATH_CUE, answers.gsm8k_gold(raw["answer"]))


def _math_item(raw: dict, index: int, source: str, prompt: Prompter) -> Item:
    if "problem" not in raw or "solution" not in raw:
        raise EvalError(f"{source}, record {index}: a MATH record needs 'problem' and 'solution'; keys seen: {sorted(raw)}")
    gold = answers.last_boxed(raw["solution"])
    if gold is None:
        raise EvalError(f"{source}, record {index}: the solution has no \\boxed{{...}} answer")
    return Item(str(index), prompt(raw["problem"], "") + MATH_CUE, gold)


_ITEMS: dict[str, Callable[[dict, int, str, Prompter], Item]] = {"choice": _choice_item, "gsm8k": _gsm8k_item, "math": _math_item}


def load_items(task: Task, data_dir: str | None, limit: int | None, prompt: Prompter = records.format_prompt) -> list[Item]:
    """The first `limit` examples of a generation task, as prompts (the paper's Alpaca prompt unless `prompt`) and gold answers."""
    files = data_files(task, data_dir)
    rows = [row for file in files for row in _read(file)]
    rows = rows[:limit] if limit is not None else rows
    source = ", ".join(map(str, files))
    try:
        return [_ITEMS[task.kind](raw, index, source, prompt) for index, raw in enumerate(rows)]
    except KeyError as error:
        raise EvalError(f"{source}: records lack the key {error} that task {task.name} needs") from None


def check_data(names: list[str], data_dir: str | None, flag: str) -> None:
    """Refuse data that lacks a task's file now, before a model is loaded or anything trained."""
    if data_dir is not None and locate.is_local(data_dir) and not Path(data_dir).expanduser().is_dir():
        raise EvalError(f"{flag} {data_dir} is not a folder; it must be laid out like ../shared/data")
    for name in dict.fromkeys(names):
        data_files(TASKS[name], data_dir, flag)


def load_text(task: Task, data_dir: str | None) -> str:
    """The whole text of a perplexity task: a .txt file, or the `text` rows of hub parquet files, which are
    the file's lines with each blank line as "" (the wikitext loading script the hub's parquet was made by
    yields `row if row.strip() else ""`; every blank line of WikiText-2's files is " \n")."""
    files = data_files(task, data_dir)
    return "".join(atomic.read_text(file, EvalError) if file.suffix == ".txt" else "".join(row["text"] or " \n" for row in _read(file))
                   for file in files)


def data_files(task: Task, data_dir: str | None, flag: str = "--data-dir") -> list[Path]:
    """The task's files on this machine: under `flag` (a folder or a hub dataset id), else its hub dataset's."""
    if data_dir is None and task.hub is None:
        raise EvalError(f"task {task.name}: no public hub dataset holds its data; pass {flag} (a folder or a hub "
                        f"dataset id laid out like ../shared/data, with {task.local})")
    if data_dir is not None and locate.is_local(data_dir):
        path = Path(data_dir).expanduser() / task.local
        if not path.is_file():
            raise EvalError(f"task {task.name}: {path} not found; {flag} must be laid out like ../shared/data ({task.local})")
        return [path]
    if data_dir is None:
        try:
            return hub.split_files(task.hub.repo, task.hub.config, task.hub.split, revision=None)
        except DataError as error:
            raise EvalError(f"task {task.name}: {error}") from None
    folder = locate.hub_snapshot(data_dir, "dataset", patterns=[task.local])
    if not (folder / task.local).is_file():
        raise EvalError(f"task {task.name}: hub dataset '{data_dir}' has no file {task.local}")
    return [folder / task.local]


def _read(path: Path) -> list[dict]:
    """The records of one benchmark file: a non-empty list of JSON objects (an empty task would score 0%)."""
    try:
        found = records.read_file(path)
    except DataError as error:
        raise EvalError(str(error)) from None
    if not all(isinstance(record, dict) for record in found):
        raise EvalError(f"{path}: a benchmark file holds a list of records (JSON objects)")
    if not found:
        raise EvalError(f"{path}: no records; a task with no examples would score 0% and pull the average down")
    return found
