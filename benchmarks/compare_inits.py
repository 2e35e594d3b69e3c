"""LoRA vs PiSSA vs MiLoRA vs MiCA side by side on smollm2-135m, same data, same budget, one table.

1. Training data: a seeded sample of --per-set examples from each of the four commonsense train sets in
   ../shared/data (BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA; the Commonsense170K format), shuffled.
2. The base model is scored first: the eight commonsense test sets (first --limit examples of each,
   greedy, the paper's first-match protocol) and WikiText-2 test loss (first --windows windows of 1024).
3. Each init trains with identical settings (the paper's rank-relative alpha: 2r for LoRA, r for
   PiSSA/MiLoRA; 2r for MiCA, milora's default; same lr, steps, batch, seed) and its run dir is scored the
   same way, unmerged. MiCA trains A only (B is the frozen minor left singular vectors), as PEFT's.
4. One table: accuracy per set, the average, WikiText loss and perplexity before (base) and after.

The default budget (--steps 60 of batch 8, 120 examples per set, 480 in all: one pass) is sized so the whole script takes
about 30-40 minutes on 2 CPU cores; a budget this small shows how the inits start, not where they end.

    OMP_NUM_THREADS=2 python benchmarks/compare_inits.py --data-dir ../shared/data --out out/compare
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from rich.console import Console

from milora_cli.evaluation import suite, tasks
from milora_cli.atomic import write_text_atomic
from milora_cli.recipe import eval_settings, validate
from milora_cli.training.train import train

TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
INITS = ("lora", "pissa", "milora", "mica")


def training_file(data_dir: Path, per_set: int, seed: int, path: Path) -> int:
    """Write a shuffled mix of `per_set` seeded samples of each train set; return the count."""
    rng, records = random.Random(seed), []
    for name in TRAIN_SETS:
        pool = json.loads((data_dir / "commonsense" / name / "train.json").read_text())
        records += rng.sample(pool, min(per_set, len(pool)))
    rng.shuffle(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records))
    return len(records)


def recipe(init: str, data_path: Path, run_dir: Path, args: argparse.Namespace):
    return validate({
        "model": {"name_or_path": "smollm2-135m", "dtype": "fp32"},
        "adapter": {"init": init, "r": args.r, "dropout": 0.05},  # alpha: r for milora/pissa (the paper's), 2r for lora/mica
        "data": {"path": str(data_path), "val_size": 0, "max_length": 256},
        "train": {"max_steps": args.steps, "lr": args.lr, "micro_batch_size": 8, "warmup_steps": 10,
                  "scheduler": "linear", "eval_every": None, "log_every": 10, "seed": args.seed},
        "output": {"dir": str(run_dir)},
    })


def score(model_or_run: str, out: Path, args: argparse.Namespace, console: Console) -> dict:
    """Commonsense accuracy (--limit per set) and WikiText loss (--windows), merged into one summary."""
    model, tokenizer, identity = suite.load(model_or_run, None, "cpu", console)
    common = eval_settings({"tasks": tasks.COMMONSENSE, "data_dir": str(args.data_dir), "limit": args.limit, "batch_size": 16})
    text = eval_settings({"tasks": ["wikitext"], "data_dir": str(args.data_dir), "limit": args.windows})
    summary = suite.evaluate_model(model, tokenizer, common, out / "commonsense", identity, console)
    forgetting = suite.evaluate_model(model, tokenizer, text, out / "wikitext", identity, console)
    summary["tasks"] |= forgetting["tasks"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("out/compare"))
    parser.add_argument("--per-set", type=int, default=120, help="training examples drawn from each of the four train sets")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of batch 8 per init")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=50, help="test examples per commonsense set")
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 1024 tokens")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--inits", default=",".join(INITS), help="comma-separated inits to train, of " + ", ".join(INITS))
    args = parser.parse_args()
    console = Console()
    start = time.perf_counter()
    data_path = args.out / "train.json"
    n = training_file(args.data_dir, args.per_set, args.seed, data_path)
    console.print(f"training data: {n} examples ({args.per_set} from each of {', '.join(TRAIN_SETS)}) in {data_path}")
    summaries = {"base": score("smollm2-135m", args.out / "eval-base", args, console)}
    timings = {"base": time.perf_counter() - start}
    for init in args.inits.split(","):
        began = time.perf_counter()
        run_dir = args.out / init
        train(recipe(init, data_path, run_dir, args), console)
        summaries[init] = score(str(run_dir), args.out / f"eval-{init}", args, console)
        timings[init] = time.perf_counter() - began
    header, rows = suite.table_rows(summaries)
    console.print(suite.table(summaries))
    markdown = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    print("\n".join(markdown))
    total = time.perf_counter() - start
    print(f"\nwall time {total / 60:.1f} min (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()) + ")")
    write_text_atomic(args.out / "comparison.json", json.dumps({"summaries": summaries, "seconds": timings, "args": {
        key: str(value) for key, value in vars(args).items()}, "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
