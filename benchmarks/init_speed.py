"""Time of the adapter initialisation: milora (gram and svd drivers) vs PEFT's PiSSA full-SVD init.

    python benchmarks/init_speed.py [--model random-1024|random-4096|smollm2-135m] [--rank 32] [--device cpu|cuda] [--layers N]

Each init runs once on a fresh copy of the same model, targets q,k,v,up,down of every layer:
  milora gram   adapter.inject + adapter.initialise(init=milora, svd_driver=gram), float64
  milora svd    the same with svd_driver=svd (torch.linalg.svd in float64)
  PEFT pissa    get_peft_model(LoraConfig(init_lora_weights="pissa")): torch.linalg.svd in float32 and
                the residual written into the base weight
Models: `random-1024` is a random Llama (hidden 1024, intermediate 2816, 4 layers, GQA 16/4 heads),
`random-4096` has Llama-2-7B's layer shapes (hidden 4096, intermediate 11008, 2 layers), `smollm2-135m`
is the embedded real model (30 layers, 150 target layers). On CUDA every timing ends with a synchronize
and one small eigh and SVD run first, so the solvers' set-up is not charged to the first method.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch

from milora_cli import adapter, models
from milora_cli.recipe import DEFAULT_TARGETS

RANDOM = {"random-1024": (1024, 2816, 4, 16, 4), "random-4096": (4096, 11008, 2, 32, 32)}


def build(name: str, layers: int | None):
    if name in RANDOM:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, intermediate, default_layers, heads, kv = RANDOM[name]
        layers = layers or default_layers
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv)
        return LlamaForCausalLM(config).eval()
    return models.load_model(models.resolve(name), "fp32")


def timed(fn, base, device: str) -> float:
    """Seconds of fn on a fresh copy of `base` (the copy is not timed)."""
    model = copy.deepcopy(base)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(model)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def milora_init(model, rank: int, driver: str) -> None:
    names = adapter.find_targets(model, DEFAULT_TARGETS)
    adapters = adapter.inject(model, names, rank, float(rank), 0.0)
    adapter.initialise(adapters, "milora", "float64", driver, seed=0)


def peft_pissa(model, rank: int) -> None:
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=DEFAULT_TARGETS, init_lora_weights="pissa"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-1024", choices=[*RANDOM, "smollm2-135m"])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=None, help="Decoder layers of a random model (default: its own).")
    args = parser.parse_args()
    base = build(args.model, args.layers).to(args.device)
    targets = adapter.find_targets(base, DEFAULT_TARGETS)
    shapes = sorted({tuple(base.get_submodule(n).weight.shape) for n in targets})
    print(f"model {args.model}: {len(targets)} target layers, shapes {shapes}; r={args.rank}; device {args.device}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {device_name}, torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    if args.device == "cuda":  # solver handles and kernels load on first use
        warm = torch.randn(64, 64, device="cuda", dtype=torch.float64)
        torch.linalg.eigh(warm @ warm.T), torch.linalg.svd(warm)
        torch.linalg.svd(warm.float())
    runs = {
        "milora gram (float64 eigh)": lambda m: milora_init(m, args.rank, "gram"),
        "milora svd (float64 svd)": lambda m: milora_init(m, args.rank, "svd"),
        "PEFT pissa (float32 svd)": lambda m: peft_pissa(m, args.rank),
    }
    seconds = {}
    for label, fn in runs.items():
        seconds[label] = timed(fn, base, args.device)
        print(f"{label}: {seconds[label]:.2f} s", flush=True)
    reference = seconds["PEFT pissa (float32 svd)"]
    print(f"\n{'init':<28}{'time (s)':>10}{'PEFT pissa / this':>20}")
    for label, value in seconds.items():
        print(f"{label:<28}{value:>10.2f}{reference / value:>19.2f}x")


if __name__ == "__main__":
    main()
