"""Training throughput and peak memory on real mixed-length data: `milora train` vs PEFT LoRA in a plain loop.

    python benchmarks/train_throughput.py [--model smollm2-135m] [--steps 12] [--batch 16] [--rank 32] [--per-set 400]

The data mixes real training sets as Commonsense170K mixes its sources: --per-set examples each of the
ARC-Challenge, ARC-Easy, BoolQ and OpenBookQA training sets (LLM-Adapters format) and of GSM8K train
(rewritten the MetaMath way by milora's own reader), from ../shared/data, shuffled with a fixed seed:
one-line questions beside passages and multi-step solutions. Both loops take the same examples at
every step (milora's seeded BatchStream), tokenised by milora (max 256 tokens), batch --batch (the
paper's 16) in one micro-batch, adapters r on q,k,v,up,down, dropout 0.05, AdamW, clipping at 1.0, fp32:
  milora   `milora train` in a child process, as a user runs it (packing on: data.packing=auto)
  PEFT     get_peft_model(LoraConfig) and a plain loop over batches padded by transformers'
           DataCollatorForSeq2Seq (padding to the longest, as HF training scripts do): model(**batch).loss,
           backward, clip, step
Real tokens are the examples' own tokens (no padding). Tokens/s is over steps 3..N (two warm up).
Peak memory is each child's ru_maxrss (os.wait4), model load and init included; this parent imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

from children import measure  # benchmarks/children.py: this script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SETS = [DATA / "commonsense" / name / "train.json" for name in ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")]
GSM8K = DATA / "math" / "gsm8k_train.jsonl"
WARMUP = 2

PEFT_LOOP = """
import json, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq
from milora_cli import models
from milora_cli.data import records, tokens
from milora_cli.recipe import load_recipe
from milora_cli.training.step import BatchStream

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
collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=cfg.lr)
timings = []
for step in range(steps):
    examples = [train_set.examples[i] for i in stream.step(step)[0]]
    batch = collate([{"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels} for t in examples])
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timings.append({"step": step + 1, "seconds": time.perf_counter() - start, "real": int(batch["attention_mask"].sum()),
                    "padded": batch["input_ids"].numel()})
json.dump(timings, open(out, "w"))
"""


def mixed_data(per_set: int, seed: int) -> list[dict]:
    """--per-set records of each source, in the LLM-Adapters layout, shuffled."""
    sys.path.insert(0, str(REPO))
    from milora_cli.data.records import normalize_record  # pure Python: no torch in this parent

    rng = random.Random(seed)
    mixed = []
    for path in SETS:
        mixed += rng.sample(json.loads(path.read_text()), per_set)
    gsm8k = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    for raw in rng.sample(gsm8k, per_set):
        ex = normalize_record(raw, "gsm8k")
        mixed.append({"instruction": ex.instruction, "input": ex.input, "output": ex.output, "answer": ex.answer})
    rng.shuffle(mixed)
    return mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--per-set", type=int, default=400)
    args = parser.parse_args()
    env = {**os.environ, "COLUMNS": "200"}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "mixed.json").write_text(json.dumps(mixed_data(args.per_set, seed=0)))
        recipe = {
            "model": {"name_or_path": args.model, "dtype": "fp32"},
            "adapter": {"init": "milora", "r": args.rank, "alpha": float(args.rank), "dropout": 0.05},
            "data": {"path": str(tmp / "mixed.json"), "max_length": 256, "val_size": 0},
            "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "gradient_accumulation_steps": 1,
                      "log_every": 1, "eval_every": None, "mixed_precision": "no", "warmup_steps": 0},
            "output": {"dir": str(tmp / "milora")},
            "eval": {"heldout": 0},
        }
        recipe_path = tmp / "recipe.yaml"
        recipe_path.write_text(json.dumps(recipe))  # JSON is YAML
        # 1. PEFT: it also records the real tokens of every step, which milora's steps share
        peft_out = tmp / "peft.json"
        _, peft_rss = measure([sys.executable, "-c", PEFT_LOOP, str(recipe_path), str(args.steps), str(peft_out)], env, REPO, False)
        peft = [r for r in json.loads(peft_out.read_text()) if r["step"] > WARMUP]
        real = sum(r["real"] for r in peft)
        peft_tps = real / sum(r["seconds"] for r in peft)
        padding = 1 - real / sum(r["padded"] for r in peft)
        # 2. milora train: seconds of a step = its real tokens / its logged tokens_per_s
        run_dir = tmp / "milora_run"
        _, milora_rss = measure([sys.executable, "-m", "milora_cli", "train", str(recipe_path), f"output.dir={run_dir}"], env, REPO, False)
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        steps = {r["step"]: r["real"] for r in peft}
        milora_tps = real / sum(steps[rec["step"]] / rec["tokens_per_s"] for rec in logged if rec["step"] in steps)
    print(f"machine: {os.cpu_count()} CPUs; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"(the benchmark itself holds the torch threads; more than that means other work shared the cores)")
    print(f"model {args.model}, fp32 on CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; r={args.rank} on q,k,v,up,down; "
          f"batch {args.batch}; steps {WARMUP + 1}-{args.steps}: {real} real tokens ({real / len(peft) / args.batch:.0f} per example); "
          f"PEFT's padded batches were {100 * padding:.0f}% padding")
    print(f"\n{'loop':<26}{'real tokens/s':>14}{'peak RSS (GB)':>15}")
    print(f"{'milora train (packed)':<26}{milora_tps:>14.0f}{milora_rss:>15.2f}")
    print(f"{'PEFT LoRA + plain loop':<26}{peft_tps:>14.0f}{peft_rss:>15.2f}\n")
    print(f"milora / PEFT: {milora_tps / peft_tps:.2f}x real tokens/s, {milora_rss / peft_rss:.2f}x peak memory")


if __name__ == "__main__":
    main()
