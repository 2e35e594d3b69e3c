"""The one dtype table: the names users write, the names safetensors files carry, and torch's dtypes behind both.

    user (recipe, --dtype)   fp32 bf16 fp16            weights and activations
    recipe's model.dtype     fp64                      exactness tests on tiny models (factors in float64 too)
    decomposition            float32 float64           recipe's adapter.svd_dtype (never half precision)
    safetensors header       F64 F32 BF16 F16 I64 ...  what a weight file says of each tensor
"""

from __future__ import annotations

import torch

TORCH: dict[str, torch.dtype] = {
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
    "float32": torch.float32, "float64": torch.float64,
}
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOATING = {"F64", "F32", "BF16", "F16"}  # safetensors names of floating-point tensors
_USER = ("fp32", "bf16", "fp16")


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """float32 for a 16-bit float (or an integer storage), float64 for float64: the dtype losses, adapter
    factors and their gradients are kept in."""
    return torch.promote_types(dtype, torch.float32)


def safetensors_name(dtype: torch.dtype) -> str:
    """F32 for torch.float32, and so on."""
    return next(name for name, value in SAFETENSORS.items() if value == dtype)


def user_name(safetensors: str) -> str | None:
    """fp32 / bf16 / fp16 for a floating safetensors name, None for any other (F64 has no user name)."""
    return next((name for name in _USER if TORCH[name] == SAFETENSORS[safetensors]), None)
