"""Exports that serve as they are: vLLM's and SGLang's rules for a PEFT LoRA, and `merge --rank K` compression.

The rules below are written from the engines' sources (read through the project's code search, not imported:
neither engine runs here), each function citing the file it follows. The exactness claims are tested in
float64: the export is written with float64 factors (merge's internal dtype table has it) and PEFT runs on a
float64 base.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from milora_cli import adapter_folder, merge, serving, svd
from test_export import short_run, token_ids

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] (the --max-lora-rank values)
VLLM_ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LLAMA_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# sglang/srt/lora/utils.py: get_normalized_target_modules' params_mapping, and _KNOWN_LORA_TARGET_MODULES (Llama's part)
SGLANG_NORMALIZED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
SGLANG_KNOWN = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def vllm_refusals(config: dict, keys: list[str], max_lora_rank: int) -> list[str]:
    """Why vLLM would refuse to load this adapter with `--max-lora-rank max_lora_rank` (empty: it loads).

    vllm/lora/peft_helper.py: PEFTHelper (required r, lora_alpha, target_modules), _validate_features,
    _init_is_supported and validate_legal; vllm/lora/lora_model.py: check_unexpected_modules, which takes the
    module names from the safetensors keys (parse_fine_tuned_lora_name) and checks their last part.
    """
    errors = []
    if max_lora_rank not in VLLM_ALLOWED_MAX_LORA_RANKS:
        errors.append(f"--max-lora-rank {max_lora_rank} is not one of {VLLM_ALLOWED_MAX_LORA_RANKS}")
    errors += [f"missing {name}" for name in ("r", "lora_alpha", "target_modules") if name not in config]
    if max([config["r"], *(config.get("rank_pattern") or {}).values()]) > max_lora_rank:
        errors.append(f"LoRA rank {config['r']} is greater than max_lora_rank {max_lora_rank}.")
    if config.get("bias", "none") != "none":
        errors.append("Adapter bias is not supported.")
    if [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]:
        errors.append("vLLM only supports modules_to_save being either None or [classifier, score]")
    for flag, message in (("use_dora", "DoRA"), ("lora_bias", "lora_bias"), ("alora_invocation_tokens", "aLoRA"),
                          ("layer_replication", "layer_replication"), ("use_bdlora", "BD-LoRA"), ("use_qalora", "QALoRA")):
        if config.get(flag):
            errors.append(f"vLLM does not support {message}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        errors.append(f"vLLM does not support init_lora_weights={init!r}")
    for key in keys:
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_[AB]\.weight", key)
        if match is None or match[1].rsplit(".", 1)[-1] not in LLAMA_PROJECTIONS:
            errors.append(f"unexpected module {key}")
    return errors


def sglang_refusals(config: dict) -> list[str]:
    """Why SGLang would refuse this adapter's config (empty: it loads).

    sglang/srt/lora/lora_config.py (r, lora_alpha, target_modules read as keys), sglang/srt/lora/lora.py (asserts
    peft_type is "lora"), sglang/srt/lora/utils.py get_normalized_target_modules: a string must be "all" or
    "all-linear" ("Only 'all' or 'all-linear' can be used as the string for target module"); a list is mapped
    by each name's last part onto the modules SGLang's LoRA layers support.
    """
    errors = [f"missing {name}" for name in ("r", "lora_alpha", "target_modules") if name not in config]
    if config.get("peft_type", "").lower() != "lora":
        errors.append("peft_type is not LORA")
    targets = config["target_modules"]
    if isinstance(targets, str):
        if targets not in ("all", "all-linear"):
            errors.append("Only 'all' or 'all-linear' can be used as the string for target module")
        return errors
    normalized = {SGLANG_NORMALIZED.get(name.split(".")[-1], name.split(".")[-1]) for name in targets}
    errors += [f"unsupported target module {name}" for name in sorted(normalized - SGLANG_KNOWN)]
    return errors


def printed_max_lora_rank(text: str) -> int:
    return int(re.search(r"--max-lora-rank (\d+)", text)[1])


def exported(run: Path, out: Path, rank: int | None = None) -> tuple[Path, str, dict, dict[str, torch.Tensor]]:
    """A float64 PEFT export of `run`: (folder, what merge printed, adapter_config.json, weights)."""
    console = Console(record=True, width=400)
    folder = merge.merge(run, out, fmt="peft", dtype="float64", rank=rank, console=console)
    config = json.loads((folder / merge.PEFT_CONFIG).read_text())
    return folder, console.export_text(), config, load_file(folder / merge.PEFT_WEIGHTS)


@torch.no_grad()
def float64_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def merged_float64(run: Path):
    """The trained model in float64: the base with W + s (B A - B0 A0) (the definition of what was trained)."""
    found = adapter_folder.read_adapter(run / "adapter")
    model = AutoModelForCausalLM.from_pretrained(found.meta["base_model_path"], dtype=torch.float64).eval()
    with torch.no_grad():
        for layer in found.layers:
            model.get_submodule(layer).weight += found.delta(layer, torch.float64)
    return model, found


def peft_float64(folder: Path):
    from peft import PeftModel

    config = json.loads((folder / merge.PEFT_CONFIG).read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float64)
    return PeftModel.from_pretrained(base, folder).eval()


def written_delta(config: dict, weights: dict[str, torch.Tensor], layer: str) -> torch.Tensor:
    """dW as the export states it: lora_alpha / r * B A, float64."""
    key = "base_model.model." + layer
    return config["lora_alpha"] / config["r"] * (weights[f"{key}.lora_B.weight"].double() @ weights[f"{key}.lora_A.weight"].double())


def factor_size(found: adapter_folder.Adapter, layer: str) -> float:
    """s ||B'||_F ||A'||_F of the export's rank-2r factors: the scale of a float64 computation's rounding of dW."""
    B, A = found.stacked(layer)
    return found.meta["scaling"] * float(torch.linalg.norm(B.double())) * float(torch.linalg.norm(A.double()))


# float64 forwards of the same 2-layer model that differ only in where roundings fall (W + dW merged, against W x
# + s B (A x) in PEFT): each matmul of inner length n <= 64 is within n eps64 ~ 1.4e-14 of exact, relative.
# 1e-10 on the logits leaves four orders of magnitude for the few layers they pass through.
FLOAT64_LOGITS = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def milora_run(tiny_model_dir, tiny_data, tmp_path_factory) -> Path:
    return short_run(tiny_model_dir, tiny_data, tmp_path_factory.mktemp("serving") / "milora", "milora", 4, "all-linear", 5e-2)


def test_vllm_rank_is_the_smallest_allowed_value_at_least_the_rank():
    for rank, expected in ((1, 1), (2, 8), (8, 8), (9, 16), (33, 64), (64, 64), (257, 320), (321, 512), (512, 512), (513, None)):
        assert serving.vllm_max_lora_rank(rank) == expected
    text = "\n".join(serving.describe({"peft_r": 640, "base_model": "BASE"}, "out/peft"))
    assert "above vLLM's largest --max-lora-rank (512)" in text and "--rank 512" in text


def test_a_milora_export_meets_vllm_and_sglang_rules_and_equals_the_trained_model_in_peft(milora_run, tmp_path):
    model, found = merged_float64(milora_run)
    ids = token_ids(model.config.vocab_size)
    expected = float64_logits(model, ids)
    folder, text, config, weights = exported(milora_run, tmp_path / "peft")
    assert config["r"] == 8 and isinstance(config["target_modules"], list)  # rank 2r
    flag = printed_max_lora_rank(text)
    assert flag == 8 and f"vllm serve {found.meta['base_model_path']} --enable-lora --lora-modules NAME={folder}" in text
    assert vllm_refusals(config, list(weights), flag) == [] and sglang_refusals(config) == []
    assert vllm_refusals(config, list(weights), 1) != []  # the next smaller allowed value is refused: the rule can fail
    assert "--max-lora-rank 8" in (folder / "README.md").read_text()
    assert rel(float64_logits(peft_float64(folder), ids), expected) <= FLOAT64_LOGITS


def test_rank_2r_or_more_is_the_uncompressed_export(milora_run, tmp_path):
    _, _, _, full = exported(milora_run, tmp_path / "full")
    found = adapter_folder.read_adapter(milora_run / "adapter")
    ids = token_ids(1000)
    reference = float64_logits(peft_float64(tmp_path / "full"), ids)
    for rank in (8, 100):  # 100 > 2r = 8: written at 8, every component kept
        folder, text, config, weights = exported(milora_run, tmp_path / f"k{rank}", rank=rank)
        assert config["r"] == 8 and config["lora_alpha"] == 8 and printed_max_lora_rank(text) == 8
        for layer in found.layers:
            exact = found.delta(layer, torch.float64)
            # QR and SVD are backward stable: the recomposed product is within a small multiple of eps64 times the
            # factors' size s ||B'||_F ||A'||_F (which may exceed ||dW||: B A and B0 A0 nearly cancel early in
            # training); 1000 eps64 covers the constant for these 8-column factors.
            assert torch.linalg.norm(written_delta(config, weights, layer) - exact) <= 1000 * 2**-52 * factor_size(found, layer)
        compression = json.loads((folder / merge.PROVENANCE_FILE).read_text())["compression"]
        assert compression["relative_error"] <= 1e-15  # no component dropped: only rounding in the singular values
        assert rel(float64_logits(peft_float64(folder), ids), reference) <= FLOAT64_LOGITS


def test_a_lower_rank_prints_the_error_it_has(milora_run, tmp_path):
    found = adapter_folder.read_adapter(milora_run / "adapter")
    folder, text, config, weights = exported(milora_run, tmp_path / "k3", rank=3)
    assert config["r"] == 3 and config["lora_alpha"] == 3 * found.meta["scaling"] and printed_max_lora_rank(text) == 8
    assert vllm_refusals(config, list(weights), 8) == [] and sglang_refusals(config) == []
    measured, dropped, energy = {}, 0.0, 0.0
    for layer in found.layers:
        exact = found.delta(layer, torch.float64)
        difference = float(torch.linalg.norm(written_delta(config, weights, layer) - exact)) ** 2
        measured[layer] = math.sqrt(difference / float(torch.linalg.norm(exact)) ** 2)
        dropped, energy = dropped + difference, energy + float(torch.linalg.norm(exact)) ** 2
    overall = math.sqrt(dropped / energy)
    assert overall > 1e-3  # rank 3 of a rank-8 update drops something: the comparison below can fail
    compression = json.loads((folder / merge.PROVENANCE_FILE).read_text())["compression"]
    # Eckart-Young: the error of the best rank-3 approximation is exactly that of the dropped singular values. Both
    # sides are float64 computations of it, each within a small multiple of eps64 s ||B'||_F ||A'||_F of exact
    # (backward-stable QR and SVD); relative to ||dW|| that is 1000 eps64 times the layer's factor size / ||dW||.
    slack = {layer: 1000 * 2**-52 * factor_size(found, layer) / float(torch.linalg.norm(found.delta(layer, torch.float64)))
             for layer in found.layers}
    assert max(slack.values()) < 1e-6  # the bound is tight enough to tell a wrong error from a right one
    assert abs(compression["relative_error"] - overall) <= max(slack.values())
    assert all(abs(compression["relative_error_per_layer"][layer] - measured[layer]) <= slack[layer] for layer in found.layers)
    worst = max(measured, key=measured.__getitem__)
    line = next(line for line in text.splitlines() if "compressed to rank 3" in line)
    numbers = [float(value) / 100 for value in re.findall(r"([\d.e+-]+)%", line)]
    assert worst in line and len(numbers) == 2
    # printed to 3 significant digits: within half a unit of the third digit
    assert abs(numbers[0] - overall) <= 5e-3 * overall and abs(numbers[1] - measured[worst]) <= 5e-3 * measured[worst]
    model, _ = merged_float64(milora_run)
    ids = token_ids(model.config.vocab_size)
    assert rel(float64_logits(peft_float64(folder), ids), float64_logits(model, ids)) > FLOAT64_LOGITS  # it is another model


def test_one_adapted_layer_exports_a_list_of_full_names_that_peft_and_sglang_read(tiny_model_dir, tiny_data, tmp_path):
    """Leaf names would make PEFT adapt every q_proj: the export lists the adapted layer's full name instead."""
    layer = "model.layers.1.self_attn.q_proj"
    run = short_run(tiny_model_dir, tiny_data, tmp_path / "run", "milora", 4, [layer], 5e-2)
    folder, text, config, weights = exported(run, tmp_path / "peft")
    assert config["target_modules"] == [layer]
    assert vllm_refusals(config, list(weights), printed_max_lora_rank(text)) == [] and sglang_refusals(config) == []
    peft_model = peft_float64(folder)
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert adapted == ["base_model.model." + layer]
    model, _ = merged_float64(run)
    ids = token_ids(model.config.vocab_size)
    assert rel(float64_logits(peft_model, ids), float64_logits(model, ids)) <= FLOAT64_LOGITS


def test_truncate_product_is_the_best_approximation_in_float64():
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(40, 8, generator=generator, dtype=torch.float64), torch.randn(8, 30, generator=generator, dtype=torch.float64)
    product = B @ A
    S_direct = torch.linalg.svdvals(product)[:8]
    for k in (3, 8, 12):
        B_k, A_k, S = svd.truncate_product(B, A, k)
        assert B_k.shape == (40, k) and A_k.shape == (k, 30)
        # the singular values of B A, to the SVD's backward error (a small multiple of eps64 S_max)
        assert torch.allclose(S, S_direct, rtol=0, atol=1000 * 2**-52 * float(S_direct[0]))
        error = torch.linalg.norm(product - B_k @ A_k)
        assert abs(float(error) - float(S_direct[k:].square().sum().sqrt())) <= 1000 * 2**-52 * float(torch.linalg.norm(product))


def test_rank_without_format_peft_is_refused(milora_run, tmp_path):
    with pytest.raises(merge.ExportError, match="--rank 3 sets the rank of a PEFT LoRA; add --format peft"):
        merge.merge(milora_run, tmp_path / "m", rank=3)
    assert not (tmp_path / "m").exists()
