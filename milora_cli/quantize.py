"""A quantized frozen base (bitsandbytes, through transformers' BitsAndBytesConfig), factors from full precision.

    model.quantize   the frozen base's linear layers (embeddings and lm_head stay in model.dtype)
    none             model.dtype
    nf4              4-bit NormalFloat (QLoRA's): blocks of 64 weights share an fp32 scale, 4.5 bits a weight
    fp4              4-bit float, the same layout
    int8             LLM.int8(): 8-bit rows, outlier features in fp16

Every adapted layer computes Q(W) x + s (B A - B0 A0) x (adapter.py), so at init the correction is exactly
zero and the model computes the quantized base's function bit for bit; the factors, A0 and B0 stay fp32.

A0 and B0 are decomposed from W itself, read tensor by tensor from the checkpoint's safetensors files, never
from Q(W): for 4 bits the error W - Q(W) is about as large as W's minor components, so the minor components
of Q(W) are mostly quantization noise. The same W gives the same factor-cache key as an unquantized run in
the same dtype, so the cache serves both. dW = s (B A - B0 A0) does not involve Q: a merge or a PEFT export
goes onto the original full-precision base (merge.py).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from milora_cli import dtypes, models, shards
from milora_cli.errors import QuantizeError
from milora_cli.recipe import Distributed, Quantize

INSTALL = "pip install 'milora[quant]' (bitsandbytes>=0.50.2)"
_BNB: dict[str, dict[str, Any]] = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


def check(quantize: Quantize, dtype: str, device_type: str, distributed: Distributed = "ddp") -> None:
    """Refuse, before anything loads, a quantized base that cannot run here: one line, what to change.

    `distributed`: the recipe's train.distributed (which, not accelerate's launch, chooses FSDP). ddp runs:
    2 gloo processes train the adapter of 1 process with twice the batch (tests/test_quantize.py). fsdp is
    refused on any number of processes, so that a recipe tried in one process does not fail on eight: FSDP2
    wraps a weight in a DTensor, which loses Params4bit's quant_state (bitsandbytes issue #1945, open: the
    forward comes out wrong); bnb_4bit_quant_storage serves FSDP1's flat parameters, not FSDP2.
    """
    if quantize == "none":
        return
    what = f"model.quantize={quantize}"
    if distributed == "fsdp":
        raise QuantizeError(
            f"{what} with train.distributed=fsdp: milora does not shard bitsandbytes' packed weights; train a quantized "
            "base with train.distributed=ddp (one process or torchrun), or set model.quantize=none"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizeError(f"{what} needs bitsandbytes, which is not installed: {INSTALL}")
    if dtype == "fp64":  # bitsandbytes computes in 16 or 32 bits; fp64 is for exactness tests of the float path
        raise QuantizeError(f"{what} with model.dtype=fp64: a quantized base computes in fp32, bf16 or fp16")
    if dtype == "fp16" and device_type == "cpu":
        # bitsandbytes' CPU fp16 path is the slowest by far: one forward and backward of SmolLM2-135M on 4 x 64
        # tokens took 60 s in nf4/fp16 against 7 s in nf4/bf16 (2 busy cores)
        raise QuantizeError(f"{what} with model.dtype=fp16 on a CPU: use model.dtype=fp32 or bf16 (fp16 compute is for GPUs)")


def load_model(path: str, dtype: str, quantized: Quantize, revision: str | None = None, trust: models.Trust = models.UNTRUSTED,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """models.load_model with the base quantized as it loads (`none`: as it is)."""
    model = models.load_model(path, dtype, revision, trust, device, bnb_config(quantized, dtype),
                              attn_implementation=attn_implementation)
    if quantized == "none":
        return model
    for module in model.modules():
        # At its first eval-mode forward on a CPU, bitsandbytes repacks a 4-bit weight for an AVX512-BF16 kernel
        # that computes in bf16 and has no backward: the gradients through the frozen base would silently vanish
        # after the first held-out score, and eval would score another function than the one trained.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if torch.device(device).type == "cpu":
        _own_memory(model)
    if quantized == "int8" and dtype != "fp16":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_int8_cast_note)
    return model


class _Once(logging.Filter):
    """Lets a log message that starts with `prefix` through the first time only."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        seen, self.seen = self.seen, True
        return not seen


# bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on every int8 matmul of a bf16/fp32
# base (LLM.int8() quantizes its inputs from fp16, by design): once is enough.
_int8_cast_note = _Once("MatMul8bitLt: inputs will be cast")


def _own_memory(model: torch.nn.Module) -> None:
    """Copy the unquantized tensors (embeddings, norms) out of the checkpoint's memory map.

    On CPU they are views of the mapped file, and while one view lives the whole mapping stays resident:
    every page that quantizing read (the full-precision weights, ~0.4 GB for SmolLM2) counted in the
    process's memory for the whole run.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor).__name__ not in ("Params4bit", "Int8Params"):
                tensor.data = tensor.data.clone()


def bnb_config(quantize: Quantize, dtype: str):
    """transformers' BitsAndBytesConfig of `quantize`, computing in `dtype`; None for `none`."""
    if quantize == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**_BNB[quantize], bnb_4bit_compute_dtype=dtypes.TORCH[dtype])


def full_precision_weights(adapters: Mapping[str, Any], quantize: Quantize, model_folder: str, dtype: str,
                           from_checkpoint: bool = False) -> Mapping[str, torch.Tensor]:
    """{layer: W in `dtype`}: the layers' own weights, or for a quantized base (or with `from_checkpoint`: a
    sharded one) the checkpoint's, read one at a time.

    `model_folder`: the model's local folder (models.resolve has fetched or found a hub id's snapshot).
    """
    if quantize == "none" and not from_checkpoint:
        return {name: layer.base_layer.weight for name, layer in adapters.items()}
    tensors = shards.read_index(Path(model_folder))
    for name, layer in adapters.items():
        info = tensors.get(f"{name}.weight")
        expected = (layer.lora_B.out_features, layer.lora_A.in_features)
        if info is None or info.dtype not in dtypes.FLOATING or info.shape != expected:
            seen = "absent" if info is None else f"{info.dtype} of shape {list(info.shape)}"
            raise QuantizeError(
                f"model.quantize={quantize} decomposes the checkpoint's full-precision weights, but its '{name}.weight' is "
                f"{seen} (expected floats of shape {list(expected)}); use an unquantized checkpoint of the model"
            )
    return shards.LazyWeights(tensors, list(adapters), dtypes.TORCH[dtype])

