"""Training throughput and peak memory: `milora train` vs a PEFT LoRA model in a plain PyTorch loop.

    python benchmarks/train_throughput.py [--model smollm2-135m] [--steps 12] [--micro-batch 8] [--rank 32] [--compile]

Same model (fp32), same data (the real BoolQ training set of ../shared/data in LLM-Adapters format,
tokenised by milora's data module, max 256 tokens), same batches (milora's seeded BatchStream and
Collator: both loops see the same padded tensors at every step), adapters r on q,k,v,up,down with
dropout 0.05, AdamW, gradient clipping at 1.0, no mixed precision:
  milora   `milora train` (init milora, the factor cache on) in a child process; per-step tokens/s from
           its metrics.jsonl; with --compile also a second run with train.compile=true (each decoder
           layer torch.compile'd; the compilation falls in the warm-up steps)
  PEFT     get_peft_model(LoraConfig(r, target_modules)) and a plain loop: model(**batch).loss,
           backward, clip, step; the loss from the model's full logits as HF computes it
Tokens/s counts input tokens (the attention mask) of steps 3..N (the first two warm up). Peak memory
is the child's ru_maxrss (os.wait4), including model load and init. The parent imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from children import measure  # benchmarks/children.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "commonsense" / "boolq" / "train.json"
WARMUP = 2

PEFT_LOOP = """
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model
from milora_cli import models
from milora_cli.data import records, tokens
from milora_cli.training.step import BatchStream
from milora_cli.recipe import load_recipe

recipe_path, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
recipe = load_recipe(recipe_path)
cfg = recipe.train
torch.manual_seed(cfg.seed)
path = models.resolve(recipe.model.name_or_path)
tokenizer = models.load_tokenizer(path)
model = models.load_model(path, recipe.model.dtype)
lora = LoraConfig(r=recipe.adapter.r, lora_alpha=recipe.adapter.alpha, lora_dropout=recipe.adapter.dropout,
                  target_modules=recipe.adapter.target_modules, task_type="CAUSAL_LM")
model = get_peft_model(model, lora)
model.train()
train_examples, _ = records.load_records(recipe.data, cfg.seed)
train_set = tokens.build_dataset(train_examples, tokenizer, recipe.data.max_length, recipe.data.train_on_prompt)
stream = BatchStream(len(train_set.examples), seed=cfg.seed, micro=cfg.micro_batch_size, accumulation=1, rank=0, world=1)
collate = tokens.Collator(tokenizer.pad_token_id)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=cfg.lr)
timings = []
for step in range(steps):
    batch = collate([train_set.examples[i] for i in stream.step(step)[0]])
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timings.append({"step": step + 1, "seconds": time.perf_counter() - start, "tokens": int(batch["attention_mask"].sum())})
json.dump(timings, open(out, "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--max-examples", type=int, default=2000)
    parser.add_argument("--compile", action="store_true", help="also time milora train with train.compile=true")
    args = parser.parse_args()
    env = {**os.environ, "COLUMNS": "200"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recipe = {
            "model": {"name_or_path": args.model, "dtype": "fp32"},
            "adapter": {"init": "milora", "r": args.rank, "alpha": float(args.rank), "dropout": 0.05},
            "data": {"path": str(DATA), "max_length": 256, "max_examples": args.max_examples, "val_size": 0},
            "train": {"max_steps": args.steps, "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1,
                      "log_every": 1, "eval_every": None, "mixed_precision": "no", "warmup_steps": 0},
            "output": {"dir": str(tmp / "milora"), "tensorboard": False},
            "eval": {"heldout": 0},
        }
        recipe_path = tmp / "recipe.yaml"
        recipe_path.write_text(json.dumps(recipe))  # JSON is YAML
        # 1. PEFT first: it also records the tokens of every step, which milora's batches share
        peft_out = tmp / "peft.json"
        peft_wall, peft_rss = measure([sys.executable, "-c", PEFT_LOOP, str(recipe_path), str(args.steps), str(peft_out)], env, REPO, False)
        peft_steps = json.loads(peft_out.read_text())
        tokens = {r["step"]: r["tokens"] for r in peft_steps}
        timed = [s for s in tokens if s > WARMUP]
        total = sum(tokens[s] for s in timed)
        peft_tps = total / sum(r["seconds"] for r in peft_steps if r["step"] > WARMUP)
        rows = {"PEFT LoRA + plain loop": (peft_tps, peft_rss, peft_wall)}
        # 2. milora train, then (--compile) the same with compiled layers, each in its own run dir
        variants = {"milora train": []} | ({"milora train, compiled": ["train.compile=true"]} if args.compile else {})
        for name, overrides in variants.items():
            run_dir = tmp / name.replace(" ", "_").replace(",", "")
            command = [sys.executable, "-m", "milora_cli", "train", str(recipe_path), f"output.dir={run_dir}", *overrides]
            wall, rss = measure(command, env, REPO, False)
            lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
            seconds = sum(tokens[rec["step"]] / rec["tokens_per_s"] for rec in lines if rec["step"] > WARMUP)
            rows[name] = (total / seconds, rss, wall)
    print(f"model {args.model}, fp32 on CPU, torch threads from OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"r={args.rank} on q,k,v,up,down; micro-batch {args.micro_batch}; steps {WARMUP + 1}-{args.steps}: "
          f"{total} input tokens ({total / len(timed) / args.micro_batch:.0f} per example)")
    print(f"\n{'loop':<26}{'tokens/s':>10}{'peak RSS (GB)':>15}{'wall (s)':>10}")
    for name in [name for name in rows if name.startswith("milora")] + ["PEFT LoRA + plain loop"]:
        tps, rss, wall = rows[name]
        print(f"{name:<26}{tps:>10.0f}{rss:>15.2f}{wall:>10.1f}")
    print()
    for name in [name for name in rows if name.startswith("milora")]:
        print(f"{name} / PEFT: {rows[name][0] / peft_tps:.2f}x tokens/s, {rows[name][1] / peft_rss:.2f}x peak memory")


if __name__ == "__main__":
    main()
