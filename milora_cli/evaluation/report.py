"""The scores of an eval: per task accuracy (or WikiText's loss and perplexity), the commonsense average, the table."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

from milora_cli.evaluation import tasks


def summarise(records: list[dict[str, Any]], selected: dict[str, set[str]]) -> dict[str, Any]:
    """Per task: accuracy, or loss and perplexity; and the average over the commonsense sets present."""
    scores: dict[str, dict[str, Any]] = {}
    for name, ids in selected.items():
        rows = {r["id"]: r for r in records if r["task"] == name and r["id"] in ids}.values()
        if tasks.TASKS[name].kind == "perplexity":
            nll, count = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
            loss = nll / max(1, count)
            scores[name] = {"windows": len(rows), "tokens": count, "loss": loss, "ppl": math.exp(loss)}
        else:
            correct = sum(bool(r["correct"]) for r in rows)
            scores[name] = {"examples": len(rows), "correct": correct, "accuracy": correct / max(1, len(rows))}
    sets = [scores[name]["accuracy"] for name in tasks.COMMONSENSE if name in scores]
    average = {"accuracy": sum(sets) / len(sets), "sets": len(sets)} if sets else None
    return {"tasks": scores, "commonsense_average": average}


def table_rows(summaries: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of summaries side by side: one row per task (accuracy %), the average, loss and ppl."""
    names = list(dict.fromkeys(name for summary in summaries.values() for name in summary["tasks"]))
    names.sort(key=lambda name: (tasks.TASKS[name].kind == "perplexity", name not in tasks.COMMONSENSE))

    def cell(summary: dict[str, Any], name: str, key: str, fmt: str) -> str:
        score = summary["tasks"].get(name) if name != "average" else summary["commonsense_average"]
        return format(score[key], fmt) if score else "-"

    rows, average_at = [], None
    for name in names:
        if tasks.TASKS[name].kind == "perplexity":
            rows.append([f"{name} loss"] + [cell(s, name, "loss", ".4f") for s in summaries.values()])
            rows.append([f"{name} ppl"] + [cell(s, name, "ppl", ".2f") for s in summaries.values()])
            continue
        first = next(s["tasks"][name] for s in summaries.values() if name in s["tasks"])
        rows.append([f"{name} (n={first['examples']})"] + [cell(s, name, "accuracy", ".1%") for s in summaries.values()])
        average_at = len(rows) if name in tasks.COMMONSENSE else average_at
    if average_at is not None:  # right under the last commonsense set
        sets = next(s["commonsense_average"]["sets"] for s in summaries.values() if s["commonsense_average"])
        rows.insert(average_at, [f"commonsense average ({sets} of 8)"] + [cell(s, "average", "accuracy", ".1%") for s in summaries.values()])
    return ["task", *summaries], rows


def table(summaries: dict[str, dict[str, Any]]) -> Table:
    header, rows = table_rows(summaries)
    result = Table(*header)
    for row in rows:
        result.add_row(*row, style="bold" if row[0].startswith("commonsense average") else None)
    return result
