"""`milora eval`: a model, a merged folder or a training run (base + adapter, unmerged) on the benchmarks.

An output folder holds

    settings.json       what the scores depend on (model, beams, token budgets, window, prompt style and chat
                        template); other settings are refused
    predictions.jsonl   one scored example a line: task, id, prompt, generation, prediction, gold, correct
                        (WikiText windows: nll, tokens). Appended batch by batch with flush + fsync: a killed
                        eval, run again, skips what was scored and drops a torn last line, so every example
                        is scored exactly once.
    summary.json        accuracy per task (WikiText: mean token loss and perplexity), the commonsense average

Forgetting is measured on WikiText-2 test as mean next-token loss over non-overlapping windows of
`ppl_window` tokens (1024 by default, the model's context if shorter); the first token of each window
is context only. `limit` takes the first N examples of each task (for WikiText the first N windows).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from milora_cli import adapter, adapter_folder, atomic, models, outputs, quantize, runlock, terminal
from milora_cli.evaluation import generate, tasks
from milora_cli.evaluation.report import summarise, table, table_rows  # noqa: F401 - table_rows: tests read it here
from milora_cli.errors import EvalError
from milora_cli.ranks import ONE, Ranks, shared_rounds
from milora_cli.recipe import EvalConfig, Quantize
from milora_cli.runlog import bar_columns

RESULTS_FILE, SUMMARY_FILE, SETTINGS_FILE = "predictions.jsonl", "summary.json", "settings.json"
# what a folder written before a setting was kept was scored with: the Alpaca prompt, so no chat template
_SCORED_BEFORE = {"prompt": "alpaca", "chat_template": None}


def run(model_or_run: str, cfg: EvalConfig, output: Path, dtype: str | None, console: Console, quantized: Quantize | None = None,
        *, base: str | None = None, force: bool = False, trust: models.Trust = models.UNTRUSTED) -> dict[str, Any]:
    """Load MODEL_OR_RUN and score it on cfg.tasks into `output`, locked throughout (runlock.py); returns the summary.
    `trust`: the command line's."""
    source = Path(model_or_run).expanduser()
    with runlock.hold(output):
        outputs.claim(output, "eval", "--output", force, inputs=[source] if source.exists() else [])
        tasks.check_data(cfg.tasks, cfg.data_dir, "--data-dir")  # data first: a missing file fails before a model loads
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with terminal.working(console, models.loading(model_or_run)):
            model, tokenizer, identity = load(model_or_run, dtype, device, console, quantized, base=base, trust=trust)
        return evaluate_model(model, tokenizer, cfg, output, identity, console)


def load(name: str, dtype: str | None, device: str, console: Console, quantized: Quantize | None = None,
         *, base: str | None = None, trust: models.Trust = models.UNTRUSTED) -> tuple[Any, Any, str]:
    """(model, tokenizer, identity): a run or adapter folder is its base with the adapter injected, unmerged.

    A run is scored as it trained: on its base quantized as in training, unless `quantized` says otherwise.
    """
    folder = adapter_folder.find_adapter(Path(name).expanduser())
    if folder is not None:
        return _load_run(folder, dtype, device, console, quantized, base, trust)
    if base is not None:
        raise EvalError(f"--base is for a run or adapter folder; {name} is a model")
    resolved = models.resolve(name, code=trust.remote_code)
    dtype, quantized = dtype or models.checkpoint_dtype(resolved), quantized or "none"  # scores comparable with the run that made it
    tokenizer = models.load_tokenizer(resolved, trust=trust)  # first: the cheaper load fails faster
    identity = f"{name if models.is_hub(name) else Path(resolved).resolve()} [{_storage(dtype, quantized)}]"
    return _load_base(resolved, dtype, device, quantized, trust), tokenizer, identity


def _load_run(folder: Path, dtype: str | None, device: str, console: Console, quantized: Quantize | None,
              base: str | None, trust: models.Trust) -> tuple[Any, Any, str]:
    meta = (found := adapter_folder.read_adapter(folder)).meta
    base, _, base_folder = adapter_folder.locate_base(base, meta, download=True, code=trust.remote_code)
    console.print(f"base model: {base}" + ("" if str(base_folder) == base else f" ({base_folder})"))
    compute, quantized = dtype or meta["base_dtype"], quantized or meta.get("base_quantize", "none")
    model = _load_base(str(base_folder), compute, device, quantized, trust)
    adapters = adapter.inject(model, meta["target_modules"], meta["r"], meta["lora_alpha"], 0.0)
    seen = models.weights_fingerprint(quantize.full_precision_weights(adapters, quantized, str(base_folder), compute))
    if dtype is None and seen != meta["base_fingerprint"]:
        console.print(f"[yellow]warning:[/] the weights of {base} differ from those the adapter was trained on")
    adapter.load_adapter_tensors(adapters, found.trained, found.initial)
    identity = f"{folder.resolve()} ({meta['init']} r={meta['r']}, step {meta.get('step')}) on {base} [{_storage(compute, quantized)}]"
    tokenizer = models.load_tokenizer(str(base_folder), trust=trust)
    if found.chat_template is not None:  # the template the adapter trained with, not the base's (--prompt chat)
        tokenizer.chat_template = found.chat_template
        console.print(f"chat template: the run's own, {folder / adapter_folder.CHAT_TEMPLATE_FILE} (not the base's)")
    return model.eval(), tokenizer, identity


def _load_base(path: str, dtype: str, device: str, quantized: Quantize, trust: models.Trust):
    quantize.check(quantized, dtype, torch.device(device).type)
    return quantize.load_model(path, dtype, quantized, trust=trust, device=device)


def _storage(dtype: str, quantized: Quantize) -> str:
    """How the base is held, for the identity of the scores: `fp32`, or `nf4, fp32 compute`."""
    return dtype if quantized == "none" else f"{quantized}, {dtype} compute"


def evaluate_model(
    model, tokenizer, cfg: EvalConfig, output: Path, identity: str, console: Console, bars: bool = True, ranks: Ranks = ONE
) -> dict[str, Any]:
    """Score an already built model on cfg.tasks, resuming whatever `output` already holds.

    `bars=False` inside another live display (training's progress bar), which rich cannot nest. Under
    several processes (`ranks`, training's hook) each scores its share of the batches and the main
    process writes everything and returns the summary; the others return {}.
    """
    if not cfg.tasks:
        raise EvalError("no tasks to run; name some, e.g. --tasks boolq,gsm8k,wikitext")
    settings = {"model": identity, "window": min(cfg.ppl_window, _context(model, cfg.ppl_window))} | cfg.model_dump(
        include={"num_beams", "choice_max_new_tokens", "math_max_new_tokens", "prompt"}) | {"chat_template": _template_digest(tokenizer, cfg)}
    results = Results(output, settings) if ranks.main else None
    selected = {}
    with _progress(console, bars) as bar:
        for name in dict.fromkeys(cfg.tasks):
            task = tasks.TASKS[name]
            score = _score_windows if task.kind == "perplexity" else _score_generations
            selected[name] = score(model, tokenizer, task, cfg, settings["window"], results, bar, ranks)
    if results is None:
        return {}
    summary = {"model": identity, "settings": settings, **summarise(results.records, selected)}
    atomic.write_text_atomic(output / SUMMARY_FILE, json.dumps(summary, indent=2))
    console.print(table({"score": summary}))
    console.print(f"per-example results in [bold]{output / RESULTS_FILE}[/], summary in {output / SUMMARY_FILE}")
    return summary


def _template_digest(tokenizer, cfg: EvalConfig) -> str | None:
    """The chat template the questions are asked through (--prompt chat), as `sha256:HEX`: a folder scored through
    another (a base's own, then a run's data.chat_template) holds other prompts, and is not resumed; None for alpaca."""
    if cfg.prompt != "chat":
        return None
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(tokenizer.chat_template, sort_keys=True)
    return "sha256:" + adapter_folder.sha256(template.encode("utf-8"))


def _context(model, default: int) -> int:
    return getattr(model.config, "max_position_embeddings", None) or default


def _score_generations(model, tokenizer, task: tasks.Task, cfg: EvalConfig, window: int, results: Results | None, bar,
                       ranks: Ranks) -> set[str]:
    items = tasks.load_items(task, cfg.data_dir, cfg.limit, tasks.prompter(cfg.prompt, tokenizer))
    done = ranks.gather(results.done(task.name) if results else None)[0]  # what the main process has
    # Longest prompts first: batches of like lengths pad little, and the peak memory shows in the first batch.
    todo = sorted((item for item in items if item.id not in done), key=lambda item: -len(item.prompt))
    progress = bar.add_task(task.name, total=len(items), completed=len(items) - len(todo))
    budget = tasks.max_new_tokens(task, cfg.choice_max_new_tokens, cfg.math_max_new_tokens)

    def score(batch: list[tasks.Item]) -> list[dict[str, Any]]:
        generations = generate.generate(model, tokenizer, [item.prompt for item in batch], budget, cfg.batch_size,
                                        cfg.num_beams, tasks.stop_strings(task), add_special_tokens=cfg.prompt == "alpaca")
        records = []
        for item, generation in zip(batch, generations, strict=False):
            prediction, correct = tasks.score(task, generation, item.gold)
            records.append({"task": task.name, "id": item.id, "prompt": item.prompt, "generation": generation,
                            "prediction": prediction, "gold": item.gold, "correct": correct})
        return records

    batches = [todo[start : start + cfg.batch_size] for start in range(0, len(todo), cfg.batch_size)]
    shared_rounds(batches, ranks, score, lambda records: _append(results, records, bar, progress))
    if results is not None:
        results.reorder()  # back in the items' order
    return {item.id for item in items}


def _append(results: Results, records: list[dict[str, Any]], bar, progress) -> None:
    results.append(records)
    bar.advance(progress, len(records))


def _score_windows(model, tokenizer, task: tasks.Task, cfg: EvalConfig, window: int, results: Results | None, bar,
                   ranks: Ranks) -> set[str]:
    ids = tokenizer(tasks.load_text(task, cfg.data_dir), add_special_tokens=False, verbose=False)["input_ids"]
    windows = [ids[start : start + window] for start in range(0, len(ids) - 1, window)][: cfg.limit]
    done = ranks.gather(results.done(task.name) if results else None)[0]  # what the main process has
    todo = [index for index in range(len(windows)) if str(index) not in done]
    progress = bar.add_task(task.name, total=len(windows), completed=len(windows) - len(todo))
    per_batch = max(1, generate.TOKENS_PER_BATCH // window)

    def score(batch: list[int]) -> list[dict[str, Any]]:
        losses = generate.window_losses(model, [windows[index] for index in batch])
        return [
            {"task": task.name, "id": str(index), "prompt": None, "generation": None, "prediction": nll / count,
             "gold": None, "correct": None, "nll": nll, "tokens": count}
            for index, (nll, count) in zip(batch, losses, strict=False)
        ]

    batches = [todo[start : start + per_batch] for start in range(0, len(todo), per_batch)]
    shared_rounds(batches, ranks, score, lambda records: _append(results, records, bar, progress))
    return {str(index) for index in range(len(windows))}


class Results:
    """predictions.jsonl of an output folder: read (a torn last line dropped), then appended durably."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        folder.mkdir(parents=True, exist_ok=True)
        saved = folder / SETTINGS_FILE
        if saved.is_file():
            old = _SCORED_BEFORE | atomic.read_json(saved, f"the eval in {folder}", EvalError)
            for key in sorted(set(old) | set(settings)):
                if old.get(key) != settings.get(key):
                    raise EvalError(
                        f"{folder} holds an eval with other settings ({key}: {old.get(key)!r}, now {settings.get(key)!r}); "
                        "choose another --output"
                    )
        else:
            atomic.write_text_atomic(saved, json.dumps(settings, indent=2))
        self.path = folder / RESULTS_FILE
        self.records = self._read()

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")
        records, whole = [], True
        for line in lines[:-1]:  # every complete line; lines[-1] is "" unless the last line was torn
            record = _record(line)
            if record is not None:
                records.append(record)
            else:  # a damaged line is scored again
                whole = False
        if lines[-1] or not whole:  # rewrite without the damage, so appends start on a clean line
            atomic.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))
        return records

    def done(self, task: str) -> set[str]:
        return {record["id"] for record in self.records if record["task"] == task}

    def append(self, records: list[dict[str, Any]]) -> None:
        with atomic.open_to_append(self.path) as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))
            handle.flush()
            os.fsync(handle.fileno())
        self.records += records

    def reorder(self) -> None:
        """Rewrite the file in task order and, within a task, in the records' original order (ids)."""
        first_seen = {task: i for i, task in reversed(list(enumerate(r["task"] for r in self.records)))}
        ordered = sorted(self.records, key=lambda r: (first_seen[r["task"]], int(r["id"])))
        if ordered != self.records:
            atomic.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in ordered))
            self.records = ordered


def _record(line: bytes) -> dict[str, Any] | None:
    """One line of predictions.jsonl, or None when it is damaged (not UTF-8, not JSON, or lacking what summarise reads)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("task") not in tasks.TASKS or not {"id", "correct"} <= set(record):
        return None
    windows = tasks.TASKS[record["task"]].kind == "perplexity"
    return record if not windows or all(isinstance(record.get(key), (int, float)) for key in ("nll", "tokens")) else None


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Progress]:
    with Progress(*bar_columns(), console=console, disable=not enabled) as bar:
        yield bar
