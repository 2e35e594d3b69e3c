"""GPU memory of training recipes/commonsense_llama3{,_nf4}.yaml, COMPUTED from Llama-3-8B's shapes (nothing runs).

    python benchmarks/llama3_memory.py

Per part, in GB (1e9 bytes):
  weights      bf16: 2 bytes a parameter. nf4: the 7 projections of every layer in 4 bits plus one fp32 scale
               per block of 64 (bitsandbytes' layout: 0.5 + 4/64 bytes a weight); embeddings, lm_head, norms bf16
  adapter      r=32 on q,k,v,up,down: A, B and the frozen A0, B0, all fp32
  optimizer    fp32 gradients of A, B and AdamW's two fp32 moments
  activations  an ESTIMATE: the tensors autograd keeps per token and layer on milora's path (listed below),
               times micro_batch_size x max_length tokens, plus the loss's logits (every position: an upper
               bound, milora projects only the response tokens); with gradient checkpointing, the layer
               inputs plus one layer's tensors recomputed in backward
Not counted: the CUDA context and allocator slack (typically 0.5-1 GB), temporary buffers of the kernels.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 32, 8, 128256  # Meta-Llama-3-8B config.json
KV = HIDDEN // HEADS * KV_HEADS
PROJECTIONS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
               "gate_proj": (INTERMEDIATE, HIDDEN), "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
NF4_BYTES = 0.5 + 4 / 64


def saved_bytes_per_token_layer(targets: list[str]) -> int:
    """Bytes autograd keeps per token in one decoder layer under bf16 autocast (SDPA attention, SwiGLU MLP)."""
    h, i = HIDDEN, INTERMEDIATE
    norms = 2 * (4 * h + 2 * h)  # RMSNorm in fp32: its fp32 input and the bf16 normalised output, twice
    attention = 2 * (h + h + h + h) + 2 * h  # q, k, v (GQA repeated to all heads), output; o_proj's input copy
    mlp = 2 * 4 * i  # gate output (SiLU), SiLU output, up output, their product (down_proj's input)
    # Each adapted layer: the fp32 dropout mask and autocast's bf16 copy of the dropped input (lora_A's saved input)
    lora = sum((4 + 2) * PROJECTIONS[name][1] for name in targets)
    return norms + attention + mlp + lora


def memory(recipe: dict, quantized: bool, checkpointing: bool) -> dict[str, float]:
    targets, r = recipe["adapter"]["target_modules"], recipe["adapter"]["r"]
    tokens = recipe["train"]["micro_batch_size"] * recipe["data"]["max_length"]
    linear = LAYERS * sum(out * inp for out, inp in PROJECTIONS.values())
    other = 2 * VOCAB * HIDDEN + LAYERS * 2 * HIDDEN + HIDDEN  # embeddings, lm_head, norms
    adapter_params = LAYERS * sum(r * (out + inp) for name, (out, inp) in PROJECTIONS.items() if name in targets)
    per_layer = saved_bytes_per_token_layer(targets) * tokens
    kept = LAYERS * 2 * HIDDEN * tokens + per_layer if checkpointing else LAYERS * per_layer
    logits = tokens * VOCAB * (2 + 4 + 4)  # bf16 logits, their fp32 upcast, the fp32 softmax gradient
    parts = {
        "weights": (linear * (NF4_BYTES if quantized else 2) + 2 * other),
        "adapter": adapter_params * 4 * 2,
        "optimizer": adapter_params * 4 * 3,
        "activations": kept + logits,
    }
    return {name: value / 1e9 for name, value in parts.items()}


def main() -> None:
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipe = yaml.safe_load((root / "commonsense_llama3.yaml").read_text())
    train = recipe["train"]
    print(f"Llama-3-8B, r={recipe['adapter']['r']} on {','.join(recipe['adapter']['target_modules'])}, micro-batch "
          f"{train['micro_batch_size']} x {recipe['data']['max_length']} tokens, bf16 autocast; GB, computed from shapes")
    columns = {f"{base}{', checkpointing' if ckpt else ''}": memory(recipe, base == "nf4", ckpt)
               for ckpt in (False, True) for base in ("bf16", "nf4")}
    print(f"{'':12}" + "".join(f"{name:>22}" for name in columns))
    for part in ("weights", "adapter", "optimizer", "activations"):
        print(f"{part:12}" + "".join(f"{column[part]:22.2f}" for column in columns.values()))
    print(f"{'total':12}" + "".join(f"{sum(column.values()):22.2f}" for column in columns.values()))


if __name__ == "__main__":
    main()
