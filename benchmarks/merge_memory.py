"""Peak memory and time of `milora merge` vs PEFT's merge_and_unload on a ~3 GB Llama-shaped model.

    python benchmarks/merge_memory.py [--size-gb 3] [--shard-mb 500] [--dtype bf16|fp32] [--rank 16]

1. Build a random Llama-shaped model of about --size-gb on disk, in --shard-mb safetensors shards.
2. Write a milora adapter for q,k,v,up,down of every layer as an init-only run (train.max_steps=0)
   saves it: trained factors equal to the initial ones (random here instead of an SVD, which changes
   nothing in what a merge reads and writes).
3. In separate processes, timed, with the peak RSS of each (os.wait4's rusage of that child):
   `milora merge` (merged format, --max-shard-size = the base's shard size), and PEFT's path: load the
   base, PeftModel.from_pretrained on the `milora merge --format peft` export, merge_and_unload,
   save_pretrained.
Everything lives in a temporary folder that is deleted at the end (unless --keep). The model is built in
a child process too: on Linux a child's ru_maxrss starts from its parent's RSS at fork, so the parent
that measures stays a bare interpreter (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from children import measure  # benchmarks/children.py: this script's folder is on sys.path

ITEMSIZE = {"fp32": 4, "bf16": 2}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 4
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out, dtype, shard = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(base, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
"""


def layer_shapes(layers: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Llama checkpoint (untied embeddings, GQA)."""
    kv = HIDDEN // HEADS * KV_HEADS
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (HIDDEN,)
        for name, shape in (("q_proj", (HIDDEN, HIDDEN)), ("k_proj", (kv, HIDDEN)), ("v_proj", (kv, HIDDEN)), ("o_proj", (HIDDEN, HIDDEN))):
            yield f"{p}.self_attn.{name}.weight", shape
        yield f"{p}.post_attention_layernorm.weight", (HIDDEN,)
        for name, shape in (("gate_proj", (INTERMEDIATE, HIDDEN)), ("up_proj", (INTERMEDIATE, HIDDEN)), ("down_proj", (HIDDEN, INTERMEDIATE))):
            yield f"{p}.mlp.{name}.weight", shape
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def build_base(folder: Path, size_gb: float, shard_mb: int, dtype: str) -> int:
    """A random Llama-shaped model of about size_gb in shard_mb shards; returns the number of layers."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from milora_cli import dtypes, shards

    itemsize = ITEMSIZE[dtype]
    per_layer = sum(torch.Size(s).numel() for n, s in layer_shapes(1) if ".layers." in n) * itemsize
    layers = max(1, round((size_gb * 1e9 - 2 * VOCAB * HIDDEN * itemsize) / per_layer))
    entries = [(name, {"fp32": "F32", "bf16": "BF16"}[dtype], shape) for name, shape in layer_shapes(layers)]
    plan = shards.plan_shards(entries, shard_mb * 10**6)
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(plan, 1):
        file = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(dtypes.TORCH[dtype]) for name, _, shape in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
    total = sum(shards.nbytes(entry) for entry in entries)
    (folder / shards.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=False, dtype=dtypes.TORCH[dtype],
    ).save_pretrained(folder)
    return layers


def build_adapter(folder: Path, base: Path, layers: int, rank: int, dtype: str) -> int:
    """An init-only milora adapter (trained == initial factors); returns its size in bytes."""
    import torch

    from milora_cli import adapter_folder, dtypes, models, shards
    from milora_cli.shards import LazyWeights

    index = shards.read_index(base)
    names = [f"model.layers.{i}.{target}" for i in range(layers) for target in TARGETS]
    generator = torch.Generator().manual_seed(1)
    factors = {}
    for name in names:
        out_features, in_features = index[f"{name}.weight"].shape
        factors[adapter_folder.key(name, "A")] = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        factors[adapter_folder.key(name, "B")] = torch.randn(out_features, rank, generator=generator) * 0.01
    meta = {
        "init": "milora", "r": rank, "lora_alpha": float(rank), "scaling": 1.0, "lora_dropout": 0.0, "target_modules": names,
        "base_model": str(base), "base_model_path": str(base), "revision": None, "base_dtype": dtype,
        "base_fingerprint": models.weights_fingerprint(LazyWeights(index, names, dtypes.TORCH[dtype])), "versions": {}, "step": 0,
    }
    folder.mkdir(parents=True)
    adapter_folder.write_adapter(folder, factors, factors, meta, "")
    return 2 * sum(t.numel() * t.element_size() for t in factors.values())


def build(root: Path, size_gb: float, shard_mb: int, dtype: str, rank: int) -> None:
    """The child that makes the base and the adapter; prints what it built."""
    start = time.perf_counter()
    layers = build_base(root / "base", size_gb, shard_mb, dtype)
    adapter_bytes = build_adapter(root / "adapter", root / "base", layers, rank, dtype)
    print(json.dumps({"layers": layers, "adapter_bytes": adapter_bytes, "seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--dtype", choices=list(ITEMSIZE), default="bf16")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None, help="Where the temporary folder goes (default: the system's).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    parser.add_argument("--build-into", type=Path, default=None, help=argparse.SUPPRESS)  # the child's entry point
    args = parser.parse_args()
    if args.build_into:
        return build(args.build_into, args.size_gb, args.shard_mb, args.dtype, args.rank)
    root = Path(tempfile.mkdtemp(prefix="milora-merge-bench-", dir=args.workdir))
    try:
        options = ["--size-gb", str(args.size_gb), "--shard-mb", str(args.shard_mb), "--dtype", args.dtype, "--rank", str(args.rank)]
        built = json.loads(subprocess.run([sys.executable, __file__, "--build-into", str(root), *options], check=True,
                                          capture_output=True, text=True).stdout.splitlines()[-1])
        layers, adapter_bytes = built["layers"], built["adapter_bytes"]
        files = sorted((root / "base").glob("*.safetensors"))
        base_bytes, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
        print(f"base: {layers} layers, {base_bytes / 1e9:.2f} GB {args.dtype} in {len(files)} shards (largest "
              f"{largest / 1e6:.0f} MB); adapter r={args.rank} on {len(TARGETS)} targets x {layers} layers, "
              f"{adapter_bytes / 1e6:.0f} MB (trained + initial); built in {built['seconds']:.0f} s", flush=True)
        milora = [sys.executable, "-m", "milora_cli", "merge", "--adapter", str(root / "adapter")]
        rows = {"milora merge": measure([*milora, "--output", str(root / "merged"), "--max-shard-size", f"{args.shard_mb}MB"], CHILD_ENV)}
        export = measure([*milora, "--output", str(root / "peft"), "--format", "peft"], CHILD_ENV)
        shutil.rmtree(root / "merged")  # keep the disk use at two copies of the model
        rows["PEFT merge_and_unload"] = measure(
            [sys.executable, "-c", PEFT_MERGE, str(root / "base"), str(root / "peft"), str(root / "peft-merged"), args.dtype, f"{args.shard_mb}MB"],
            CHILD_ENV,
        )
        budget = (largest + adapter_bytes) / 1e9
        print(f"\n(`milora merge --format peft` export first: {export[0]:.1f} s, peak RSS {export[1]:.2f} GB)")
        print(f"{'':24} {'time (s)':>9} {'peak RSS (GB)':>14} {'/ (largest shard + adapter)':>28}")
        for name, (seconds, rss) in rows.items():
            print(f"{name:24} {seconds:9.1f} {rss:14.2f} {rss / budget:27.2f}x")
        print(f"\nlargest shard + adapter = {budget:.2f} GB; target: milora <= 1.5x = {1.5 * budget:.2f} GB and below PEFT")
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
