"""`milora merge`: merged folders and PEFT adapters against the ORIGINAL base give the trained model's logits.

Fast tests on the tiny seeded Llama; the same properties on the real SmolLM2-135M are marked slow.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import helpers
from helpers import REPO, rel_max_error
from milora_cli import adapter, adapter_folder, models, shards
from milora_cli import merge
from milora_cli.recipe import validate
from milora_cli.training.train import train

INITS = ["lora", "pissa", "milora", "mica"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# An export holds W' = W + dW rounded once to float32 (the base's dtype) and runs in float32, against the trained
# model's float32 forward: 2^-24 relative per weight, and per dot product of n <= 128 terms ~sqrt(n) 2^-24 (rounding
# errors of random sign): through the tiny model's 2 layers and head ~2 (1 + 12) 6e-8 ~ 1.6e-6 of the largest logit,
# and 1e-5 is 6 times that. (SmolLM2's residual stream and norms keep the relative error from growing with its 30
# layers; its test prints the errors measured.) Not a float64 test: a merge is written in the base's float32.
FP32_EXPORT = 1e-5


def short_run(model: str, data: str, out: Path, init: str, r: int, targets, lr: float) -> Path:
    """Two optimizer steps, large enough a learning rate that A and B move away from A0, B0."""
    raw = {
        "model": {"name_or_path": model},
        "adapter": {"init": init, "r": r, "dropout": 0.0, "target_modules": targets},
        "data": {"path": data, "val_size": 0, "max_length": 64},
        "train": {"max_steps": 2, "lr": lr, "warmup_steps": 0, "micro_batch_size": 2, "eval_every": None},
        "output": {"dir": str(out)},
        "eval": {"heldout": 0},
    }
    train(validate(raw), Console(quiet=True))
    return out


def trained_model(folder: Path):
    """The model as training left it: the base with the milora layers and the saved factors."""
    found = adapter_folder.read_adapter(folder)
    meta = found.meta
    model = models.load_model(meta["base_model_path"], meta["base_dtype"])
    layers = adapter.inject(model, meta["target_modules"], meta["r"], meta["lora_alpha"], 0.0)
    adapter.load_adapter_tensors(layers, found.trained, found.initial)
    return model


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))


def trained_logits(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, the trained model's logits on them): what every export of `run` must reproduce."""
    model = trained_model(run / "adapter")
    ids = token_ids(model.config.vocab_size)
    return ids, logits(model, ids)


def peft_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    config = json.loads((folder / merge.PEFT_CONFIG).read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    return logits(PeftModel.from_pretrained(base, folder).eval(), ids)


def milora(*args: str) -> subprocess.CompletedProcess:
    return helpers.milora(*args, env=ENV)


@pytest.fixture(scope="module")
def tiny_runs(tiny_model_dir, tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    return {init: short_run(tiny_model_dir, tiny_data, root / init, init, 4, "all-linear", 5e-2) for init in INITS}


@pytest.mark.parametrize("init", INITS)
def test_merged_folder_and_peft_adapter_give_the_trained_logits(tiny_runs, tiny_model_dir, init, tmp_path):
    run = tiny_runs[init]
    ids, expected = trained_logits(run)
    base = models.load_model(tiny_model_dir, "fp32")
    assert rel_max_error(logits(base, ids), expected) > 1e-2  # training moved the model: the checks below can fail

    merged = merge.merge(run, tmp_path / "merged", max_shard_size="100KB")  # several shards and an index
    index = json.loads((merged / shards.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    assert rel_max_error(logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids), expected) <= FP32_EXPORT

    peft_dir = merge.merge(run, tmp_path / "peft", fmt="peft")
    config = json.loads((peft_dir / merge.PEFT_CONFIG).read_text())
    factor = 1 if init in ("lora", "mica") else 2  # lora: B0 = 0, mica: A0 = 0, nothing to subtract
    assert (config["r"], config["lora_alpha"]) == (4 * factor, 4 * factor * (2 if init in ("lora", "mica") else 1))
    assert config["target_modules"] == sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert rel_max_error(peft_logits(peft_dir, ids), expected) <= FP32_EXPORT

    found = adapter_folder.read_adapter(run / "adapter")
    if init == "mica":  # only A trained: B is still the frozen minor singular vectors, bit for bit
        assert all(torch.equal(found.factors(layer)[1], found.factors(layer)[3]) for layer in found.layers)
    if init in ("milora", "pissa"):  # why the export needs B0 A0: "base + s B A" on the original weights is another model
        with torch.no_grad():
            for layer in found.layers:
                A, B, _, _ = found.factors(layer)
                base.get_submodule(layer).weight += found.meta["scaling"] * (B @ A)
        assert rel_max_error(logits(base, ids), expected) > 1e-2


def test_bf16_merge_is_the_float32_merge_rounded_once(tiny_runs, tmp_path):
    fp32 = merge.merge(tiny_runs["milora"], tmp_path / "fp32")
    bf16 = merge.merge(tiny_runs["milora"], tmp_path / "bf16", dtype="bf16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    exact, rounded = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert exact.keys() == rounded.keys() and all(torch.equal(exact[k].bfloat16(), rounded[k]) for k in exact)


def test_other_weights_of_the_same_architecture_are_merged_with_a_warning(tiny_runs, tiny_model_dir, tmp_path):
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    console = Console(record=True, width=400)
    merge.merge(tiny_runs["milora"], tmp_path / "out", base=str(tmp_path / "other"), console=console)
    assert "differ from those the adapter was trained on" in console.export_text()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_base_of_other_shapes_is_refused_in_one_line(tiny_runs, tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    out = tmp_path / "out"
    result = milora("merge", "--adapter", str(tiny_runs["milora"]), "--base", str(tmp_path / "other"), "--output", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'model.embed_tokens.weight' has shape [64, 48]" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_an_existing_output_is_refused_and_replaced_only_with_force(tiny_runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = milora("merge", "--adapter", str(tiny_runs["lora"] / "adapter"), "--output", str(out), "--format", "peft")
    assert result.returncode == 2 and "--force" in result.stderr and (out / "keep.txt").is_file()
    result = milora("merge", "--adapter", str(tiny_runs["lora"] / "adapter"), "--output", str(out), "--format", "peft", "--force")
    assert result.returncode == 0, result.stderr
    assert (out / merge.PEFT_WEIGHTS).is_file() and not (out / "keep.txt").exists()


def synthetic_adapter(root: Path, n_layers: int = 24, size: int = 2048, r: int = 4) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 400 MB float32 'model' of square weights and a random milora adapter on two of them."""
    base = root / "base"
    base.mkdir()
    weights = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((size, size), float(i)) for i in range(n_layers)}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    layers = [f"model.layers.{i}.mlp.up_proj" for i in (0, n_layers - 1)]
    g = torch.Generator().manual_seed(0)
    def factors():
        return {adapter_folder.key(layer, p): torch.randn(*((r, size) if p == "A" else (size, r)), generator=g) for layer in layers for p in "AB"}
    trained, initial = factors(), factors()
    meta = {"init": "milora", "r": r, "lora_alpha": r, "scaling": 1.0, "lora_dropout": 0.0, "target_modules": layers,
            "base_model": str(base), "base_model_path": str(base), "revision": None, "base_dtype": "fp32",
            "base_fingerprint": models.weights_fingerprint({layer: weights[f"{layer}.weight"] for layer in layers}), "versions": {}}
    (root / "adapter").mkdir()
    adapter_folder.write_adapter(root / "adapter", trained, initial, meta, "")
    def product(factors: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
        return factors[adapter_folder.key(layer, "B")] @ factors[adapter_folder.key(layer, "A")]
    delta = {layer: product(trained, layer) - product(initial, layer) for layer in layers}
    return root / "adapter", {f"{layer}.weight": weights[f"{layer}.weight"] + d for layer, d in delta.items()}


def test_a_killed_merge_leaves_no_output_and_a_rerun_succeeds(tmp_path):
    adapter_dir, expected = synthetic_adapter(tmp_path)
    out = tmp_path / "merged"
    command = [sys.executable, "-m", "milora_cli", "merge", "--adapter", str(adapter_dir), "--output", str(out), "--max-shard-size", "16MB"]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".merged.partial-*/model-*.safetensors")):  # it has begun writing shards
        assert proc.poll() is None, "the merge ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".merged.partial-*"))
    result = milora(*command[3:])
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.glob(".merged.partial-*"))  # the killed run's folder was cleaned up
    index = json.loads((out / shards.INDEX_FILE).read_text())
    assert len(index["weight_map"]) == 24 and len(set(index["weight_map"].values())) == 24
    # Two float32 evaluations of W + B A - B0 A0 (|W| <= 23, r = 4 products of unit normals: |W'| < 32 mostly): each
    # rounds W' to half an ulp (<= 1.9e-6 below 32) after sums of 2r = 8 products (~sqrt(8) 2^-24 |terms|, < 1e-6).
    for name, tensor in expected.items():
        assert torch.allclose(load_file(out / index["weight_map"][name])[name], tensor, rtol=0, atol=1e-5)


# ---- the real model -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_runs(smollm2_path, tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smol-runs")
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    return {init: short_run("smollm2-135m", tiny_data, root / init, init, 8, targets, 1e-3) for init in INITS}


LOAD_MERGED = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert not [name for name in sys.modules if name.startswith("milora")]
with torch.no_grad():
    logits = model(input_ids=load_file(sys.argv[2])["ids"]).logits.float()
save_file({"logits": logits.contiguous()}, sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize("init", INITS)
def test_smollm2_merged_and_peft_give_the_trained_logits(smol_runs, smollm2_path, init, tmp_path):
    run = smol_runs[init]
    ids, expected = trained_logits(run)
    assert rel_max_error(logits(models.load_model(smollm2_path, "fp32"), ids), expected) > 1e-4

    merged = merge.merge(run, tmp_path / "merged", max_shard_size="200MB")
    assert not (merged / models.SOURCE_FILE).exists() and "Q4_1" in (merged / "README.md").read_text()
    assert json.loads((merged / merge.PROVENANCE_FILE).read_text())["derived_from"]["quantised"] is True
    save_file({"ids": ids}, tmp_path / "ids.safetensors")
    # A fresh interpreter that never imports milora loads the folder with transformers alone.
    load = subprocess.run([sys.executable, "-c", LOAD_MERGED, str(merged), str(tmp_path / "ids.safetensors"), str(tmp_path / "out.safetensors")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=ENV)
    assert load.returncode == 0, load.stderr[-3000:]
    merged_error = rel_max_error(load_file(tmp_path / "out.safetensors")["logits"], expected)

    peft_dir = merge.merge(run, tmp_path / "peft", fmt="peft")
    config = json.loads((peft_dir / merge.PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(Path(smollm2_path).resolve())
    peft_error = rel_max_error(peft_logits(peft_dir, ids), expected)
    print(f"{init}: merged {merged_error:.2e}, peft {peft_error:.2e} (fp32 relative max error of the logits)")
    assert merged_error <= FP32_EXPORT and peft_error <= FP32_EXPORT
