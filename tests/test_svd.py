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
    lora_A, lora_B = svd.init_factors(weight, r, scaling, components)
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
    minor_A, _ = svd.init_factors(weight, 3, 1.0, "minor")
    principal_A, _ = svd.init_factors(weight, 3, 1.0, "principal")
    assert torch.allclose(minor_A.norm(dim=1) ** 2, dec.S[-3:], rtol=1e-9)
    assert torch.allclose(principal_A.norm(dim=1) ** 2, dec.S[:3], rtol=1e-9)
    assert dec.S[-1] < 0.05 < dec.S[0]


def test_residual_plus_adapter_is_the_weight():
    weight, _ = known_spectrum(24, 16)
    lora_A, lora_B = svd.init_factors(weight, 4, 0.5, "minor")
    rebuilt = svd.residual(weight, lora_A, lora_B, 0.5) + 0.5 * lora_B @ lora_A
    assert torch.allclose(rebuilt, weight.double(), atol=1e-12)


def test_float32_decomposition_is_close_to_float64():
    weight, _ = known_spectrum(64, 64)
    s32 = svd.decompose(weight, "float32").S.double()
    s64 = svd.decompose(weight, "float64").S
    assert ((s32 - s64).abs() / s64).max() < 1e-3


@pytest.mark.parametrize("r", [0, 17])
def test_rank_out_of_range(r):
    weight, _ = known_spectrum(20, 16)
    with pytest.raises(ValueError, match="rank"):
        svd.init_factors(weight, r, 1.0, "minor")
