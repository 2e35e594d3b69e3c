"""One-command check of milora on one CUDA GPU, against PEFT, in one table (under 10 minutes on an H100).

    python benchmarks/gpu_check.py                 # Llama-3-8B shapes, random bf16 weights built on the GPU
    python benchmarks/gpu_check.py --tiny          # the same code on CPU with small shapes (what CI runs)
    python benchmarks/gpu_check.py --layers 8 --tokenizer .gpu/tokenizer --data-dir .gpu/data   # on the device machine

Each figure is printed as soon as it is measured (a `measured:` line), the table at the end: a run killed at
the device's 10-minute limit keeps what it had measured.

(a) init of q,k,v,up,down (r=32): milora (float64 Gram eigh) vs PEFT init_lora_weights="pissa" (float32
    SVD), seconds and ratio; the error of milora's r minor singular values against a float64 SVD of the
    first layer's five weights.
(b) 30 optimizer steps of global batch 16 (micro-batch 4 x 4 accumulation, the recipes'), real commonsense
    training examples of ../shared/data (BoolQ, ARC, OBQA in LLM-Adapters format, up to 256 tokens):
    milora's own step (training.step.optimizer_step under Accelerate's autocast, the recipe default for a
    bf16 base) vs the PiSSA-initialised PEFT model in a plain loop (autocast, HF's loss); tokens/s of
    steps 3.., peak GPU memory, ratios.
(c) logits of the adapted model at init vs the base model, without and under bf16 autocast: bit-identical or not.
(d) the trained adapter merged into the weights, W + s (B A - B0 A0) in float32 cast to the base dtype
    (merge.py's formula, done in memory: the 16 GB random base is not written to disk): seconds, and the
    merged model's logits against the adapted model's (max relative error).
Token ids come from SmolLM2's tokenizer (the embedded model), taken modulo the random model's vocabulary.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from milora_cli import adapter, models
from milora_cli.data import records, tokens
from milora_cli.recipe import DEFAULT_TARGETS
from milora_cli.training.step import CausalLMLoss, optimizer_step, packs
from milora_cli.training.train import autocast_dtype

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (64, 160, 2, 4, 2, 512),
}
TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
WARMUP = 2
PAD = 0  # the padding id of the PEFT batches (token ids are taken modulo the model's vocabulary)


def build(shape: str, device: str, layers: int | None) -> torch.nn.Module:
    """A random Llama of `shape`, built in bf16 directly on `device` (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, n_layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers or n_layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def batches(data_dir: Path, vocab: int, args) -> list[list[list[tokens.TokenizedExample]]]:
    """steps x accumulation micro-batches of real commonsense examples, token ids modulo `vocab`.

    Each loop collates them its own way: milora packs them as it trains, PEFT pads them as HF does.
    """
    examples = [records.normalize_record(raw, "llm_adapters") for name in TRAIN_SETS
                for raw in records.read_file(data_dir / "commonsense" / name / "train.json")]
    random.Random(0).shuffle(examples)
    tokenizer = models.load_tokenizer(str(args.tokenizer) if args.tokenizer else models.resolve("smollm2-135m"))
    per_step = args.micro_batch * args.accumulation
    data = tokens.build_dataset(examples[: 4 * args.steps * per_step], tokenizer, args.max_length, False)
    assert len(data.examples) >= args.steps * per_step, "too few examples keep a response token at this max length"

    def fit(t: tokens.TokenizedExample) -> tokens.TokenizedExample:
        return tokens.TokenizedExample([i % vocab for i in t.input_ids], [x if x < 0 else x % vocab for x in t.labels], t.truncated)

    starts = [[step * per_step + m * args.micro_batch for m in range(args.accumulation)] for step in range(args.steps)]
    return [[[fit(t) for t in data.examples[start : start + args.micro_batch]] for start in step] for step in starts]


def padded(micro: list[tokens.TokenizedExample]) -> dict[str, torch.Tensor]:
    """A micro-batch as HF training scripts feed it: right-padded rows, attention mask, labels."""
    batch = tokens.Collator(PAD)(micro)
    return {**batch.inputs, "labels": batch.labels}


def minor_error(layers: dict[str, adapter.MiloraLinear], r: int) -> float:
    """Max relative error of the r minor singular values (from s B0 A0) against a float64 SVD of W."""
    worst = 0.0
    for layer in layers.values():
        reference = torch.linalg.svdvals(layer.base_layer.weight.double())[-r:]  # the r smallest, descending
        product = layer.scaling * (layer.lora_B0.double() @ layer.lora_A0.double())  # (out, in), rank r
        got = torch.linalg.svdvals(product)[:r]
        worst = max(worst, ((got - reference).abs() / reference).max().item())
    return worst


def initialised(args, device: str, probe: torch.Tensor, init) -> tuple[torch.nn.Module, float, str]:
    """A fresh model, `init(model) -> adapted model` timed, and whether its logits at init are the base's bit for
    bit, both without autocast and under the bf16 autocast training runs in."""
    model = build(args.shape, device, args.layers)
    with torch.no_grad():
        base = model(probe).logits
        with torch.autocast(device, dtype=torch.bfloat16):
            base_autocast = model(probe).logits
    warm_up_solvers(device)
    holder = {}
    seconds = timed(lambda: holder.setdefault("model", init(model)), device)
    with torch.no_grad():
        exact = torch.equal(holder["model"].eval()(probe).logits, base)
        with torch.autocast(device, dtype=torch.bfloat16):
            exact = exact and torch.equal(holder["model"](probe).logits, base_autocast)
    return holder["model"], seconds, "yes" if exact else "no"


def warm_up_solvers(device: str) -> None:
    """Load the linear-algebra libraries (cuSOLVER on a GPU) before a timed init: whichever side runs first
    would otherwise pay their load."""
    for dtype in (torch.float32, torch.float64):
        eye = torch.eye(8, device=device, dtype=dtype)
        torch.linalg.eigh(eye)
        torch.linalg.svd(eye)
    sync(device)


def milora_run(args, device: str, data) -> dict[str, float | str]:
    """(a) milora init, (c) logits at init, (b) milora's training step, (d) the merge; one model."""
    probe, layers = padded(data[0][0])["input_ids"].to(device), {}

    def init(model):
        names = adapter.find_targets(model, DEFAULT_TARGETS)
        layers.update(adapter.inject(model, names, args.rank, float(args.rank), 0.05))
        adapter.initialise(layers, "milora", "float64", "gram", seed=0)
        return model

    model, seconds, exact = initialised(args, device, probe, init)
    first = {name: layer for name, layer in layers.items() if ".layers.0." in name}
    row = measured("milora", {"init_s": seconds, "minor_err": minor_error(first, args.rank), "exact": exact})
    accelerator = Accelerator(mixed_precision=autocast_dtype("auto", "bf16", device == "cuda"), cpu=device == "cpu")
    loss = CausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)

    collate = tokens.Collator(PAD, packed=packs("auto", model))

    def step(micro):
        n_targets = sum(t.n_targets for part in micro for t in part)
        optimizer_step(loss, [collate(part).to(device) for part in micro], accelerator, params, 1.0, n_targets)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row |= measured("milora", train(model, step, data, device))
    return row | measured("milora", merge_check(model, layers, probe, device))


def peft_run(args, device: str, data) -> dict[str, float | str]:
    """(a) PEFT's PiSSA init, (c) its logits at init (its residual is stored rounded to bf16), (b) the same
    batches in a plain loop with autocast and HF's loss."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.05, target_modules=DEFAULT_TARGETS,
                        init_lora_weights="pissa", task_type="CAUSAL_LM")
    model, seconds, exact = initialised(args, device, padded(data[0][0])["input_ids"].to(device), lambda m: get_peft_model(m, config))
    measured("PEFT", {"init_s": seconds, "exact": exact})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    use_autocast = autocast_dtype("auto", "bf16", device == "cuda") == "bf16"

    def step(micro):
        micro = [padded(part) for part in micro]
        n = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro)
        for b in micro:
            b = {k: v.to(device) for k, v in b.items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=use_autocast):
                out = model(**b)
            (out.loss * int(b["labels"][:, 1:].ne(-100).sum()) / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"init_s": seconds, "exact": exact} | measured("PEFT", train(model, step, data, device))


def measured(side: str, row: dict) -> dict:
    """Print a part of a side's row as soon as it is known (flushed), and return it."""
    print(f"measured: {side} " + " ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    return row


def train(model, step, data, device: str) -> dict[str, float]:
    """tokens/s over steps WARMUP+1.. and the peak GPU memory of the whole loop."""
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, counted = 0.0, 0
    for k, micro in enumerate(data):
        spent = timed(lambda micro=micro: step(micro), device)
        if k >= WARMUP:
            seconds += spent
            counted += sum(len(t.input_ids) for part in micro for t in part)  # real tokens, no padding
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"tok_s": counted / seconds, "peak_gb": peak}


def merge_check(model, layers: dict[str, adapter.MiloraLinear], probe: torch.Tensor, device: str) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        adapted = model(probe).logits.float()

        def merge():
            for name, layer in layers.items():
                weight = layer.base_layer.weight
                weight.copy_((weight.float() + layer.delta_weight()).to(weight.dtype))
                model.set_submodule(name, layer.base_layer)

        seconds = timed(merge, device)
        merged = model(probe).logits.float()
    return {"merge_s": seconds, "merge_err": ((merged - adapted).abs().max() / adapted.abs().max()).item()}


ROWS = [  # label, key, format, ratio milora/PEFT
    ("(a) init seconds", "init_s", ".2f", True), ("(a) minor sigma max rel error vs float64", "minor_err", ".1e", False),
    ("(b) train tokens/s", "tok_s", ".0f", True), ("(b) peak GPU memory (GiB)", "peak_gb", ".2f", True),
    ("(c) logits at init == base, bit for bit", "exact", "", False), ("(d) merge seconds", "merge_s", ".2f", False),
    ("(d) merged vs adapted logits, max rel error", "merge_err", ".1e", False),
]


def table(ours: dict, peft: dict) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row and row[key] == row[key] else "-"  # NaN: no GPU memory on CPU

    lines = [f"{'check':<46}{'milora':>12}{'PEFT':>12}{'milora/PEFT':>13}"]
    for label, key, fmt, ratio in ROWS:
        quotient = f"{ours[key] / peft[key]:.2f}x" if ratio and peft.get(key) == peft.get(key) else "-"
        lines.append(f"{label:<46}{cell(ours, key, fmt):>12}{cell(peft, key, fmt):>12}{quotient:>13}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU, a few short steps (CI)")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--rank", type=int, default=None, help="r (default 32; 4 with --tiny)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer folder (default: the embedded SmolLM2's)")
    args = parser.parse_args(argv)
    args.shape, device = ("tiny", "cpu") if args.tiny else ("llama3-8b", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU version")
    args.rank = args.rank or (4 if args.tiny else 32)
    args.steps, args.micro_batch, args.accumulation, args.max_length = (4, 2, 2, 128) if args.tiny else (30, 4, 4, 256)
    data = batches(args.data_dir, SHAPES[args.shape][5], args)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    header = (f"{args.shape} ({args.layers or SHAPES[args.shape][2]} layers), bf16 weights, r={args.rank} on "
              f"{','.join(DEFAULT_TARGETS)}; {args.steps} steps of {args.micro_batch}x{args.accumulation}, "
              f"<= {args.max_length} tokens; {name}, torch {torch.__version__}")
    print(header, flush=True)
    ours = milora_run(args, device, data)
    gc.collect()  # the milora model goes before PEFT's is built: each peak holds one model
    if device == "cuda":
        torch.cuda.empty_cache()
    report = table(ours, peft_run(args, device, data))
    print(report, flush=True)
    return report


if __name__ == "__main__":
    main()
