"""Training data as Examples: reading files, hub datasets and builtins, record layouts, the prompt.

Every instruction record, whatever its source layout, becomes an `Example`; every Example is rendered
through the one Alpaca / LLM-Adapters prompt (`format_prompt`), at training time and at evaluation time
alike, so the model is scored on exactly the prompts it was tuned on. Conversations and plain text
(data.format messages, text) become chat.Conversation and chat.Text (data/chat.py).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milora_cli import locate
from milora_cli.data import builtin, chat, hub
from milora_cli.data.files import read_file
from milora_cli.errors import DataError
from milora_cli.evaluation.answers import ANSWER_MARKER

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

_GSM8K_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's "<<48/2=24>>" calculator annotations


@dataclass(frozen=True)
class Example:
    """One instruction / response pair. `answer` is the gold short answer where the source has one."""

    instruction: str
    input: str
    output: str
    answer: str | None


Record = Example | chat.Conversation | chat.Text  # what a record of any layout becomes


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the field's name in every dataset
    """The Alpaca / LLM-Adapters prompt, ending right where the response begins.

    The reference scripts write this template as an indented triple-quoted string, so their prompts carry
    stray indentation; we use the clean template that MILORA.md specifies.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def prompt_for_generation(ex: Example) -> str:
    """The prompt evaluation feeds to `generate`: the very text whose tokens were masked in training."""
    return format_prompt(ex.instruction, ex.input)


def _where(source: str, index: int | None) -> str:
    return source if index is None else f"{source}, record {index}"


def _missing(raw: dict, required: Sequence[str], fmt: str, source: str, index: int | None) -> None:
    missing = [k for k in required if k not in raw]
    if missing:
        raise DataError(
            f"{_where(source, index)}: missing key {', '.join(repr(k) for k in missing)} for format '{fmt}'; "
            f"keys seen: {sorted(raw)}; keys expected: {list(required)}"
        )


def _text(raw: dict, key: str, source: str, index: int | None) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise DataError(f"{_where(source, index)}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def _from_instruction(raw: dict, source: str, index: int | None) -> Example:
    """LLM-Adapters / Alpaca: instruction, optional input, output, optional answer."""
    _missing(raw, ("instruction", "output"), "llm_adapters", source, index)
    answer = raw.get("answer")  # optional in the layout itself, not a default of ours
    return Example(
        instruction=_text(raw, "instruction", source, index),
        input=_text(raw, "input", source, index) if raw.get("input") else "",  # often absent or null
        output=_text(raw, "output", source, index),
        answer=None if answer is None else str(answer),
    )


def _from_gsm8k(raw: dict, source: str, index: int | None) -> Example:
    """GSM8K: the solution ends "#### N"; rewrite it the MetaMath way so the model learns to end with
    "The answer is: N", which is what GSM8K evaluation extracts. Calculator annotations are removed
    because no calculator runs at evaluation time."""
    _missing(raw, ("question", "answer"), "gsm8k", source, index)
    solution, sep, final = _text(raw, "answer", source, index).rpartition("####")
    if not sep:
        raise DataError(f"{_where(source, index)}: gsm8k 'answer' has no final '#### N' line")
    number = final.strip().replace(",", "")
    reasoning = _GSM8K_CALCULATOR.sub("", solution).rstrip()
    return Example(
        instruction=_text(raw, "question", source, index),
        input="",
        output=f"{reasoning}\n{ANSWER_MARKER}{number}" if reasoning else f"{ANSWER_MARKER}{number}",
        answer=number,
    )


def _from_metamath(raw: dict, source: str, index: int | None) -> Example:
    """MetaMathQA: query, response; the response already ends "The answer is: X"."""
    _missing(raw, ("query", "response"), "metamath", source, index)
    response = _text(raw, "response", source, index)
    _, sep, answer = response.rpartition(ANSWER_MARKER)
    return Example(
        instruction=_text(raw, "query", source, index),
        input="",
        output=response,
        answer=answer.strip() if sep else None,
    )


_NORMALIZERS: dict[str, Callable[[dict, str, int | None], Record]] = {
    "llm_adapters": _from_instruction,
    "alpaca": _from_instruction,
    "gsm8k": _from_gsm8k,
    "metamath": _from_metamath,
    "messages": lambda raw, source, index: chat.from_messages(raw, _where(source, index)),
    "text": lambda raw, source, index: chat.from_text(raw, _where(source, index)),
}

# Checked in order: the key sets that identify each layout.
_SIGNATURES: list[tuple[frozenset[str], str]] = [
    (frozenset({"instruction", "output"}), "llm_adapters"),
    (frozenset({"question", "answer"}), "gsm8k"),
    (frozenset({"query", "response"}), "metamath"),
    (frozenset({"messages"}), "messages"),
    (frozenset({"conversations"}), "messages"),  # ShareGPT
    (frozenset({"text"}), "text"),
]


def detect_format(raw: dict, source: str = "<record>") -> str:
    """The layout a record's keys identify; a DataError when none matches."""
    for keys, fmt in _SIGNATURES:
        if keys <= raw.keys():
            return fmt
    raise DataError(
        f"{source}: cannot tell the record layout from keys {sorted(raw)}; expected instruction+output "
        "(llm_adapters, alpaca), question+answer (gsm8k), query+response (metamath), messages or conversations (messages), "
        "or text (text); set data.format"
    )


def normalize_record(raw: dict, fmt: str, *, source: str = "<record>", index: int | None = None) -> Record:
    """One raw record in layout `fmt` ("auto" detects it from this record's keys) -> Example.

    `source` and `index` only make error messages point at the offending file and record.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{_where(source, index)}: expected a JSON object, got {type(raw).__name__}")
    if fmt == "auto":
        fmt = detect_format(raw, source)
    return _NORMALIZERS[fmt](raw, source, index)


@dataclass(frozen=True)
class Source:
    """Where records come from: a local file, or a split of a config of a hub dataset at a revision."""

    path: str
    split: str | None = None
    config: str | None = None
    revision: str | None = None

    def read(self) -> list[Any]:
        """Raw records: the local file, or the split's data files, fetched alone (data/hub.py), in path order."""
        if not locate.is_local(self.path):
            if self.split is None:
                raise DataError(f"data.validation_path '{self.path}' is a hub dataset: name its split with data.validation_split")
            return [record for file in hub.split_files(self.path, self.config, self.split, self.revision) for record in read_file(file)]
        if not Path(self.path).expanduser().is_file():
            raise DataError(f"data file not found: {self.path}")
        return read_file(Path(self.path).expanduser())


def _read_examples(source: Source, fmt: str) -> list[Record]:
    raw = source.read()
    if not raw:
        raise DataError(f"{source.path}: no records")
    if fmt == "auto" and isinstance(raw[0], dict):  # one layout per file, decided by its first record
        fmt = detect_format(raw[0], source.path)
    return [normalize_record(r, fmt, source=source.path, index=i) for i, r in enumerate(raw)]


def _sources(cfg: Any) -> tuple[Source, Source | None]:
    """(training source, validation source or None) of a data section; hub-only keys on a local path are refused."""
    named = [f"data.{key}" for key in ("config", "revision", "validation_split") if getattr(cfg, key) is not None
             and (key != "validation_split" or cfg.validation_path is None)]
    if locate.is_local(cfg.path) and named:
        raise DataError(f"{' and '.join(named)} name a part of a hub dataset, but data.path '{cfg.path}' is a local "
                        "file; remove them or set data.path to a hub dataset id")
    train = Source(cfg.path, cfg.split, cfg.config, cfg.revision)
    if cfg.validation_path is not None or cfg.validation_split is None:
        return train, None if cfg.validation_path is None else Source(cfg.validation_path, cfg.validation_split)
    if cfg.validation_split == cfg.split:
        raise DataError(f"data.validation_split '{cfg.split}' is the training split: validation would score examples "
                        "trained on; name another split (e.g. validation or test)")
    return train, Source(cfg.path, cfg.validation_split, cfg.config, cfg.revision)


def load_records(cfg: Any, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation) Examples for a recipe's `data` section.

    1. Read cfg.path (a local file, or cfg.split of cfg.config of a hub dataset) or generate cfg.builtin.
    2. Validation: cfg.validation_path if set (a hub one: its cfg.validation_split), else the hub dataset's
       cfg.validation_split, else the builtin's held-out part, else cfg.val_size examples held out by a
       seeded shuffle (as LLM-Adapters' train_test_split does).
    3. Cap training at cfg.max_examples. The training part is kept in shuffled order so that the cap
       samples the whole file: Commonsense170K, for one, is its source sets concatenated in order.
    """
    # 1.
    if cfg.builtin is not None:
        train, val = _load_builtin(cfg.builtin, seed)
        validation = None if cfg.validation_path is None else Source(cfg.validation_path, cfg.validation_split)
    else:
        source, validation = _sources(cfg)
        records = _read_examples(source, cfg.format)
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_val = 0 if validation is not None else cfg.val_size
        if n_val >= len(records):
            raise DataError(
                f"{cfg.path} has {len(records)} records and data.val_size={cfg.val_size} would leave none "
                "for training; lower data.val_size or set data.validation_path or data.validation_split"
            )
        val = [records[i] for i in order[:n_val]]
        train = [records[i] for i in order[n_val:]]
    # 2.
    if validation is not None:
        val = _read_examples(validation, cfg.format)
    # 3.
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    if not train:
        raise DataError(f"no training examples in {cfg.path or 'builtin ' + repr(cfg.builtin)}")
    return train, val


def _load_builtin(name: str, seed: int) -> tuple[list[Record], list[Record]]:
    train, heldout = builtin.generate(name, seed)

    def normalize(records: list[dict], part: str) -> list[Record]:
        source = f"builtin '{name}' {part}"
        return [normalize_record(r, builtin.layout(name), source=source, index=i) for i, r in enumerate(records)]

    return normalize(train, "train"), normalize(heldout, "heldout")
