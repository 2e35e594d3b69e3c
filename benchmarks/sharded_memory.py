"""Peak memory of each training process under train.distributed=fsdp and ddp, side by side, on a ~200M model.

    OMP_NUM_THREADS=1 python benchmarks/sharded_memory.py [--processes 2] [--steps 1]

The model: Llama-shaped (hidden 1024, 8 layers, MLP 2816, 16 heads, vocabulary 49152 with SmolLM2's real
tokenizer, untied head: 203.5M parameters), random seeded weights saved as bf16 safetensors in 4 shards,
trained in fp32 (the 2-process runs of this script read 407 MB of bf16 and hold 814 MB of fp32 weights).
Each run is a real `torchrun -m milora_cli train`-equivalent launch of this file's worker, which imports
everything training imports, resets its peak resident set (`echo 5 > /proc/self/clear_refs`: VmHWM := VmRSS),
trains through milora_cli.cli, and reports VmHWM minus the VmRSS it started from: the memory training added
to that process at its peak, page-cache pages of the memory-mapped checkpoint included while mapped.

The adapter state per process (`--adapter-state`, r=ADAPTER_RANK on all seven projections): a launch of
adapter_worker, which builds and initialises the model as `milora train` does, takes one optimizer step, and
sums the bytes this process holds of lora_A, lora_B, A0, B0, their gradients and AdamW's two moments (under
ddp also the whole tensors; DDP's own gradient buckets are not counted). tests/test_sharded_load.py runs the
same worker on a tiny model and checks each tensor's rows.

tests/test_sharded_load.py runs the same measures and checks their bounds; docs/BENCHMARKS.md holds a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, LAYERS, INTERMEDIATE, HEADS, VOCAB = 1024, 8, 2816, 16, 49152
PROJECTIONS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
               "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
TARGETS, RANK, MAX_LENGTH = ["q_proj", "v_proj"], 8, 80
ADAPTER_RANK = 64  # the adapter-state measure: all seven projections, where the state is large enough to see
RECORDS = [{"instruction": f"Count to {n} in {lang}.", "input": "", "output": " ".join(["one two three"] * n)}
           for n in range(1, 9) for lang in ("English", "numbers")]


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """The checkpoint's tensors in transformers' Llama names and order."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        for name, shape in PROJECTIONS.items():
            shapes[f"{prefix}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}.weight"] = shape
        shapes |= {f"{prefix}.input_layernorm.weight": (HIDDEN,), f"{prefix}.post_attention_layernorm.weight": (HIDDEN,)}
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def n_parameters() -> int:
    return sum(math.prod(shape) for shape in weight_shapes().values())


def save_model(folder: Path, tokenizer_dir: str) -> Path:
    """The model's folder: config.json, SmolLM2's tokenizer, bf16 weights in 4 shards written tensor by tensor
    (shards.write_sharded: the writer holds one tensor at a time, never the model)."""
    import torch
    from transformers import LlamaConfig

    from milora_cli import models, shards

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(tokenizer_dir)
    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2048, tie_word_embeddings=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="bfloat16").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for shape in weight_shapes().values():
            values = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
            yield values.to(torch.bfloat16)

    entries = [(name, "BF16", shape) for name, shape in weight_shapes().items()]
    assert shards.write_sharded(folder, entries, tensors(), max_shard_size=2 * n_parameters() // 4 + 1) >= 3
    return folder


def recipe(model_dir: Path, data: Path, out: Path, distributed: str, steps: int) -> dict:
    return {"model": {"name_or_path": str(model_dir), "dtype": "fp32"},
            "adapter": {"init": "milora", "r": RANK, "dropout": 0.0, "target_modules": TARGETS, "cache_factors": False},
            "data": {"path": str(data), "val_size": 0, "max_length": MAX_LENGTH},
            "train": {"max_steps": steps, "micro_batch_size": 1, "warmup_steps": 0, "log_every": 1, "eval_every": None,
                      "distributed": distributed},
            "output": {"dir": str(out)}}


def measure(model_dir: Path, folder: Path, distributed: str, processes: int, steps: int) -> dict:
    """One torchrun launch of the worker; {"peaks": bytes added at the peak per rank, "bytes_read": per rank}."""
    import yaml

    name = f"{distributed}-{steps}"
    data = folder / "records.json"
    data.write_text(json.dumps(RECORDS))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe(model_dir, data, folder / name, distributed, steps)))
    reports = folder / f"{name}-memory"
    reports.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--worker", str(path), str(reports)]
    # A fixed mmap threshold: glibc then returns every freed block of 1 MiB or more at once, so the peak is
    # of live tensors, not of heap the allocator kept (its default threshold grows to 32 MiB after frees).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000", "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"{distributed} run failed:\n{result.stderr[-3000:]}")
    peaks = [json.loads((reports / f"rank{rank}.json").read_text())["added"] for rank in range(processes)]
    summary = json.loads((folder / name / "summary.json").read_text())
    return {"peaks": peaks, "bytes_read": summary.get("checkpoint_bytes_read")}


def _status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def worker(recipe_path: str, reports: str) -> None:
    """One training process: imports first, then the peak reset, then `milora train`, then the report."""
    import torch.distributed.checkpoint  # noqa: F401 - everything a run imports, before the baseline
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from milora_cli import cli
    from milora_cli.training import train  # noqa: F401

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (proc(5): "reset the peak resident set size")
    baseline = _status_kib("VmRSS")
    sys.argv = ["milora", "train", recipe_path]
    try:
        cli.main()
    except SystemExit as done:
        code = done.code
    added = (_status_kib("VmHWM") - baseline) * 1024
    rank = os.environ.get("RANK", "0")
    (Path(reports) / f"rank{rank}.json").write_text(json.dumps({"added": added, "baseline": baseline * 1024}))
    raise SystemExit(code)


def adapter_state(model_dir: Path, folder: Path, distributed: str, processes: int) -> list[int]:
    """One torchrun launch of adapter_worker at r=ADAPTER_RANK on all seven projections: adapter bytes per rank."""
    import yaml

    raw = recipe(model_dir, folder / "records.json", folder / f"adapter-{distributed}", distributed, 1)
    raw["adapter"] |= {"r": ADAPTER_RANK, "target_modules": list(PROJECTIONS)}
    path = folder / f"adapter-{distributed}.yaml"
    path.write_text(yaml.safe_dump(raw))
    reports = folder / f"adapter-{distributed}-reports"
    reports.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               __file__, "--adapter-worker", str(path), str(reports)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"{distributed} adapter-state run failed:\n{result.stderr[-3000:]}")
    tensors = [json.loads((reports / f"rank{rank}.json").read_text())["tensors"] for rank in range(processes)]
    return [sum(entry["bytes"] for entry in mine.values()) for mine in tensors]


def adapter_worker(recipe_path: str, reports: str) -> None:
    """One process: build and initialise as `milora train` does, one optimizer step (step.optimizer_step, then
    AdamW), then, for every adapter tensor (lora_A, lora_B, A0, B0, the gradients and AdamW's two moments of those
    that train): whether it is a DTensor, its rows, this process's rows and bytes."""
    import torch
    import yaml
    from accelerate import Accelerator
    from rich.console import Console

    from milora_cli import dtensor
    from milora_cli.recipe import validate
    from milora_cli.training.build import build, initialise
    from milora_cli.training.step import BatchStream, CausalLMLoss, optimizer_step
    from milora_cli.training.train import collator

    cfg = validate(yaml.safe_load(Path(recipe_path).read_text()))
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    setup = build(cfg, accelerator.device, world)
    initialise(cfg, setup, accelerator, Console(quiet=True))
    params = [param for param in setup.model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    loss_module = CausalLMLoss(setup.model, sharded=True) if setup.sharded else accelerator.prepare(CausalLMLoss(setup.model))
    examples = setup.train_set.examples
    stream = BatchStream(len(examples), seed=0, micro=cfg.train.micro_batch_size, accumulation=1, rank=rank, world=world)
    collate = collator(cfg, setup.model, setup.tokenizer.pad_token_id)
    micro = [collate([examples[i] for i in part]) for part in stream.step(0)]
    n_targets = sum(examples[i].n_targets for i in stream.global_indices(0))
    _, grad_norm = optimizer_step(loss_module, micro, accelerator, params, 1.0, n_targets)
    grads = {id(param): param.grad for param in params}  # before the step: what the gradient reduction left
    optimizer.step()

    def entry(tensor) -> dict:
        local = tensor.to_local() if dtensor.is_sharded(tensor) else tensor
        return {"dtensor": dtensor.is_sharded(tensor), "rows": tensor.shape[0], "local_rows": local.shape[0],
                "bytes": local.numel() * local.element_size()}

    tensors = {}
    for name, layer in setup.adapters.items():
        for part, tensor in (("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight), ("A0", layer.lora_A0), ("B0", layer.lora_B0)):
            tensors[f"{name}.{part}"] = entry(tensor)
            if tensor.requires_grad:
                tensors[f"{name}.{part}.grad"] = entry(grads[id(tensor)])
                tensors |= {f"{name}.{part}.{moment}": entry(optimizer.state[tensor][moment]) for moment in ("exp_avg", "exp_avg_sq")}
    (Path(reports) / f"rank{rank}.json").write_text(json.dumps({"grad_norm": float(grad_norm), "tensors": tensors}))
    torch.distributed.barrier()  # every rank reaches teardown together
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--adapter-state", action="store_true", help="measure the adapter state per process only")
    parser.add_argument("--worker", nargs=2, metavar=("RECIPE", "REPORTS"), help=argparse.SUPPRESS)
    parser.add_argument("--adapter-worker", nargs=2, metavar=("RECIPE", "REPORTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.adapter_worker:
        return adapter_worker(*args.adapter_worker)
    from milora_cli import models

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model", models.resolve("smollm2-135m"))
        if args.adapter_state:
            (Path(tmp) / "records.json").write_text(json.dumps(RECORDS))
            state = {mode: adapter_state(model_dir, Path(tmp), mode, args.processes) for mode in ("fsdp", "ddp")}
            return print_adapter_state(state, args.processes)
        runs = {(mode, steps): measure(model_dir, Path(tmp), mode, args.processes, steps)
                for mode in ("fsdp", "ddp") for steps in (0, args.steps)}
    whole = 4 * n_parameters()
    print(f"{n_parameters():,} parameters: {whole / 1e6:.0f} MB in fp32 (checkpoint {whole / 2e6:.0f} MB bf16); "
          f"{args.processes} processes; largest FSDP unit (one MLP projection) {4 * HIDDEN * INTERMEDIATE / 1e6:.1f} MB, "
          f"embedding and head split by vocabulary rows")
    print(f"| mode | peak added per process, load + init (MB) | with {args.steps} training step(s) (MB) | checkpoint read per process (MB) |")
    print("|---|---|---|---|")
    for mode in ("fsdp", "ddp"):
        init, trained = runs[mode, 0], runs[mode, args.steps]
        read = ", ".join(f"{n / 1e6:.0f}" for n in init["bytes_read"]) if init["bytes_read"] else "all of it (from_pretrained)"
        print(f"| {mode} | {', '.join(f'{n / 1e6:.0f}' for n in init['peaks'])} | "
              f"{', '.join(f'{n / 1e6:.0f}' for n in trained['peaks'])} | {read} |")


def print_adapter_state(state: dict[str, list[int]], processes: int) -> None:
    elements = LAYERS * ADAPTER_RANK * sum(out + inp for out, inp in PROJECTIONS.values())  # of lora_A and lora_B
    print(f"adapter state at r={ADAPTER_RANK} on all seven projections: {elements:,} factor elements, fp32; A, B, A0, B0, "
          f"gradients and 2 moments: {20 * elements / 1e6:.0f} MB whole; {processes} processes")
    print("| mode | adapter state per process (MB) |")
    print("|---|---|")
    for mode, sizes in state.items():
        print(f"| {mode} | {', '.join(f'{n / 1e6:.1f}' for n in sizes)} |")


if __name__ == "__main__":
    main()
