"""The initial factors decomposed once: identical on every rank, shared out, and cached on disk."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from helpers import REPO
from milora_cli import adapter, models
from milora_cli.training import init_cache
from milora_cli.recipe import AdapterConfig, validate
from milora_cli.training.train import train

CFG = AdapterConfig(init="milora", r=4, target_modules="all-linear")


@pytest.fixture
def factor_cache(tmp_path, monkeypatch) -> Path:
    """An empty factor cache of this test only (models are local folders here: no conversion needed)."""
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "factors"


def adapted(model_dir: str, cfg: AdapterConfig = CFG) -> dict[str, adapter.MiloraLinear]:
    model = models.load_model(model_dir, "fp32")
    return adapter.inject(model, adapter.find_targets(model, cfg.target_modules), cfg.r, cfg.alpha, 0.0)


def test_a_second_init_reads_the_cache_and_decomposes_nothing(tiny_model_dir, factor_cache, monkeypatch):
    first = adapted(tiny_model_dir)
    report = init_cache.initialise(first, CFG, seed=0, use_cache=True)
    assert (report.computed, report.cached) == (14, 0) and len(list(factor_cache.glob("*.safetensors"))) == 14
    assert not list(factor_cache.glob(".*"))  # no temporary file left behind

    def no_decomposition(*args, **kwargs):
        raise AssertionError("decomposed although the factors are cached")

    monkeypatch.setattr(adapter, "initial_factors", no_decomposition)
    second = adapted(tiny_model_dir)
    report = init_cache.initialise(second, CFG, seed=0, use_cache=True)
    assert (report.computed, report.cached) == (0, 14)
    for name in first:
        assert torch.equal(first[name].lora_A0, second[name].lora_A0) and torch.equal(first[name].lora_B0, second[name].lora_B0)


@pytest.mark.parametrize("change", ["alpha", "driver", "init", "weight"])
def test_the_cache_key_covers_weights_init_alpha_and_driver(tiny_model_dir, factor_cache, change):
    init_cache.initialise(adapted(tiny_model_dir), CFG, seed=0, use_cache=True)
    cfg = CFG.model_copy(update={"alpha": 8.0} if change == "alpha" else {"svd_driver": "svd"} if change == "driver"
                         else {"init": "pissa"} if change == "init" else {})
    layers = adapted(tiny_model_dir, cfg)
    if change == "weight":
        with torch.no_grad():
            next(iter(layers.values())).base_layer.weight[0, 0] += 1e-3
    report = init_cache.initialise(layers, cfg, seed=0, use_cache=True)
    assert report.computed == (1 if change == "weight" else 14)


def test_a_damaged_cache_file_is_recomputed(tiny_model_dir, factor_cache):
    init_cache.initialise(adapted(tiny_model_dir), CFG, seed=0, use_cache=True)
    damaged = sorted(factor_cache.glob("*.safetensors"))[0]
    damaged.write_bytes(b"not a safetensors file")
    report = init_cache.initialise(adapted(tiny_model_dir), CFG, seed=0, use_cache=True)
    assert (report.computed, report.cached) == (1, 13)
    assert init_cache.initialise(adapted(tiny_model_dir), CFG, seed=0, use_cache=True).cached == 14


def test_train_reports_init_from_cache(tiny_model_dir, tiny_data, tmp_path, factor_cache):
    def run(out: Path) -> tuple[dict, str]:
        raw = {"model": {"name_or_path": tiny_model_dir}, "adapter": {"r": 4, "target_modules": "all-linear"},
               "data": {"path": tiny_data, "val_size": 8, "max_length": 64}, "train": {"max_steps": 0},
               "output": {"dir": str(out)}}
        text = io.StringIO()
        return train(validate(raw), Console(file=text, width=200)), text.getvalue()

    summary, text = run(tmp_path / "a")
    assert (summary["init_decomposed"], summary["init_from_cache"]) == (14, 0) and "from cache" not in text
    summary, text = run(tmp_path / "b")
    assert (summary["init_decomposed"], summary["init_from_cache"]) == (0, 14) and "(init from cache)" in text
    assert load_file(tmp_path / "a" / "adapter" / "adapter_init.safetensors").keys() == load_file(
        tmp_path / "b" / "adapter" / "adapter_init.safetensors").keys()


def test_two_processes_share_the_decomposition_and_hold_identical_factors(tiny_model_dir, tmp_path):
    """torchrun 2 ranks: each decomposes 7 of the 14 layers, and both end with the 1-process factors."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "init_worker.py"), tiny_model_dir, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["mine"] for r in reports] == [7, 7] and all(r["computed"] == 14 for r in reports)
    single = adapted(tiny_model_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun children (OMP_NUM_THREADS=1): the same LAPACK calls on the same weights
    try:
        init_cache.initialise(single, CFG, seed=0, use_cache=False)
    finally:
        torch.set_num_threads(threads)
    _, reference = adapter.adapter_tensors(single)
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in reference)  # bit for bit across ranks
    # Against one process: the same float64 decompositions, but MKL's LAPACK may take another path for other memory
    # alignments, so the float64 factors may differ by ~n u64 ||W|| / gap (~1e-12 here); stored in float32, an element
    # then lands on the same float32 value or its neighbour: one float32 ulp, 2^-23 relative (atol: elements near 0).
    assert all(torch.allclose(ranks[0][key], reference[key], rtol=2**-23, atol=1e-10) for key in reference)
