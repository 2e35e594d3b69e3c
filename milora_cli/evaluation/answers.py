"""Answer extraction and comparison for the paper's benchmarks (MILORA.md, "Evaluation protocols").

Pure string functions, faithful to the reference scripts so that scores are comparable with the paper's:

- commonsense (LLM-Adapters commonsense_evaluate.py): the text after "### Response:" up to any echoed
  next "### Response:", and the FIRST match of the dataset's pattern. The match is case-sensitive, as
  in the reference: "True" is not the answer `true`.
- GSM8K and MATH (MetaMath eval_gsm8k.py / eval_math.py): generation stops at "Instruction" or
  "Response" (MetaMath's stop strings); the prediction follows the LAST "The answer is: " of what is
  left. GSM8K takes the first number there, commas removed, rounded to an integer as MetaMath does,
  and compares numerically; MATH takes the rest of that line and compares after the Hendrycks /
  MetaMath LaTeX normalisation (`normalize_math`).
"""

from __future__ import annotations

import re
from fractions import Fraction

CHOICE_PATTERNS: dict[str, str] = {  # in the paper's column order
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}
ANSWER_MARKER = "The answer is: "
RESPONSE_MARKER = "### Response:"
MATH_STOPS = ("Instruction", "Response")  # MetaMath's vLLM stops: 'Instruction:', 'Instruction', 'Response:', 'Response'

_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:/[-+]?\d*\.?\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")


def extract_choice(generation: str, task: str) -> str | None:
    """The first match of `task`'s answer pattern in the response, or None."""
    response = generation.split(RESPONSE_MARKER)[0].strip()
    match = re.search(CHOICE_PATTERNS[task], response)
    return match.group(0) if match else None


def _after_last_marker(generation: str) -> str | None:
    """What follows the last "The answer is: " before the first stop string, or None."""
    cut = min([i for i in (generation.find(stop) for stop in MATH_STOPS) if i >= 0], default=len(generation))
    _, sep, tail = generation[:cut].rpartition(ANSWER_MARKER)
    return tail if sep else None


def extract_number(generation: str) -> str | None:
    """GSM8K: the first number after the answer marker, commas removed, rounded to an integer."""
    tail = _after_last_marker(generation)
    match = _NUMBER.search(_THOUSANDS.sub("", tail)) if tail is not None else None
    if match is None:
        return None
    text = match.group(0)
    numerator, _, denominator = text.partition("/")
    try:
        # MetaMath's rule for a/0: the numerator; a/b otherwise.
        value = float(numerator) if not denominator or float(denominator) == 0 else float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return None
    return str(round(value))


def gsm8k_gold(answer: str) -> str:
    """The gold number of a GSM8K solution: after "#### ", commas removed."""
    return answer.rpartition("####")[2].strip().replace(",", "")


def numbers_equal(prediction: str | None, gold: str) -> bool:
    return prediction is not None and float(prediction) == float(gold)


def extract_math(generation: str) -> str | None:
    """MATH: the rest of the answer line (up to ".\\n"), without a final full stop."""
    tail = _after_last_marker(generation)
    if tail is None:
        return None
    answer = tail.split(".\n")[0].strip()
    return answer[:-1].strip() if answer.endswith(".") else answer


def last_boxed(solution: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) of a solution, braces balanced; or None."""
    start = max(solution.rfind("\\boxed"), solution.rfind("\\fbox"))
    if start < 0:
        return None
    rest = solution[start:].removeprefix("\\boxed").removeprefix("\\fbox")
    if rest.startswith(" "):  # "\boxed 5$": the answer runs to the closing dollar
        return rest[1:].split("$")[0].strip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced braces


def math_equal(prediction: str | None, gold: str) -> bool:
    return prediction is not None and normalize_math(prediction) == normalize_math(gold)


def normalize_math(text: str) -> str:
    """Hendrycks' strip_string (as MetaMath uses it), plus \\text{}-style wrappers and outer $ removed.

    1. Spacing and sizing commands, degrees, dollar signs, units written as "\\text{ unit}", percent signs.
    2. Leading zeros restored (".5" -> "0.5"), a short "x = " prefix dropped.
    3. \\sqrt2 -> \\sqrt{2}, spaces removed, \\frac12 -> \\frac{1}{2}, 0.5 -> \\frac{1}{2}, 3/4 -> \\frac{3}{4}.
    """
    # 1.
    text = text.strip().strip("$").rstrip(".").replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    for old, new in (("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
                     ("^\\circ", ""), ("\\$", "")):
        text = text.replace(old, new)
    text = text.split("\\text{ ")[0]  # "10 \text{ cm}" -> "10 "
    text = _TEXT_WRAPPER.sub(r"\1", text).replace("\\%", "")
    # 2.
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if text.startswith("."):
        text = "0" + text
    left, sep, right = text.partition("=")
    if sep and "=" not in right and len(left) <= 2:
        text = right
    # 3.
    text = re.sub(r"\\sqrt\s*([^{\s\\])", r"\\sqrt{\1}", text).replace(" ", "")
    text = re.sub(r"\\frac([^{\\])", r"\\frac{\1}", text)
    text = re.sub(r"(\\frac\{[^{}]*\})([^{\\])", r"\1{\2}", text)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return re.sub(r"^(-?\d+)/(\d+)$", r"\\frac{\1}{\2}", text)
