"""The quickstart task: three small skills that SmolLM2-135M-Instruct lacks and a rank-8 MiLoRA adapter
learns in a few minutes on two CPU cores, generated here so the demo needs no download.

Why these three families: measured on 50 held-out questions each (Alpaca prompt, greedy, left padding,
16 new tokens), before and after 150 steps of batch 8 of MiLoRA (r=8, alpha=8, lr 1e-3, linear decay,
q/k/v/up/down_proj); 4-6.5 min of training on two CPU cores:

    family   instruction                                        output            base  after
    reverse  Reverse the order of the words: lamp tiger apple   apple tiger lamp   0 %  100 %
    larger   Which is larger, 384 or 371?                       384               46 %   92 %
    sort     Sort from smallest to largest: 42, 7, 19           7, 19, 42          0 %   76 %

Each is a skill, not a format: the base model talks about the question ("The words "mirror" and "apple" are
reversed.") instead of doing it, and scoring takes the first candidate answer anywhere in the text, so
merely learning to answer tersely earns nothing. The held-out questions are new word orders and new
number pairs/triples, never seen in training; what stays wrong is mostly numbers of different
lengths ("Which is larger, 51 or 275?" -> 51). Rejected while probing: parity of a number (stayed at
chance within the budget) and counting words (learnt, but slower). Outputs are bare answers because the
Alpaca preamble already costs ~35 tokens: a whole example is 45-58 tokens.

Records use the LLM-Adapters layout {"instruction", "input", "output", "answer"}; scoring follows the
paper's protocol: take the FIRST match of the family's answer pattern in the generation, no match is wrong.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from milora_cli.errors import DataError

# Single-token, everyday nouns: the skill is the reordering, not spelling rare words.
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "garden", "pencil", "window", "forest", "candle",
         "rocket", "violin", "mirror", "bottle", "ladder"]

# Between two numbers of a list: "7, 19", "7 19", "19, and 42", "19 and 42".
_SEP = r"(?:\s*,\s*|\s+)(?:and\s+)?"


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, 3)
    return f"Reverse the order of the words: {' '.join(words)}", " ".join(reversed(words))


def _larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _sort(rng: random.Random) -> tuple[str, str]:
    nums = rng.sample(range(1, 100), 3)
    return f"Sort from smallest to largest: {', '.join(map(str, nums))}", ", ".join(map(str, sorted(nums)))


def _extract_reverse(text: str, instruction: str) -> str | None:
    # The answer pattern is any run of three of the question's own words: echoing the question
    # ("lamp tiger apple") is a match, and a wrong one.
    word = "(?:" + "|".join(instruction.split(": ", 1)[1].split()) + ")"
    m = re.search(rf"\b{word}\b\W+\b{word}\b\W+\b{word}\b", text)
    return " ".join(re.findall(r"\w+", m.group(0))) if m else None


def _extract_larger(text: str, instruction: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def _extract_sort(text: str, instruction: str) -> str | None:
    m = re.search(rf"\d+{_SEP}\d+{_SEP}\d+", text)
    return ", ".join(re.findall(r"\d+", m.group(0))) if m else None


# name -> (instruction prefix, generator, extractor); the prefix tells a record's family.
FAMILIES: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]], Callable[[str, str], str | None]]] = {
    "reverse": ("Reverse the order of the words: ", _reverse, _extract_reverse),
    "larger": ("Which is larger, ", _larger, _extract_larger),
    "sort": ("Sort from smallest to largest: ", _sort, _extract_sort),
}


def _draw(rng: random.Random, n: int, banned: set[str], unique: bool) -> list[dict]:
    """n records cycling through the families (balanced), skipping banned instructions."""
    names = list(FAMILIES)
    records: list[dict] = []
    for _ in range(20 * n + 1000):  # bounded: a family has finitely many distinct questions
        if len(records) == n:
            return records
        instruction, answer = FAMILIES[names[len(records) % len(names)]][1](rng)
        if instruction in banned:
            continue
        if unique:
            banned.add(instruction)
        records.append({"instruction": instruction, "input": "", "output": answer, "answer": answer})
    raise DataError(f"cannot draw {n} distinct quickstart questions; ask for fewer (n_heldout={n})")


def generate(seed: int, n_train: int = 1200, n_heldout: int = 150) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, held-out) records from `seed`.

    The held-out set is drawn first and holds distinct questions; training then skips every held-out
    instruction, so a held-out score measures the skill on unseen questions, not recall.
    The defaults fit the quickstart recipe: 150 steps of batch 8, 50 held-out questions per family.
    """
    rng = random.Random(seed)
    heldout = _draw(rng, n_heldout, set(), unique=True)
    train = _draw(rng, n_train, {r["instruction"] for r in heldout}, unique=False)
    rng.shuffle(train)
    return train, heldout


# The chat quickstart's system prompt: the task is the same, the answer format is said once instead of by the Alpaca preamble.
CHAT_SYSTEM = "You are a precise assistant. Reply with the answer only."


def generate_chat(seed: int) -> tuple[list[dict], list[dict]]:
    """The records of `generate(seed)` as conversations: a system prompt, the question, the answer (OpenAI `messages`)."""

    def conversation(record: dict) -> dict:
        turns = [("system", CHAT_SYSTEM), ("user", record["instruction"]), ("assistant", record["output"])]
        return {"messages": [{"role": role, "content": content} for role, content in turns], "answer": record["answer"]}

    train, heldout = generate(seed)
    return [conversation(r) for r in train], [conversation(r) for r in heldout]


def family_of(example: dict) -> str:
    """The family whose instruction prefix the record carries."""
    for name, (prefix, _, _) in FAMILIES.items():
        if example["instruction"].startswith(prefix):
            return name
    raise DataError(f"not a quickstart question: {example['instruction']!r}; families: {', '.join(FAMILIES)}")


def extract_answer(generation: str, example: dict) -> str | None:
    """The first match of the family's answer pattern in `generation`, canonicalised; None if none.

    `generation` is the text after "### Response:". Case is ignored ("SUN TIGER LAMP" counts).
    """
    extract = FAMILIES[family_of(example)][2]
    return extract(generation.lower(), example["instruction"].lower())


def is_correct(generation: str, example: dict) -> bool:
    """Whether the first answer found in `generation` equals the record's gold `answer`."""
    return extract_answer(generation, example) == example["answer"]


def accuracy(generations: list[str], examples: list[dict]) -> dict[str, float]:
    """Fraction correct per family and over all records ("all")."""
    hits: dict[str, list[bool]] = {name: [] for name in FAMILIES}
    for generation, example in zip(generations, examples, strict=True):
        hits[family_of(example)].append(is_correct(generation, example))
    scores = {name: sum(h) / len(h) for name, h in hits.items() if h}
    scores["all"] = sum(sum(h) for h in hits.values()) / max(1, len(examples))
    return scores

