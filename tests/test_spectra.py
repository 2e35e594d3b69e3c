"""`milora svd-inspect`: spectra recovered from weights built with known singular values, agreement with a
float64 numpy SVD, the cache, the update measures on constructed updates, and milora vs pissa runs."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from helpers import milora
from milora_cli import shards, svd
from milora_cli.spectra import analysis
from milora_cli.errors import InspectError
from milora_cli.recipe import validate
from milora_cli.spectra.inspect import inspect
from milora_cli.training.train import train

# q, k (short side 8) and down (wide) in two layers; the spectra are geometric, condition number 80 to 160
SHAPES = {"self_attn.q_proj": (16, 16), "self_attn.k_proj": (8, 16), "mlp.down_proj": (16, 24)}


def chosen_spectrum(k: int, layer: int) -> np.ndarray:
    return np.geomspace(4.0, 0.05 / (layer + 1), k) * (layer + 1)


def float32_bound(S: np.ndarray) -> np.ndarray:
    """How far storing W = U diag(S) V^T in float32 can move each singular value, relative to it: the rounding E has
    ||E||_2 <= ||E||_F <= 2^-24 ||W||_F, and by Weyl's inequality no singular value moves by more (the float64 SVD
    adds ~1e-16 ||W||_2)."""
    return 2**-24 * np.sqrt((S**2).sum()) / S + 1e-12


def orthonormal(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]  # (rows, cols)


@pytest.fixture
def known_model(tmp_path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    """A safetensors "model" whose projections are U diag(S) V^T in fp32 with chosen S; plus non-projections."""
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    tensors, chosen = {}, {}
    for layer in range(2):
        for module, (out, inp) in SHAPES.items():
            k = min(out, inp)
            S = chosen_spectrum(k, layer)
            W = orthonormal(out, k, rng) @ np.diag(S) @ orthonormal(inp, k, rng).T  # (out, in), float64
            name = f"model.layers.{layer}.{module}"
            tensors[f"{name}.weight"] = torch.from_numpy(W).float()
            chosen[name] = S
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(16)
    tensors["model.embed_tokens.weight"] = torch.randn(50, 16)
    tensors["lm_head.weight"] = torch.randn(50, 16)
    tensors["model.norm.weight"] = torch.ones(16)
    folder = tmp_path / "known"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder, chosen


def test_known_spectra_are_recovered(known_model):
    folder, chosen = known_model
    found = inspect([str(folder)], rank=2)
    # only the projections, in block order (q, k, ..., down), not embeddings, lm_head or norms
    modules = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
    assert [s.name for s in found.spectra] == [f"model.layers.{i}.{m}" for i in range(2) for m in modules]
    for s in found.spectra:
        S = chosen[s.name]
        assert np.all(np.abs(s.S.numpy() - S) / S <= float32_bound(S)), s.name
        stats = analysis.spectrum_stats(s.S, 2)
        p = S / S.sum()
        assert stats["condition"] == pytest.approx(S[0] / S[-1], rel=1e-5)
        assert stats["effective_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
        assert stats["minor_energy"] == pytest.approx((S[-2:] ** 2).sum() / (S**2).sum(), rel=1e-5)
        assert stats["principal_energy"] == pytest.approx((S[:2] ** 2).sum() / (S**2).sum(), rel=1e-5)
    assert found.note is None


def test_a_second_inspection_reads_the_cache(known_model, monkeypatch):
    folder, _ = known_model
    calls = []
    real = svd.singular_values
    monkeypatch.setattr(svd, "singular_values", lambda *args: calls.append(1) or real(*args))
    first = inspect([str(folder)])
    assert len(calls) == 6 and first.cached == 0
    second = inspect([str(folder)])
    assert len(calls) == 6 and second.cached == 6
    assert all(torch.equal(a.S, b.S) for a, b in zip(first.spectra, second.spectra, strict=False))
    entries = sorted((Path(os.environ["MILORA_CACHE"]) / analysis.SPECTRA_DIR).glob("*.safetensors"))
    assert len(entries) == 6
    entries[0].write_bytes(b"damaged")  # a damaged entry is recomputed, not an error
    assert inspect([str(folder)]).cached == 5 and len(calls) == 7


def test_filters_and_files(known_model, tmp_path):
    folder, chosen = known_model
    out = tmp_path / "out"
    found = inspect([str(folder)], modules="k_proj,down_proj", layers="1", rank=3,
                    json_path=out / "s.json", csv_path=out / "s.csv", plot_path=out / "s.png")
    assert [s.name for s in found.spectra] == ["model.layers.1.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    document = json.loads((out / "s.json").read_text())
    assert document["rank"] == 3 and document["runs"] == []
    for matrix in document["matrices"]:
        values = np.array(matrix["singular_values"])
        assert len(values) == min(matrix["shape"]) and np.all(np.diff(values) <= 0)
        S = chosen[matrix["name"]]
        assert np.all(np.abs(values - S) / S <= float32_bound(S))
    assert len((out / "s.csv").read_text().splitlines()) == 3
    assert (out / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"modules": "q_prj"}, "q_proj, k_proj, down_proj"), ({"layers": "5-7"}, "layers are 0-1"),
     ({"layers": "3-1"}, "ranges like"), ({"rank": 9}, "smaller side")],
)
def test_user_mistakes_name_what_is_wrong(known_model, kwargs, needle):
    with pytest.raises(InspectError, match=needle):
        inspect([str(known_model[0])], **kwargs)


def test_plot_without_matplotlib_is_a_one_line_error(known_model, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "matplotlib" else real(name, *args))
    with pytest.raises(InspectError, match=r"pip install 'milora\[plot\]'"):
        inspect([str(known_model[0])], plot_path=tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_cli_mistakes_are_one_line_and_exit_2(known_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = milora("svd-inspect", str(known_model[0]), "--modules", "q_prj", env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "q_prj" in result.stderr


def rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]], dtype=torch.float64)


def test_update_measures_on_constructed_updates():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 10, generator=g, dtype=torch.float64))  # (12, 10)
    V, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))  # (10, 10)
    S = torch.arange(10, 0, -1, dtype=torch.float64)  # full rank: the minor components are U[:, -2:], V[:, -2:]
    W = U @ torch.diag(S) @ V.T
    base = svd.decompose(W)
    X = torch.randn(2, 2, generator=g, dtype=torch.float64) * 0.1
    principal = analysis.update_stats(base, W, U[:, :2] @ X @ V[:, :2].T, 2)
    assert principal.principal_share == pytest.approx(1.0) and principal.minor_share == pytest.approx(0.0, abs=1e-12)
    minor = analysis.update_stats(base, W, U[:, -2:] @ torch.diag(torch.tensor([0.3, 0.2], dtype=torch.float64)) @ V[:, -2:].T, 2)
    assert minor.minor_share == pytest.approx(1.0) and minor.principal_share == pytest.approx(0.0, abs=1e-12)
    assert minor.max_angle == pytest.approx(0.0, abs=1e-5)  # only minor singular values moved: the top is where it was
    # W' = R W rotates W's left singular vectors by R: the top one (e1) by 10 degrees
    D = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    rotated = analysis.update_stats(svd.decompose(D), D, (rotation(math.radians(10)) - torch.eye(3, dtype=torch.float64)) @ D, 1)
    assert rotated.max_angle == pytest.approx(10.0, rel=1e-9) and rotated.mean_sin2 == pytest.approx(math.sin(math.radians(10)) ** 2)
    zero = analysis.update_stats(base, W, torch.zeros_like(W), 2)
    assert math.isnan(zero.principal_share) and zero.max_angle == pytest.approx(0.0, abs=1e-9) and zero.relative_norm == 0.0


def short_run(model: str, out: Path, init: str, data: dict, steps: int, lr: float, r: int) -> Path:
    raw = {
        "model": {"name_or_path": model},
        "adapter": {"init": init, "r": r, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {**data, "val_size": 0, "max_length": 64},
        "train": {"max_steps": steps, "lr": lr, "warmup_steps": 0, "micro_batch_size": 4, "eval_every": None, "seed": 1},
        "output": {"dir": str(out)},
        "eval": {"heldout": 0},
    }
    train(validate(raw), Console(quiet=True))
    return out


def mean(document: dict, run: int, key: str) -> float:
    return float(np.mean([m[key] for m in document["runs"][run]["matrices"]]))


def base_singular_values_agree_with_numpy(document: dict, base: Path) -> None:
    index = shards.read_index(base)
    for matrix in document["matrices"]:
        weight = next(shards.read_tensors(index, [f"{matrix['name']}.weight"])).double().numpy()
        reference = np.linalg.svd(weight, compute_uv=False)  # float64 LAPACK, independent of torch
        assert np.max(np.abs(np.array(matrix["singular_values"]) - reference) / reference) <= 1e-5, matrix["name"]


def test_milora_update_stays_out_of_the_principal_subspace_tiny(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "cache"))
    data = {"path": tiny_data}
    runs = [str(short_run(tiny_model_dir, tmp_path / init, init, data, 3, 1e-2, 4)) for init in ("milora", "pissa")]
    found = inspect(runs, json_path=tmp_path / "runs.json")
    document = json.loads((tmp_path / "runs.json").read_text())
    assert [run["init"] for run in document["runs"]] == ["milora", "pissa"] and len(found.spectra) == 4
    assert mean(document, 1, "principal_share") > 2 * mean(document, 0, "principal_share")
    assert mean(document, 0, "minor_share") > 2 * mean(document, 1, "minor_share")
    assert mean(document, 1, "max_angle") > mean(document, 0, "max_angle")
    base_singular_values_agree_with_numpy(document, Path(tiny_model_dir))
    # runs of two different bases are not compared
    other = tmp_path / "other"
    shutil.copytree(runs[0], other)
    meta = json.loads((other / "adapter" / "adapter_meta.json").read_text())
    meta.update(base_model="elsewhere", base_model_path=str(shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")))
    (other / "adapter" / "adapter_meta.json").write_text(json.dumps(meta))
    with pytest.raises(InspectError, match="different base models"):
        inspect([runs[0], str(other)])
    # an adapter folder (best/ is absent without validation; the final adapter/ itself) and an init-only run
    init_only = short_run(tiny_model_dir, tmp_path / "init", "milora", data, 0, 5e-2, 4)
    found = inspect([str(init_only / "adapter")], json_path=tmp_path / "init.json")
    matrices = json.loads((tmp_path / "init.json").read_text())["runs"][0]["matrices"]
    assert all(m["principal_share"] is None and m["relative_norm"] == 0 for m in matrices)


@pytest.mark.slow
def test_pissa_moves_the_principal_subspace_more_than_milora_smollm2(smollm2_path, tmp_path):
    """The paper's analysis on the real model: short quickstart runs, compared by the installed command."""
    data = {"builtin": "quickstart"}
    runs = [str(short_run("smollm2-135m", tmp_path / init, init, data, 10, 1e-3, 8)) for init in ("milora", "pissa")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = milora("svd-inspect", "--compare", *runs, "--json", str(tmp_path / "c.json"), env=env)
    assert result.returncode == 0, result.stderr
    assert "quantisation noise floor" in result.stdout  # the honest label of the GGUF-derived weights
    document = json.loads((tmp_path / "c.json").read_text())
    assert len(document["matrices"]) == 60 and document["note"]
    assert mean(document, 1, "principal_share") > 2 * mean(document, 0, "principal_share")
    assert mean(document, 0, "minor_share") > mean(document, 1, "minor_share")
    base_singular_values_agree_with_numpy(document, Path(smollm2_path))
