"""The whole first GPU session in one command, every figure printed as it is measured (README "GPU").

    python benchmarks/gpu_session.py                  # on the device machine: CUDA, bf16
    python benchmarks/gpu_session.py --cpu            # its rehearsal here and in CI: the same code on the CPU

(a) smoke checks, each one line `smoke: NAME ok|FAILED ...` (under 2 minutes on a GPU):
    logits at init equal the base's bit for bit, without and with bf16 autocast; one bf16 training step
    (finite loss, gradients on the adapters only); the loss of a packed micro-batch equals the padded one (in
    float64, where the two sum the same terms in another order: <= 1e-10 relative); `milora train` + `merge` +
    `eval` of a small random-weight model end to end, as a user runs them.
(b) benchmarks/gpu_check.py on Llama-3-8B shapes with --layers (8 by default: a few minutes), then all 32
    layers if what is left of --budget-s allows, judged from the 8-layer run's time.
Everything printed also goes to OUT/gpu_session.txt (--out, default $OUT when set). Reads .gpu/ from
`make gpu-bundle` (its tokenizer and data); builds every model with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


class Log:
    """print() that flushes and also appends to a file, so a killed run keeps every line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as file:
            file.write(line + "\n")


def random_llama(tokenizer, device: str, dtype: torch.dtype, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def adapted(model, r: int = 8):
    from milora_cli import adapter

    layers = adapter.inject(model, adapter.find_targets(model, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]), r, float(r), 0.0)
    adapter.initialise(layers, "milora", "float64", "gram", seed=0)
    return layers


def smoke(args, log: Log, tokenizer, device: str) -> None:
    from accelerate import Accelerator

    from milora_cli import models
    from milora_cli.data import records, tokens
    from milora_cli.training.step import CausalLMLoss, loss_inputs, optimizer_step

    hidden = 64 if args.cpu else 1024
    examples = [records.normalize_record(raw, "llm_adapters")
                for raw in records.read_file(args.bundle / "data" / "commonsense" / "boolq" / "train.json")[:8]]
    micro = tokens.build_dataset(examples, tokenizer, 128, False).examples[:4]
    probe = tokens.Collator(tokenizer.pad_token_id)(micro).inputs["input_ids"].to(device)

    def check(name: str, ok: bool, detail: str = "") -> None:
        log(f"smoke: {name} {'ok' if ok else 'FAILED'} {detail}".rstrip())

    # 1. exact at init, with and without autocast
    base = random_llama(tokenizer, device, torch.bfloat16, hidden, 2)
    with torch.no_grad():
        plain, autocast = base(probe).logits, None
        with torch.autocast(device, dtype=torch.bfloat16):
            autocast = base(probe).logits
        adapted(base)
        check("logits at init == base (bf16)", torch.equal(base(probe).logits, plain))
        with torch.autocast(device, dtype=torch.bfloat16):
            check("logits at init == base (bf16 autocast)", torch.equal(base(probe).logits, autocast))
    # 2. one bf16 training step under accelerate's autocast
    accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
    loss = CausalLMLoss(base.train())
    params = [p for p in base.parameters() if p.requires_grad]
    collate = tokens.Collator(tokenizer.pad_token_id, packed=True)
    value, _ = optimizer_step(loss, [collate(micro).to(device)], accelerator, params, 1.0, sum(t.n_targets for t in micro))
    grads = {name for name, p in base.named_parameters() if p.grad is not None}
    check("one bf16 training step", bool(torch.isfinite(value).all()) and all(".lora_" in name for name in grads) and bool(grads),
          f"loss {float(value):.4f}, {len(grads)} gradients")
    # 3. packed == padded, in float64
    model = random_llama(tokenizer, device, torch.float64, hidden, 2)
    models.float64_norms(model)  # transformers' RMSNorm would round to float32 (models.load_model does this for fp64)
    adapted(model)
    loss = CausalLMLoss(model)
    with torch.no_grad():
        padded = loss(**loss_inputs(tokens.Collator(tokenizer.pad_token_id)(micro).to(device)))
        packed = loss(**loss_inputs(tokens.Collator(tokenizer.pad_token_id, packed=True, row_tokens=256)(micro).to(device)))
    error = abs(float(packed) - float(padded)) / abs(float(padded))
    check("packed == padded loss (float64)", error <= 1e-10, f"rel error {error:.1e}")
    del base, model
    # 4. the commands end to end on a small random-weight model
    end_to_end(args, log, tokenizer, device, check)


def end_to_end(args, log: Log, tokenizer, device: str, check) -> None:
    import yaml

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model = random_llama(tokenizer, "cpu", torch.float32 if args.cpu else torch.bfloat16, 64 if args.cpu else 512, 2)
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        recipe = {"model": {"name_or_path": str(folder / "model"), "dtype": "fp32" if args.cpu else "bf16"},
                  "adapter": {"init": "milora", "r": 8, "target_modules": "all-linear"},
                  "data": {"path": str(args.bundle / "data" / "commonsense" / "boolq" / "train.json"), "max_length": 128},
                  "train": {"max_steps": 4, "micro_batch_size": 4, "log_every": 1},
                  "eval": {"heldout": 0}, "output": {"dir": str(folder / "run")}}
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        commands = {
            "milora train": ["train", str(folder / "recipe.yaml")],
            "milora merge": ["merge", "--adapter", str(folder / "run"), "--output", str(folder / "merged")],
            "milora eval": ["eval", str(folder / "merged"), "--tasks", "boolq", "--data-dir", str(args.bundle / "data"), "--limit", "16",
                            "--output", str(folder / "eval")],
        }
        for name, command in commands.items():
            start = time.perf_counter()
            result = subprocess.run([sys.executable, "-m", "milora_cli", *command], capture_output=True, text=True, cwd=REPO)
            last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or [""]
            check(name, result.returncode == 0, f"{time.perf_counter() - start:.1f} s" + ("" if result.returncode == 0 else f": {last[0]}"))
        summary = folder / "eval" / "summary.json"
        if summary.is_file():
            log(f"smoke: eval summary {json.dumps(json.loads(summary.read_text()))[:300]}")


def benchmark(args, log: Log, budget_end: float) -> None:
    """gpu_check with --layers, then the full depth if the first run's pace says it fits in the budget."""
    def run(extra: list[str]) -> float:
        command = [sys.executable, "benchmarks/gpu_check.py", "--tokenizer", str(args.bundle / "tokenizer"),
                   "--data-dir", str(args.bundle / "data"), *extra]
        log(f"gpu_check: {' '.join(command[1:])}")
        start = time.perf_counter()
        with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            for line in process.stdout:
                log(line.rstrip())
        log(f"gpu_check: exit {process.returncode} after {time.perf_counter() - start:.0f} s")
        return time.perf_counter() - start

    if args.cpu:
        run(["--tiny"])
        return
    seconds = run(["--layers", str(args.layers)])
    full = seconds * 32 / args.layers
    if time.time() + full < budget_end:
        run([])
    else:
        log(f"gpu_check: 32 layers skipped: ~{full:.0f} s by the {args.layers}-layer pace, {budget_end - time.time():.0f} s left")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: the same checks on the CPU, tiny shapes")
    parser.add_argument("--bundle", type=Path, default=REPO / ".gpu", help="the folder `make gpu-bundle` wrote")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "out" / "gpu")))
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the first gpu_check run")
    parser.add_argument("--budget-s", type=float, default=540, help="seconds this command may take in all")
    args = parser.parse_args(argv)
    budget_end = time.time() + args.budget_s
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu for the rehearsal")
    from milora_cli import models

    log = Log(args.out / "gpu_session.txt")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    import transformers

    log(f"session: {name}, torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    tokenizer = models.load_tokenizer(str(args.bundle / "tokenizer"))
    start = time.perf_counter()
    smoke(args, log, tokenizer, device)
    log(f"smoke: done in {time.perf_counter() - start:.0f} s")
    benchmark(args, log, budget_end)


if __name__ == "__main__":
    main()
