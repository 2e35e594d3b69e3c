"""The decomposition and the factors of each init, against a float64 numpy reference."""

import numpy as np
import pytest
import torch

from milora_cli import svd


def known_spectrum(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A matrix built from random orthonormal bases and a chosen, well separated spectrum."""
    rng = np.random.default_rng(seed)
    k = min(out_features, in_features)
    U, _ = np.linalg.qr(rng.standard_normal((out_features, k)))
    V, _ = np.linalg.qr(rng.standard_normal((in_features, k)))
    S = np.geomspace(10.0, 1e-2, k)
    return torch.from_numpy((U * S) @ V.T).float(), S


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("components", ["minor", "principal"])
def test_factors_match_float64_reference(shape, components):
    weight, _ = known_spectrum(*shape)
    r, scaling = 5, 2.0
    lora_A, lora_B = svd.init_factors(weight, r, scaling, components, "float64", "svd")
    U, S, Vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    part = slice(len(S) - r, len(S)) if components == "minor" else slice(0, r)
    reference = (U[:, part] * S[part]) @ Vh[part]
    ours = scaling * (lora_B @ lora_A).numpy()
    assert np.abs(ours - reference).max() <= 1e-10 * np.abs(reference).max() + 1e-13
    # The singular values of the adapter's product are exactly the chosen components of W.
    got = np.linalg.svd(ours, compute_uv=False)[:r]
    assert np.allclose(got, S[part], rtol=1e-9)
    # Balanced factors: A A^T = diag(S_r / s) = B^T B.
    assert torch.allclose(lora_A @ lora_A.T, torch.diag(torch.from_numpy(S[part] / scaling)), atol=1e-9)
    assert torch.allclose(lora_B.T @ lora_B, torch.diag(torch.from_numpy(S[part] / scaling)), atol=1e-9)


def test_minor_and_principal_are_the_smallest_and_largest():
    weight, S = known_spectrum(30, 20)
    dec = svd.decompose(weight)
    assert torch.all(dec.S[:-1] >= dec.S[1:])
    minor_A, _ = svd.init_factors(weight, 3, 1.0, "minor", "float64", "svd")
    principal_A, _ = svd.init_factors(weight, 3, 1.0, "principal", "float64", "svd")
    assert torch.allclose(minor_A.norm(dim=1) ** 2, dec.S[-3:], rtol=1e-9)
    assert torch.allclose(principal_A.norm(dim=1) ** 2, dec.S[:3], rtol=1e-9)
    assert dec.S[-1] < 0.05 < dec.S[0]


def test_residual_plus_adapter_is_the_weight():
    weight, _ = known_spectrum(24, 16)
    lora_A, lora_B = svd.init_factors(weight, 4, 0.5, "minor", "float64", "svd")
    rebuilt = svd.residual(weight, lora_A, lora_B, 0.5) + 0.5 * lora_B @ lora_A
    assert torch.allclose(rebuilt, weight.double(), atol=1e-12)


def test_float32_decomposition_is_close_to_float64():
    """A backward-stable float32 SVD returns the singular values of W + E with ||E||_2 <= p(n) u ||W||_2, u = 2^-24
    (rounding W to float32 included); by Weyl's inequality each moves by at most that. p(n) = n, the modest
    multiple LAPACK's error bounds allow; the minor values (1e-2 of the largest here) carry it as relative error."""
    weight, _ = known_spectrum(64, 64)
    s32 = svd.decompose(weight, "float32").S.double()
    s64 = svd.decompose(weight, "float64").S
    assert (s32 - s64).abs().max() <= 64 * 2**-24 * s64.max()


@pytest.mark.parametrize("r", [0, 17])
def test_rank_out_of_range(r):
    weight, _ = known_spectrum(20, 16)
    with pytest.raises(ValueError, match="rank"):
        svd.init_factors(weight, r, 1.0, "minor", "float64", "svd")


def reference_components(weight: torch.Tensor, r: int, components: str) -> tuple[np.ndarray, np.ndarray]:
    """(S_r, U_r diag(S_r) V_r^T) of the chosen components from numpy's float64 SVD."""
    U, S, Vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    part = slice(len(S) - r, len(S)) if components == "minor" else slice(0, r)
    return S[part], (U[:, part] * S[part]) @ Vh[part]


@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (80, 80)])
@pytest.mark.parametrize("components", ["minor", "principal"])
def test_gram_driver_matches_float64_svd(shape, components):
    """Random (Kaiming-like) weights: singular values to 1e-4 relative and the same product s B0 A0."""
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) / shape[1] ** 0.5
    r, scaling = 8, 2.0
    S_ref, product_ref = reference_components(weight, r, components)
    chosen = svd.components_of(weight, r, components, "float64", "gram")
    assert np.allclose(chosen.S.numpy(), S_ref, rtol=1e-4, atol=0)
    assert torch.all(chosen.S[:-1] >= chosen.S[1:])
    lora_A, lora_B = svd.init_factors(weight, r, scaling, components, "float64", "gram")
    ours = scaling * (lora_B @ lora_A).numpy()
    assert np.abs(ours - product_ref).max() <= 1e-8 * np.abs(product_ref).max()


def test_gram_and_svd_drivers_agree_up_to_signs():
    """Singular vectors differ by sign between drivers; the projectors U_r U_r^T and V_r V_r^T do not."""
    weight, _ = known_spectrum(70, 50)
    gram = svd.components_of(weight, 6, "minor", "float64", "gram")
    full = svd.components_of(weight, 6, "minor", "float64", "svd")
    assert torch.allclose(gram.S, full.S, rtol=1e-8)
    assert torch.allclose(gram.U @ gram.U.T, full.U @ full.U.T, atol=1e-9)
    assert torch.allclose(gram.Vh.T @ gram.Vh, full.Vh.T @ full.Vh, atol=1e-9)
    flipped = svd.Svd(-gram.U, gram.S, -gram.Vh)  # a sign flip of both sides leaves the factors' product
    A, B = svd.svd_factors(gram, 6, 1.0, "minor")
    A2, B2 = svd.svd_factors(flipped, 6, 1.0, "minor")
    assert torch.allclose(B @ A, B2 @ A2, atol=0)


@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_gram_falls_back_to_the_full_svd_on_a_rank_deficient_weight(shape, monkeypatch):
    """Rank 30 of 40: the 8 minor singular values are ~0, where the Gram route cannot resolve vectors."""
    rng = torch.Generator().manual_seed(2)
    weight = torch.randn(shape[0], 30, generator=rng, dtype=torch.float64) @ torch.randn(30, shape[1], generator=rng, dtype=torch.float64)
    calls = []
    full_svd = svd.decompose
    monkeypatch.setattr(svd, "decompose", lambda *args: calls.append(args) or full_svd(*args))
    chosen = svd.components_of(weight, 8, "minor", "float64", "gram")
    assert len(calls) == 1  # the fallback ran
    assert chosen.S.max() < 1e-10 * torch.linalg.matrix_norm(weight, 2)
    assert torch.allclose(chosen.U.T @ chosen.U, torch.eye(8, dtype=torch.float64), atol=1e-10)
    # Well-conditioned components of the same matrix take the Gram route.
    svd.components_of(weight, 8, "principal", "float64", "gram")
    assert len(calls) == 1
