"""Pure tensor math of the adapter initialisations: decompositions and factors, no modules, no I/O.

For a weight W (out x in) with SVD W = U diag(S) V^T (S descending) and LoRA scaling s = alpha / r:

    A0 = sqrt(S_r / s) V_r^T        (r x in)
    B0 = U_r sqrt(S_r / s)          (out x r)        so that  s * B0 @ A0 = U_r diag(S_r) V_r^T

where the r components are the SMALLEST singular triplets for MiLoRA and the LARGEST for PiSSA.
The decomposition always runs in float32 or float64: bf16/fp16 SVDs lose the minor components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Components = Literal["minor", "principal"]
SvdDtype = Literal["float32", "float64"]

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Svd:
    """A thin SVD W = U diag(S) Vh with S descending."""

    U: torch.Tensor  # (out, k), k = min(out, in)
    S: torch.Tensor  # (k,)
    Vh: torch.Tensor  # (k, in)


def decompose(weight: torch.Tensor, dtype: SvdDtype = "float64") -> Svd:
    """Full thin SVD of `weight` in `dtype`, on the weight's device, singular values descending."""
    work = weight.detach().to(_DTYPES[dtype])
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)  # (out, k), (k,), (k, in)
    return Svd(U, S, Vh)


def singular_values(weight: torch.Tensor, dtype: SvdDtype = "float64") -> torch.Tensor:
    """The singular values of `weight` in `dtype`, descending: the spectrum without U and V (much cheaper)."""
    return torch.linalg.svdvals(weight.detach().to(_DTYPES[dtype]))  # (k,)


def component_indices(k: int, r: int, components: Components) -> slice:
    """Which of the k descending singular triplets an init uses: the r last (minor) or r first."""
    if not 0 < r <= k:
        raise ValueError(f"rank r={r} must be in 1..{k} (the smaller side of the weight)")
    return slice(k - r, k) if components == "minor" else slice(0, r)


def svd_factors(svd: Svd, r: int, scaling: float, components: Components) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A0, B0) of the chosen r components with s * B0 @ A0 = U_r diag(S_r) V_r^T."""
    part = component_indices(svd.S.numel(), r, components)
    root = torch.sqrt(svd.S[part] / scaling)  # (r,)
    lora_A = root[:, None] * svd.Vh[part, :]  # (r, in)
    lora_B = svd.U[:, part] * root[None, :]  # (out, r)
    return lora_A, lora_B


def init_factors(
    weight: torch.Tensor, r: int, scaling: float, components: Components, dtype: SvdDtype = "float64"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose `weight` and return the (A0, B0) factors of its minor or principal components."""
    return svd_factors(decompose(weight, dtype), r, scaling, components)


def residual(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_res = W - s * B A, in the factors' precision (for analysis; training keeps W and a correction)."""
    return weight.to(lora_A.dtype) - scaling * (lora_B @ lora_A)  # (out, in)
