"""Pure tensor math of the adapter initialisations: decompositions and factors, no modules, no I/O.

For a weight W (out x in) with SVD W = U diag(S) V^T (S descending) and LoRA scaling s = alpha / r:

    A0 = sqrt(S_r / s) V_r^T        (r x in)
    B0 = U_r sqrt(S_r / s)          (out x r)        so that  s * B0 @ A0 = U_r diag(S_r) V_r^T

where the r components are the SMALLEST singular triplets for MiLoRA and the LARGEST for PiSSA.
The decomposition always runs in float32 or float64: bf16/fp16 SVDs lose the minor components.

Two drivers find the r components (`components_of`):

    svd    the full thin SVD (torch.linalg.svd)
    gram   eigh of the Gram matrix of the short side in float64: for in <= out, W^T W = V diag(S^2) V^T,
           so S = sqrt(clamp(eigvals, 0)) and U_r = W V_r / S_r (for out < in the same with W W^T and
           V_r = W^T U_r / S_r). The Gram squares the condition number: an eigenvalue's absolute error
           is about eps64 * S_max^2, so S_i's relative error is about eps64 * (S_max / S_i)^2. Where a
           chosen S_i is below GRAM_MIN_RELATIVE * S_max (1e-4 relative accuracy or worse) the driver
           falls back to the full SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from milora_cli.dtypes import TORCH as _DTYPES
from milora_cli.recipe import SvdDriver, SvdDtype

Components = Literal["minor", "principal"]

# Below this S_i / S_max the Gram route's relative error on S_i exceeds ~1e-4 (eps64 / 1e-12).
GRAM_MIN_RELATIVE = 1e-6


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


def _components_svd(weight: torch.Tensor, r: int, components: Components, dtype: SvdDtype) -> Svd:
    full = decompose(weight, dtype)
    part = component_indices(full.S.numel(), r, components)
    return Svd(full.U[:, part], full.S[part], full.Vh[part, :])


def _components_gram(weight: torch.Tensor, r: int, components: Components, dtype: SvdDtype) -> Svd:
    """The r chosen triplets from eigh of the short side's Gram matrix, in float64 whatever `dtype`."""
    work = weight.detach().to(torch.float64)
    out_features, in_features = work.shape
    tall = in_features <= out_features
    gram = work.T @ work if tall else work @ work.T  # (k, k), k = min(out, in)
    eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    k = eigvals.numel()
    part = component_indices(k, r, components)
    # 1. eigh is ascending, SVD order is descending: flip the chosen columns
    descending = torch.arange(k - 1, -1, -1, device=eigvals.device)[part]
    S = torch.sqrt(torch.clamp(eigvals[descending], min=0))  # (r,)
    largest = torch.sqrt(torch.clamp(eigvals[-1], min=0))
    # 2. ill-conditioned for these components: the full SVD is accurate where the Gram is not
    if not bool(largest > 0) or bool(S.min() < GRAM_MIN_RELATIVE * largest):
        return _components_svd(weight, r, components, dtype)
    short = eigvecs[:, descending]  # (k, r): V_r if tall, else U_r
    other = (work @ short if tall else work.T @ short) / S[None, :]  # (out, r) U_r, or (in, r) V_r
    U, V = (other, short) if tall else (short, other)
    cast = _DTYPES[dtype]
    return Svd(U.to(cast), S.to(cast), V.T.to(cast))


_DRIVERS = {"svd": _components_svd, "gram": _components_gram}


def components_of(weight: torch.Tensor, r: int, components: Components, dtype: SvdDtype, driver: SvdDriver) -> Svd:
    """The r minor or principal singular triplets of `weight` (S descending), by `driver`."""
    return _DRIVERS[driver](weight, r, components, dtype)


def init_factors(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    components: Components,
    dtype: SvdDtype,
    driver: SvdDriver,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose `weight` and return the (A0, B0) factors of its minor or principal components."""
    chosen = components_of(weight, r, components, dtype, driver)
    return svd_factors(chosen, r, scaling, "minor")  # `chosen` holds exactly r triplets


# Cached factors pass `are_singular_pairs` when both residuals are at most this times ||W||_F |a_i|. Rounding the
# factors to float32 moves each by at most 2^-24 relative (about 6e-8 of ||W||_2 |a_i| in the residuals); a float32
# SVD's backward error is at most about n eps32 ||W||_2 (n = 14336, Llama-3-8B's MLP: 9e-4 ||W||_2, and
# ||W||_2 <= ||W||_F); a float64 decomposition's is far below either. Factors that are not this weight's (another
# weight's, random ones) leave residuals of the order of ||W a_i||: on SmolLM2-135M at least 2.8e-2 ||W||_F |a_i|,
# where its own factors stay below 5e-7 for every driver and dtype (both measured once, to see the margin).
FACTORS_TOLERANCE = 1e-3


def are_singular_pairs(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> bool:
    """True when (A0, B0) are `svd_factors` of singular triplets of `weight`: with a_i row i of A0, b_i column i of
    B0 and S_i = s |a_i|^2, both W a_i = S_i b_i and W^T b_i = S_i a_i hold (up to FACTORS_TOLERANCE).

    Costs two (out x in) @ (in x r) products in float64: little next to a decomposition.
    """
    W = weight.detach().to(torch.float64)  # (out, in)
    A, B = lora_A.detach().to(W.device, torch.float64), lora_B.detach().to(W.device, torch.float64)  # (r, in), (out, r)
    S = scaling * (A * A).sum(dim=1)  # (r,)
    bound = FACTORS_TOLERANCE * torch.linalg.matrix_norm(W) * A.norm(dim=1)  # (r,)
    left = (W @ A.T - B * S).norm(dim=0)  # (r,) |W a_i - S_i b_i|
    right = (W.T @ B - A.T * S).norm(dim=0)  # (r,) |W^T b_i - S_i a_i|
    return bool(((left <= bound) & (right <= bound)).all())


def are_left_singular_vectors(weight: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """True when the columns b_i of MiCA's B0 (its A0 is 0, so `are_singular_pairs` has no S_i to test) are unit
    left singular vectors of `weight`: |b_i| = 1 and W W^T b_i = l_i b_i with l_i = |W^T b_i|^2, both up to
    FACTORS_TOLERANCE (relative to 1 and to ||W||_F^2: the same rounding and backward-error argument, squared)."""
    W = weight.detach().to(torch.float64)  # (out, in)
    B = lora_B.detach().to(W.device, torch.float64)  # (out, r)
    G = W.T @ B  # (in, r)
    eigen = (G * G).sum(dim=0)  # (r,)
    residual = (W @ G - B * eigen).norm(dim=0)  # (r,)
    unit = (B.norm(dim=0) - 1).abs() <= FACTORS_TOLERANCE
    return bool((unit & (residual <= FACTORS_TOLERANCE * torch.linalg.matrix_norm(W) ** 2)).all())


def mica_factors(weight: torch.Tensor, r: int, dtype: SvdDtype, driver: SvdDriver) -> tuple[torch.Tensor, torch.Tensor]:
    """MiCA's (A0, B0), as PEFT's init_lora_weights="mica" (LoraLayer.mica_init):

        B0 = U_r        the left singular vectors of the r SMALLEST singular values, no singular values
        A0 = 0          (r x in)

    so s B0 A0 = 0 whatever the scaling: the base is untouched, and only A trains (adapter.FROZEN_B).
    """
    chosen = components_of(weight, r, "minor", dtype, driver)
    return chosen.U.new_zeros(r, weight.shape[1]), chosen.U  # (r, in), (out, r)


def residual(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W_res = W - s * B A, in the factors' precision (for analysis; training keeps W and a correction)."""
    return weight.to(lora_A.dtype) - scaling * (lora_B @ lora_A)  # (out, in)


def truncate_product(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B_k, A_k, S): the best rank-k approximation B_k A_k of B A (Eckart-Young), and all singular values of B A.

    With thin QRs B = Q_B R_B and A^T = Q_A R_A, B A = Q_B (R_B R_A^T) Q_A^T, so the SVD of the small core
    R_B R_A^T = U diag(S) V^T is that of B A: B A = (Q_B U) diag(S) (Q_A V)^T, without forming B A. Then

        B_k = Q_B U_k sqrt(S_k)        A_k = sqrt(S_k) V_k^T Q_A^T        ||B A - B_k A_k||_F^2 = sum_{i>k} S_i^2

    B_k A_k == B A in exact arithmetic when k >= rank(B A). B_k and A_k have exactly k columns / rows: where
    B A has fewer than k singular values, the missing ones are zero. Computed in the inputs' dtype.
    """
    Q_B, R_B = torch.linalg.qr(B)  # (out, m), (m, p)
    Q_A, R_A = torch.linalg.qr(A.T)  # (in, n), (n, p)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # (m, q), (q,), (q, n)
    kept = min(k, S.numel())
    root = torch.sqrt(S[:kept])  # (kept,)
    B_k = B.new_zeros(B.shape[0], k)
    A_k = A.new_zeros(k, A.shape[1])
    B_k[:, :kept] = (Q_B @ U[:, :kept]) * root[None, :]  # (out, kept)
    A_k[:kept, :] = (root[:, None] * Vh[:kept, :]) @ Q_A.T  # (kept, in)
    return B_k, A_k, S
