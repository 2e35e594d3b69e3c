"""model.quantize: a bitsandbytes base that computes its own function at init, factors from the full-precision weights.

Fast tests on the tiny seeded Llama; the acceptance properties on the real SmolLM2-135M are marked slow.
Everything runs the real bitsandbytes CPU kernels.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import helpers
from helpers import rel_max_error
from milora_cli import adapter, quantize, svd
from milora_cli.evaluation import suite
from milora_cli.training import init_cache
from milora_cli.errors import QuantizeError
from milora_cli.recipe import AdapterConfig, load_recipe, validate
from milora_cli.training.train import train

pytest.importorskip("bitsandbytes", reason="model.quantize needs bitsandbytes: pip install -e '.[quant]'")
bnb = sys.modules["bitsandbytes"]


@pytest.fixture
def factor_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "factors"


def adapted(model_dir: str, quantized: str, cfg: AdapterConfig, use_cache: bool = False):
    """(model, {layer: MiloraLinear}) initialised as `milora train` does it, and the base's logits before injection."""
    model = quantize.load_model(model_dir, "fp32", quantized)
    before = logits(model)
    layers = adapter.inject(model, adapter.find_targets(model, cfg.target_modules), cfg.r, cfg.alpha, 0.0)
    weights = quantize.full_precision_weights(layers, quantized, model_dir, "fp32")
    init_cache.initialise(layers, cfg, seed=0, use_cache=use_cache, weights=weights)
    return model, layers, before


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    return model(input_ids=ids).logits


def factors(layers) -> dict[str, torch.Tensor]:
    return adapter.adapter_tensors(layers)[1]


@pytest.mark.parametrize("quantized,init", [("nf4", "milora"), ("fp4", "pissa"), ("int8", "milora"), ("nf4", "lora")])
def test_a_quantized_base_computes_its_own_function_at_init(tiny64_model_dir, factor_cache, quantized, init):
    cfg = AdapterConfig(init=init, r=4, target_modules="all-linear")
    model, layers, before = adapted(tiny64_model_dir, quantized, cfg)
    kind = bnb.nn.Linear8bitLt if quantized == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(layer.base_layer, kind) for layer in layers.values())
    assert torch.equal(logits(model), before)  # bit for bit: the correction is exactly zero
    assert all(layer.lora_A.weight.dtype == layer.lora_A0.dtype == torch.float32 for layer in layers.values())
    model.train()
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"{name}.lora_{part}.weight" for name in layers for part in "AB"}


def test_gradients_reach_through_the_quantized_base_after_an_eval_forward(tiny64_model_dir):
    """bitsandbytes' CPU inference layout has no backward; a held-out score before training must not switch to it."""
    def input_gradient(eval_first: bool) -> torch.Tensor:
        model = quantize.load_model(tiny64_model_dir, "fp32", "nf4")
        if eval_first:
            logits(model)
        embeds = model.get_input_embeddings()(torch.tensor([[5, 6, 7, 8]])).detach().requires_grad_(True)
        model.train()(inputs_embeds=embeds).logits.square().sum().backward()
        return embeds.grad

    assert torch.equal(input_gradient(eval_first=True), input_gradient(eval_first=False))


def test_the_factors_come_from_the_full_precision_weights_and_share_the_cache(tiny64_model_dir, factor_cache):
    cfg = AdapterConfig(init="milora", r=4, target_modules="all-linear")
    _, plain, _ = adapted(tiny64_model_dir, "none", cfg, use_cache=True)
    _, nf4, _ = adapted(tiny64_model_dir, "nf4", cfg, use_cache=True)
    assert len(list(factor_cache.glob("*.safetensors"))) == len(plain)  # one cache entry per layer serves both
    for key, value in factors(plain).items():
        assert torch.equal(factors(nf4)[key], value)
    # what decomposing the dequantized 4-bit weight would give instead: other minor components
    layer = next(iter(nf4.values()))
    dequantized = bnb.functional.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    noisy_A, _ = adapter.initial_factors(layer, "milora", "float64", "svd", weight=dequantized)
    assert rel_max_error(noisy_A.abs(), layer.lora_A0.abs()) > 1e-2


def test_refusals_come_before_anything_loads(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: /nonexistent/model, quantize: nf4, dtype: fp16}\ndata: {builtin: quickstart}\n")
    result = helpers.milora("train", str(recipe), f"output.dir={tmp_path / 'out'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "model.dtype=fp16 on a CPU" in result.stderr  # not the missing model
    with pytest.raises(QuantizeError, match="with train.distributed=fsdp: milora does not shard"):  # a real launch: test_sharded_load.py
        quantize.check("nf4", "bf16", "cuda", distributed="fsdp")
    quantize.check("nf4", "bf16", "cpu", distributed="ddp")  # bf16 compute runs on CPU, DDP too
    quantize.check("none", "fp16", "cpu", distributed="fsdp")  # nothing to refuse without quantization
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # how Python marks a module as not importable
    with pytest.raises(QuantizeError, match=r"needs bitsandbytes.*milora\[quant\]"):
        quantize.check("int8", "fp32", "cpu")


def test_an_already_quantized_checkpoint_is_refused(tmp_path):
    """A checkpoint stored in 4 bits (bitsandbytes packs two weights a byte) has no full-precision weights to decompose."""
    (tmp_path / "prequantized").mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(1024, 1, dtype=torch.uint8)}, tmp_path / "prequantized" / "model.safetensors")
    layer = adapter.MiloraLinear(torch.nn.Linear(32, 64, bias=False), 4, 4.0, 0.0)
    with pytest.raises(QuantizeError, match=r"U8 of shape \[1024, 1\] \(expected floats of shape \[64, 32\]\)"):
        quantize.full_precision_weights({"model.layers.0.mlp.up_proj": layer}, "nf4", str(tmp_path / "prequantized"), "fp32")


def test_the_nf4_recipe_is_the_paper_recipe_on_a_4_bit_base():
    """The same training, on a 4-bit base with activations recomputed: what fits 16 GB (benchmarks/llama3_memory.py)."""
    nf4, bf16 = (load_recipe(helpers.REPO / "recipes" / f"commonsense_llama3{tail}.yaml") for tail in ("_nf4", ""))
    assert (nf4.model.quantize, nf4.model.dtype) == ("nf4", "bf16")
    differences = {(section, key) for section in ("model", "adapter", "data", "train", "output", "eval")
                   for key, value in getattr(nf4, section) if getattr(getattr(bf16, section), key) != value}
    assert differences == {("model", "quantize"), ("train", "gradient_checkpointing"), ("output", "dir")}


def tiny_nf4_recipe(model_dir: str, data: str, out: Path, **train_overrides) -> dict:
    return {"model": {"name_or_path": model_dir, "quantize": "nf4"},
            "adapter": {"r": 4, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"path": data, "val_size": 0, "max_length": 64},
            "train": {"max_steps": 3, "lr": 1e-2, "warmup_steps": 0, "micro_batch_size": 4, "eval_every": None, **train_overrides},
            "output": {"dir": str(out)}}


@pytest.fixture(scope="module")
def tiny_nf4_run(tmp_path_factory, tiny64_model_dir, tiny_data) -> Path:
    out = tmp_path_factory.mktemp("nf4-run") / "run"
    train(validate(tiny_nf4_recipe(tiny64_model_dir, tiny_data, out)), Console(quiet=True))
    return out


def test_gradient_checkpointing_trains_the_same_adapter_on_a_4_bit_base(tiny_nf4_run, tiny64_model_dir, tiny_data, tmp_path):
    """The nf4 recipe fits 16 GB with checkpointing only (README): it must not change what trains."""
    train(validate(tiny_nf4_recipe(tiny64_model_dir, tiny_data, tmp_path / "ckpt", gradient_checkpointing=True)), Console(quiet=True))
    plain, checkpointed = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (tiny_nf4_run, tmp_path / "ckpt"))
    assert plain.keys() == checkpointed.keys()
    # bitsandbytes computes in float32 at most, so no float64 run here; none is needed: recomputing the forward runs
    # the same kernels on the same inputs in the same process, so the adapters are equal bit for bit.
    assert all(torch.equal(checkpointed[key], plain[key]) for key in plain)


@pytest.mark.slow
def test_two_gloo_processes_train_a_4_bit_base_as_one_process_with_twice_the_batch(tiny64_model_dir, tiny_data, tmp_path):
    """Why several processes are not refused: DDP over a bitsandbytes base trains the same adapter.

    bitsandbytes computes in float32 at most, so this is not a float64 test (test_train's gloo test is); it needs no
    tolerance either. Each of 2 processes runs micro-batches of 2; one process accumulating 2 micro-batches of 2 (the
    same ones, with the same thread count) runs the same kernels on the same inputs; DDP's gradient is then
    (g0 * 2/n) / 2 + (g1 * 2/n) / 2 and the accumulated one g0/n + g1/n: scalings by powers of two, exact, and one
    addition, commutative. So the adapters are equal bit for bit on any CPU. (MKL_CBWR=AUTO,STRICT: MKL's GEMMs give
    the same bits whatever the memory alignment of the two processes' tensors.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "AUTO,STRICT"}
    runs = {}
    for name, world, accumulation in (("two", 2, 1), ("one", 1, 2)):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump(tiny_nf4_recipe(tiny64_model_dir, tiny_data, tmp_path / name, micro_batch_size=2,
                                                         gradient_accumulation_steps=accumulation)))
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if world > 1 else []
        result = subprocess.run([sys.executable, *launcher, "-m", "milora_cli", "train", str(recipe)], capture_output=True, text=True,
                                timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")
    assert runs["one"].keys() == runs["two"].keys()
    assert all(torch.equal(runs["two"][key], runs["one"][key]) for key in runs["one"])


def test_eval_scores_a_run_as_trained_on_its_quantized_base(tiny_nf4_run):
    model, _, identity = suite.load(str(tiny_nf4_run), None, "cpu", Console(quiet=True))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and "nf4, fp32 compute" in identity
    plain, _, identity = suite.load(str(tiny_nf4_run), None, "cpu", Console(quiet=True), quantized="none")
    assert type(plain.get_submodule("model.layers.0.self_attn.q_proj").base_layer) is torch.nn.Linear and "[fp32]" in identity


def test_merge_goes_onto_the_original_base_and_says_so(tiny_nf4_run, tiny64_model_dir, tmp_path):
    result = helpers.milora("merge", "--adapter", str(tiny_nf4_run), "--output", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert "nf4 base" in result.stdout and "full-precision weights" in result.stdout and "warning" not in result.stdout
    assert_merged_is_base_plus_delta(tmp_path / "merged", tiny_nf4_run / "adapter", tiny64_model_dir)


def assert_merged_is_base_plus_delta(merged: Path, adapter_dir: Path, base: str) -> None:
    """The merged folder loads in transformers and holds W + s (B A - B0 A0) for every adapted W, W elsewhere."""
    meta = json.loads((adapter_dir / "adapter_meta.json").read_text())
    trained, initial = load_file(adapter_dir / "adapter_model.safetensors"), load_file(adapter_dir / "adapter_init.safetensors")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).state_dict()
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    moved = 0
    for layer in meta["target_modules"]:
        A, B = trained[f"{layer}.lora_A.weight"].double(), trained[f"{layer}.lora_B.weight"].double()
        A0, B0 = initial[f"{layer}.lora_A.weight"].double(), initial[f"{layer}.lora_B.weight"].double()
        expected = original[f"{layer}.weight"].double() + meta["scaling"] * (B @ A - B0 @ A0)
        # float32 W + (B A - B0 A0) in one GEMM over 2r terms, then rounded once: 2^-24 of |W'| plus ~2r 2^-24 of the
        # products, which are far below |W| for minor components: < 1e-6 of the largest weight.
        assert rel_max_error(model[f"{layer}.weight"], expected) < 1e-6
        moved += not torch.equal(model[f"{layer}.weight"], original[f"{layer}.weight"])
    assert moved == len(meta["target_modules"])  # training moved every adapted weight
    assert torch.equal(model["model.norm.weight"], original["model.norm.weight"])


SMOL_TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.v_proj", "model.layers.15.mlp.up_proj",
                "model.layers.29.mlp.down_proj"]


@pytest.mark.slow
def test_smollm2_nf4_logits_and_factors_at_init(smollm2_path, factor_cache):
    cfg = AdapterConfig(init="milora", r=8, target_modules=SMOL_TARGETS)
    model, nf4, before = adapted(smollm2_path, "nf4", cfg)
    assert torch.equal(logits(model), before)  # the 4-bit base's logits, bit for bit
    del model
    _, plain, _ = adapted(smollm2_path, "none", cfg)
    for key, value in factors(plain).items():
        assert (factors(nf4)[key] - value).abs().max().item() <= 1e-6
    # Why: the minor subspace of the dequantized 4-bit weight is another one (0.10 of overlap here, 8/576 at random)
    q_proj = nf4[SMOL_TARGETS[0]].base_layer
    dequantized = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    minor = (svd.components_of(w.double(), 8, "minor", "float64", "svd").Vh for w in (dequantized, plain[SMOL_TARGETS[0]].base_layer.weight))
    assert torch.linalg.matrix_norm(next(minor) @ next(minor).T).square().item() / 8 < 0.5


@pytest.mark.slow
def test_smollm2_nf4_trains_and_merges_onto_the_original_base(smollm2_path, tmp_path):
    """The quickstart recipe's adapter (its factors cached by an unquantized quickstart run serve this one too)."""
    run = tmp_path / "run"
    overrides = ["model.quantize=nf4", "train.max_steps=5", "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=null",
                 "train.warmup_steps=0", "data.max_length=48", "eval.heldout=0", f"output.dir={run}"]
    result = helpers.milora("train", "recipes/quickstart.yaml", *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 5 and max(losses[-2:]) < losses[0]  # the prompt format is learnt within a few steps
    result = helpers.milora("merge", "--adapter", str(run), "--output", str(tmp_path / "merged"))
    assert result.returncode == 0 and "full-precision weights" in result.stdout, result.stderr
    assert_merged_is_base_plus_delta(tmp_path / "merged", run / "adapter", smollm2_path)
