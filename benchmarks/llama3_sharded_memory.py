"""Memory per process of Llama-3-8B and -70B under train.distributed=fsdp on 8 x 80 GB, COMPUTED from the shapes.

    python benchmarks/llama3_sharded_memory.py

GB (1e9 bytes) per process, bf16 base, adapters on all seven projections of every layer:
  load         the process's shard of the base (1/8 of it) plus the largest tensor's slice twice (its mapped
               pages and get_slice's copy): torch.distributed.checkpoint's HuggingFaceStorageReader
  init         load + this process's eighth of the adapter factors (A, B and the frozen A0, B0, fp32, sharded
               as FSDP2 units of their own) + the decomposition of the largest target, one at a time: its bf16
               read, a float64 copy (8 bytes a weight), the Gram matrix of the short side, its eigenvectors and
               eigh's workspace (3 float64 k x k matrices)
  steady       the shard + this process's eighth of the adapter state (A, B, A0, B0, gradients, AdamW's 2
               moments: 20 bytes a factor element, all sharded) + FSDP2's working set for the largest unit (one
               linear layer, an MLP projection; 2.5 units in bf16: its flat all-gather buffer, the copied-out
               weights, its shard's copy; the embedding and the head are vocabulary-parallel, never gathered),
               without activations (see the batch table of benchmarks/llama3_memory.py)
  whole state  the adapter state if it were whole on every process (the layout before it was sharded)
  ddp          the whole base on every process, for comparison
Not counted: the CUDA context and the allocator's slack (0.5-1 GB), activations.
"""

from __future__ import annotations

from dataclasses import dataclass

PROCESSES, GPU_GB = 8, 80


@dataclass(frozen=True)
class Llama:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def projections(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each adapted linear layer of one decoder layer."""
        h, kv, i = self.hidden, self.hidden // self.heads * self.kv_heads, self.intermediate
        return {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def layer_parameters(self) -> int:
        return sum(o * i for o, i in self.projections().values()) + 2 * self.hidden

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + 2 * self.vocab * self.hidden + self.hidden  # untied


# config.json of meta-llama/Meta-Llama-3-8B and -70B
MODELS = [Llama("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256), Llama("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256)]


def per_process(model: Llama, r: int) -> dict[str, float]:
    """GB per process at load, after init, in the steady state, and under ddp."""
    shard = 2 * model.parameters() / PROCESSES
    largest_slice = 2 * model.vocab * model.hidden / PROCESSES  # the embeddings and the head are the largest tensors
    load = shard + 2 * largest_slice
    factor_elements = model.layers * r * sum(o + i for o, i in model.projections().values())
    out, inp = max(model.projections().values(), key=lambda shape: shape[0] * shape[1])
    k = min(out, inp)
    decomposition = 2 * out * inp + 8 * out * inp + 3 * 8 * k * k
    init = shard + 16 * factor_elements / PROCESSES + max(2 * largest_slice, decomposition)
    largest_unit = max(o * i for o, i in model.projections().values())  # distributed.shard: a unit per linear layer
    steady = shard + 20 * factor_elements / PROCESSES + 2.5 * 2 * largest_unit
    return {name: value / 1e9 for name, value in
            {"load": load, "init": init, "steady": steady, "whole_state": 20 * factor_elements, "ddp": 2 * model.parameters()}.items()}


def main() -> None:
    print(f"computed from the shapes: fsdp on {PROCESSES} x {GPU_GB} GB, bf16 base, all seven projections adapted; GB per process")
    print("| model | parameters | r | load | init | steady (no activations) | adapter state if whole | ddp: the whole base |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for r in (32, 128):
            gb = per_process(model, r)
            print(f"| {model.name} | {model.parameters() / 1e9:.2f} B | {r} | {gb['load']:.1f} | {gb['init']:.1f} | "
                  f"{gb['steady']:.1f} | {gb['whole_state']:.1f} | {gb['ddp']:.1f} |")


if __name__ == "__main__":
    main()
