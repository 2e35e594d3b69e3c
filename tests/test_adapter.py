"""The adapter layer on a tiny seeded Llama: exact at init, trainable parts, merge, PEFT's forward."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import EXACT_FP64, rel_max_error
from milora_cli import adapter, models
from milora_cli.errors import ModelError

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).to(dtype).eval()
    if dtype == torch.float64:
        models.float64_norms(model)  # as models.load_model does for fp64
    return model


def adapted(init: str, dtype=torch.float32, r: int = 4, alpha: float = 4.0, dropout: float = 0.0):
    model = tiny_llama(dtype)
    layers = adapter.inject(model, adapter.find_targets(model, TARGETS), r, alpha, dropout)
    adapter.initialise(layers, init, "float64", "gram", seed=0)
    return model, layers


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (3, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["milora", "pissa", "lora", "mica"])
def test_fp32_logits_at_init_equal_the_base_model(init):
    x = tokens()
    base = tiny_llama()(x).logits
    model, _ = adapted(init)
    assert torch.equal(model(x).logits, base)  # the correction B A x - B0 A0 x is exactly 0, as in bf16


@pytest.mark.parametrize("init", ["milora", "pissa", "lora", "mica"])
def test_bf16_logits_at_init_are_bit_identical(init):
    """bf16 base: the correction form computes B A x - B0 A0 x from equal values, so it is exactly 0."""
    x = tokens()
    base = tiny_llama(torch.bfloat16)(x).logits
    model, _ = adapted(init, torch.bfloat16)
    assert torch.equal(model(x).logits, base)


def test_under_autocast_the_adapter_path_stays_in_the_activation_dtype():
    """bf16 base under bf16 autocast: no fp32 copy of the input or fp32 dropout mask per adapted layer, and
    the logits at init are still the base's bit for bit. (CPU autocast; on CUDA the same branch runs, with
    torch's fused dropout, which this machine cannot run.)"""
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = tiny_llama(torch.bfloat16)(x).logits
        model, layers = adapted("milora", torch.bfloat16, dropout=0.1)
        assert torch.equal(model.eval()(x).logits, base)
        seen = []
        hooks = [layer.lora_A.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype)) for layer in layers.values()]
        model.train()
        model(x).logits.float().sum().backward()
    for hook in hooks:
        hook.remove()
    assert seen == [torch.bfloat16] * len(layers)  # the dropout's output too: its mask is bf16, not fp32


def test_bf16_residual_form_would_not_be_exact():
    """Why we keep W and a correction: W_res = W - s B0 A0 rounded to bf16 moves the logits (the floor)."""
    x = tokens()
    base = tiny_llama(torch.bfloat16)
    reference = base(x).logits
    model, layers = adapted("milora", torch.bfloat16)
    with torch.no_grad():
        for name, layer in layers.items():
            w_res = (layer.base_layer.weight.double() - layer.scaling * (layer.lora_B0 @ layer.lora_A0).double())
            rounded = w_res.to(torch.bfloat16).double() + layer.scaling * (layer.lora_B0 @ layer.lora_A0).double()
            base.get_submodule(name).weight.copy_(rounded.to(torch.bfloat16))
    assert rel_max_error(base(x).logits, reference) > 1e-4


@pytest.mark.parametrize("init", ["milora", "mica"])
def test_only_adapter_factors_receive_gradients(init):
    """milora: A and B train; mica: A only (B stays the frozen minor singular vectors, as in PEFT)."""
    model, layers = adapted(init, dropout=0.1)
    model.train()
    model(tokens(), labels=tokens()).loss.backward()
    trained = ("lora_A.weight",) if init == "mica" else ("lora_A.weight", "lora_B.weight")
    for name, param in model.named_parameters():
        is_factor = name.endswith(trained)
        assert param.requires_grad == is_factor, name
        assert (param.grad is not None) == is_factor, name
    assert all(not buffer.requires_grad for name, buffer in model.named_buffers() if "lora_" in name)
    trainable, total = adapter.count_parameters(model)
    per_layer = [layer.lora_A.in_features + (layer.lora_B.out_features if init != "mica" else 0) for layer in layers.values()]
    assert trainable == 4 * sum(per_layer)


def test_input_dropout_zeroes_p_and_scales_the_rest_like_torch():
    drop = adapter.InputDropout(0.2)
    x = torch.rand(401, 499, dtype=torch.float64) + 0.5  # not a multiple of 4 elements: the last 64-bit draw is cut
    torch.manual_seed(0)
    y = drop.train()(x)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - 0.2) < 0.005  # 200,000 draws: 4.4 standard errors
    assert torch.allclose(y[y != 0], (x / 0.8)[y != 0], rtol=1e-4) and y.dtype == x.dtype  # p to 2^-16: 1/0.8 within 2.4e-5
    assert abs(y.mean().item() - x.mean().item()) < 0.01  # unbiased, as nn.Dropout
    x.requires_grad_(True)
    z = drop(x)
    z.sum().backward()
    z = z.detach()
    scale = (z[z != 0][0] / x[z != 0][0]).item()
    assert torch.equal(x.grad, (z != 0).double() * scale)  # gradient through the kept entries only
    assert drop.eval()(x) is x


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_input_dropout_keeps_each_element_independently_with_probability_1_minus_p(p):
    """Every one of the four 16-bit lanes of a 64-bit draw drops at rate p (a lane's high bit, or a
    biased draw, would show here), and the kept values are scaled so that the mean is unchanged."""
    drop = adapter.InputDropout(p).train()
    torch.manual_seed(1)
    y = drop(torch.ones(1000, 400))  # 100,000 elements in each lane
    lanes = (y == 0).double().view(-1, 4).mean(0)
    assert (lanes - p).abs().max().item() < 5 * (p * (1 - p) / 100_000) ** 0.5
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, kept[0].item())) and abs(kept[0].item() * (1 - p) - 1) < 2**-15
    assert y.to(torch.bfloat16).dtype == torch.bfloat16 and drop(torch.ones(7, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


def perturb(layers: dict, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.weight.add_(0.05 * torch.randn(layer.lora_A.weight.shape, generator=generator))
            layer.lora_B.weight.add_(0.05 * torch.randn(layer.lora_B.weight.shape, generator=generator))


@pytest.mark.parametrize("init", ["milora", "pissa", "lora", "mica"])
def test_merged_weights_give_the_adapted_forward(init):
    """Equal in exact arithmetic: tested in float64 (helpers.EXACT_FP64)."""
    x = tokens()
    model, layers = adapted(init, torch.float64)
    perturb(layers)
    expected = model(x).logits
    merged = tiny_llama(torch.float64)
    with torch.no_grad():
        for name, layer in layers.items():
            merged.get_submodule(name).weight.add_(layer.delta_weight())
    assert rel_max_error(merged(x).logits, expected) <= EXACT_FP64


def test_lora_forward_matches_peft():
    peft = pytest.importorskip("peft")
    x = tokens()
    model, layers = adapted("lora", torch.float64, r=4, alpha=8.0)  # the same math in another order: float64
    perturb(layers)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=True)
    reference = peft.get_peft_model(tiny_llama(torch.float64), config)
    with torch.no_grad():
        for name, layer in layers.items():
            target = reference.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A.weight)
            target.lora_B["default"].weight.copy_(layer.lora_B.weight)
    assert reference.base_model.model.get_submodule(f"model.layers.0.self_attn.{TARGETS[0]}").lora_A["default"].weight.dtype == torch.float64
    assert rel_max_error(model(x).logits, reference(x).logits) <= EXACT_FP64


def smollm2_layer0(smollm2_path: str) -> torch.nn.Module:
    """Four real SmolLM2-135M layer-0 projections, square-free shapes both ways (192x576, 1536x576, 576x1536)."""
    from safetensors import safe_open

    names = {"k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}
    holder = torch.nn.Module()
    with safe_open(f"{smollm2_path}/model.safetensors", "pt") as weights:
        for short, name in names.items():
            weight = weights.get_tensor(f"model.layers.0.{name}.weight").float()
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            linear.weight.data.copy_(weight)
            setattr(holder, short, linear)
    return holder


def test_mica_factors_are_peft_mica(smollm2_path):
    """PEFT's init_lora_weights="mica" (peft/tuners/lora/layer.py, LoraLayer.mica_init): torch.linalg.svd of
    the float32 weight, lora_B = U[:, -r:] (no singular values), lora_A = 0, the base weight untouched."""
    peft = pytest.importorskip("peft")
    r = 8
    reference = peft.get_peft_model(smollm2_layer0(smollm2_path), peft.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["k_proj", "v_proj", "up_proj", "down_proj"], init_lora_weights="mica"))
    for driver, dtype in (("svd", "float32"), ("gram", "float64")):
        holder = smollm2_layer0(smollm2_path)
        layers = adapter.inject(holder, ["k_proj", "v_proj", "up_proj", "down_proj"], r, 2.0 * r, 0.0)
        adapter.initialise(layers, "mica", dtype, driver, seed=0)
        for name, layer in layers.items():
            theirs = reference.base_model.model.get_submodule(name)
            weight = theirs.base_layer.weight.detach()
            assert torch.equal(layer.base_layer.weight, weight)  # neither modifies the base
            assert not layer.lora_A0.any() and not theirs.lora_A["default"].weight.any()
            B_peft = theirs.lora_B["default"].weight.detach()
            if driver == "svd":  # the same LAPACK call on the same float32 weight: the same bits, signs included
                assert torch.equal(layer.lora_B0, B_peft), name
                continue
            # milora's default (float64 Gram eigh) against PEFT's float32 SVD: the same subspace up to the float32
            # SVD's error. Wedin: ||P - P'||_2 <= ||E||_2 / gap, gap = S_(k-r) - S_(k-r+1) between the kept block and
            # the rest (float64 spectrum), ||E||_2 <= min(out, in) eps32 S_max (LAPACK's backward error, generously).
            S = torch.linalg.svdvals(weight.double())
            k = S.numel()
            bound = min(weight.shape) * 2**-24 * S[0] / (S[k - r - 1] - S[k - r])
            ours, peft_B = layer.lora_B0.double(), B_peft.double()
            error = torch.linalg.matrix_norm(ours @ ours.T - peft_B @ peft_B.T, ord=2)
            assert bound < 0.05 and error <= bound, (name, float(error), float(bound))


def test_mica_trains_the_parameters_peft_trains():
    """The same trainable set as get_peft_model(init_lora_weights="mica"): every lora_A, no lora_B."""
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica"))
    theirs = {name.removeprefix("base_model.model.").replace(".default", "") for name, p in reference.named_parameters() if p.requires_grad}
    model, _ = adapted("mica")
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ours == theirs and all(name.endswith("lora_A.weight") for name in ours) and len(ours) == 2 * len(TARGETS)


def test_adapter_tensors_round_trip():
    model, layers = adapted("milora")
    perturb(layers)
    trained, initial = adapter.adapter_tensors(layers)
    fresh_model, fresh = adapted("lora")
    adapter.load_adapter_tensors(fresh, trained, initial)
    x = tokens()
    assert torch.equal(fresh_model(x).logits, model(x).logits)
    with pytest.raises(ModelError, match="first difference"):
        adapter.load_adapter_tensors(fresh, {k: v for k, v in trained.items() if "q_proj" not in k}, initial)


def test_target_errors_name_the_model_layers():
    model = tiny_llama()
    with pytest.raises(ModelError, match="'q_prj' matched no linear layer.*q_proj"):
        adapter.find_targets(model, ["q_prj"])
    every = adapter.find_targets(model, "all-linear")
    assert "lm_head" not in every and len(every) == 2 * 7
    assert adapter.find_targets(model, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]


def test_rank_larger_than_the_layer_is_refused():
    model = tiny_llama()
    with pytest.raises(ModelError, match="adapter.r=64"):
        adapter.inject(model, adapter.find_targets(model, ["k_proj"]), 64, 64.0, 0.0)
