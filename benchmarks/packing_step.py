"""One training step of milora's loss on 16 mixed real examples, padded rows vs packed rows, side by side.

    OMP_NUM_THREADS=1 python benchmarks/packing_step.py padded
    OMP_NUM_THREADS=1 python benchmarks/packing_step.py packed

SmolLM2-135M (fp32, CPU), r=32 adapters on q,k,v,up,down (dropout off), 8 examples each of ARC-Challenge,
ARC-Easy, BoolQ and OpenBookQA train and 8 of GSM8K train from ../shared/data, shuffled, the first 16
tokenised at max 256 tokens; three forward + backward passes of CausalLMLoss, then the peak RSS. Run the
two modes one after the other (each in its own process, so each peak is its own).
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from pathlib import Path

from milora_cli import adapter, models
from milora_cli.data import tokens
from milora_cli.data.records import normalize_record
from milora_cli.training.step import CausalLMLoss, loss_inputs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def examples(tokenizer) -> list[tokens.TokenizedExample]:
    rng = random.Random(0)
    raw = [r for name in ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")
           for r in rng.sample(json.loads((DATA / "commonsense" / name / "train.json").read_text()), 8)]
    gsm8k = [json.loads(line) for line in (DATA / "math" / "gsm8k_train.jsonl").read_text().splitlines()[:8]]
    mixed = [normalize_record(r, "llm_adapters") for r in raw] + [normalize_record(r, "gsm8k") for r in gsm8k]
    rng.shuffle(mixed)
    return tokens.build_dataset(mixed[:16], tokenizer, 256, False).examples


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "packed"
    path = models.resolve("smollm2-135m")
    tokenizer = models.load_tokenizer(path)
    batch = tokens.Collator(tokenizer.pad_token_id, packed=mode == "packed", row_tokens=256)(examples(tokenizer))
    model = models.load_model(path, "fp32")
    adapter.initialise(adapter.inject(model, adapter.find_targets(model, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
                                      32, 32, 0.0), "lora", "float64", "gram", 0)
    model.train()
    loss = CausalLMLoss(model)
    shape = tuple(batch.inputs["input_ids"].shape)
    for step in range(3):
        start = time.perf_counter()
        loss(**loss_inputs(batch)).backward()
        model.zero_grad(set_to_none=True)
        print(f"{mode}: rows x tokens {shape}, step {step + 1}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"{mode}: {batch.n_tokens} real tokens, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
