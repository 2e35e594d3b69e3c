"""The adapter layer, its injection into a model, and the initialisation of its factors.

Every adapted linear layer computes

    y = W x + s * B A dropout(x) - s * B0 A0 x          s = lora_alpha / r

W is the untouched pretrained weight, A and B train, and A0, B0 are frozen copies of their initial
values. At initialisation B A == B0 A0 bit for bit, so the correction is exactly zero and the model
computes the base model's function in any dtype. This is the same model as the residual form
W_res = W - s B0 A0 (MILORA.md) with the same gradients, without rounding W_res to bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from milora_cli import adapter_folder, dtensor, dtypes, svd
from milora_cli.errors import ModelError
from milora_cli.recipe import Init, SvdDriver, SvdDtype

ALL_LINEAR = "all-linear"
_SVD_COMPONENTS: dict[str, svd.Components] = {"milora": "minor", "pissa": "principal"}
# Inits whose B stays B0: MiCA trains A only (PEFT's MiCALinearVariant registers lora_B as frozen).
FROZEN_B: frozenset[str] = frozenset({"mica"})


class InputDropout(nn.Module):
    """Dropout as nn.Dropout (zero with probability p, scale the rest by 1/(1-p)), 2-3x faster on CPU.

    torch's CPU dropout draws one random number per element (bernoulli_; a uniform draw is barely
    cheaper), which costs about as much as the q_proj matmul it feeds. Here one 64-bit draw makes the
    mask of four elements: each keeps its input when its 16 bits are at least p * 2^16. So p is taken to
    the nearest multiple of 2^-16 (0.05 -> 0.0500031) and the kept values scale by 1/(1 - that p): still
    unbiased, as nn.Dropout is.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._drop = min(round(p * 2**16), 2**16 - 1)  # of the 2^16 values of an element's 16 bits, those that drop it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if x.is_cuda:  # CUDA's fused dropout keeps a 1-byte mask for backward, not one of x's dtype
            return nn.functional.dropout(x, self.p, training=True)
        return x * self._mask(x)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        """0 or 1/(1 - p) for each element of x, in x's dtype."""
        words = torch.empty(-(-x.numel() // 4), dtype=torch.int64).random_(-(2**63), 2**63 - 1)  # 64 random bits each
        bits = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform on -2^15 .. 2^15 - 1
        # Kept where bits >= threshold: bits - threshold + 1/2 is then >= 1/2, else <= -1/2; clamped to [0, 1/2] and
        # doubled, 1 or 0, all exact (small integers and halves) in float32, which x's bf16 would not hold.
        threshold = -(2**15) + self._drop
        scale = 2**16 / (2**16 - self._drop)
        exact = torch.promote_types(x.dtype, torch.float32)
        return bits.to(exact).sub_(threshold - 0.5).clamp_(0.0, 0.5).mul_(2.0 * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class InitialFactors(nn.Module):
    """The frozen A0 (r, in) and B0 (out, r), and the correction B0 A0 h they compute.

    Parameters that never train (requires_grad=False), not buffers: FSDP shards parameters only, so under
    fsdp they are a unit of their own (distributed.shard), gathered by calling this module.
    """

    def __init__(self, r: int, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.A0 = nn.Parameter(torch.zeros(r, in_features, device=device, dtype=dtype), requires_grad=False)
        self.B0 = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype), requires_grad=False)
        self._cast = None  # (key, A0, B0) in the autocast dtype: see cast

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lora_A0, lora_B0 = self.cast(h.device.type)
        return nn.functional.linear(nn.functional.linear(h, lora_A0), lora_B0)  # (..., r) then (..., out)

    def cast(self, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A0, B0 as the matmuls take them: under autocast, copies in its dtype, kept until A0/B0 change.

        Autocast caches its casts only of tensors that require grad, so the frozen A0/B0 would be cast again
        on every forward (two cast kernels a layer, and the copies kept for backward). The copies round as
        autocast rounds lora_A/lora_B, so the correction still cancels the trained path exactly at init.
        """
        if not torch.is_autocast_enabled(device_type):
            return self.A0, self.B0
        dtype = torch.get_autocast_dtype(device_type)
        key = (dtype, self.A0.device, self.A0.data_ptr(), self.A0._version, self.B0.data_ptr(), self.B0._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, self.A0.to(dtype), self.B0.to(dtype))
        return self._cast[1], self._cast[2]


class MiloraLinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update and its frozen initial value."""

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float):
        super().__init__()
        # Not weight.shape: a bitsandbytes 4-bit layer stores its weight packed, two values a byte.
        out_features, in_features = base_layer.out_features, base_layer.in_features
        if not 0 < r <= min(out_features, in_features):
            raise ModelError(f"adapter.r={r} is out of range for a {out_features}x{in_features} layer")
        device = base_layer.weight.device
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = InputDropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Factors train in float32 whatever the base dtype (float64 for a float64 base, the exactness tests'):
        # they are small, and bf16 factors would round away the updates to the minor components.
        dtype = dtypes.at_least_fp32(base_layer.weight.dtype)  # a quantized base's uint8 storage: float32
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        self.lora_initial = InitialFactors(r, in_features, out_features, device, dtype)
        self.has_correction = False  # False while B0 A0 == 0 (the plain LoRA and MiCA inits)

    @property
    def lora_A0(self) -> torch.Tensor:
        """The frozen initial A0, (r, in) (under fsdp a DTensor: this process's rows)."""
        return self.lora_initial.A0

    @property
    def lora_B0(self) -> torch.Tensor:
        """The frozen initial B0, (out, r) (under fsdp a DTensor: this process's rows)."""
        return self.lora_initial.B0

    def set_factors(self, lora_A: torch.Tensor, lora_B: torch.Tensor, initial: bool = True) -> None:
        """Load whole factors (under fsdp each process keeps its rows); `initial` also makes them the frozen B0, A0
        the correction subtracts."""
        with torch.no_grad():
            dtensor.copy_whole(self.lora_A.weight, lora_A)
            dtensor.copy_whole(self.lora_B.weight, lora_B)
            if initial:
                dtensor.copy_whole(self.lora_A0, lora_A)
                dtensor.copy_whole(self.lora_B0, lora_B)
                # from the whole factors, in their stored dtype: every process decides the same
                self.has_correction = bool(lora_B.to(self.lora_B0.dtype).any()) and bool(lora_A.to(self.lora_A0.dtype).any())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # Under autocast the factors' matmuls run in the activation dtype anyway: an fp32 copy of x (and an
        # fp32 dropout mask) would only cost memory. Without it, x meets the float32 factors in float32.
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        delta = self.lora_B(self.lora_A(self.lora_dropout(h)))
        if self.has_correction:
            # The same ops on equal values as the trained path, so the difference is exactly 0 at init.
            delta = delta - self.lora_initial(h)
        return result + (self.scaling * delta).to(result.dtype)

    def initial_factors_in(self, device_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_initial.cast(device_type)  # A0, B0 as the correction's matmuls take them

    def delta_weight(self) -> torch.Tensor:
        """The learned update dW = s (B A - B0 A0), float32, (out, in). Under fsdp a collective (the factors gathered)."""
        A, B, A0, B0 = (dtensor.whole(t) for t in (self.lora_A.weight, self.lora_B.weight, self.lora_A0, self.lora_B0))
        return adapter_folder.delta(A, B, A0, B0, self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of the model's nn.Linear layers, without the output embedding (lm_head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not output]


def find_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the layers to adapt: `all-linear`, or layers whose name or last parts match a target."""
    linear = linear_layer_names(model)
    if target_modules == ALL_LINEAR:
        return linear
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    chosen = []
    for target in targets:
        hits = [name for name in linear if name == target or name.endswith("." + target)]
        if not hits:
            kinds = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
            raise ModelError(
                f"adapter.target_modules: '{target}' matched no linear layer; the model's linear layers are: {kinds}"
            )
        chosen += [name for name in hits if name not in chosen]
    return [name for name in linear if name in chosen]  # model order


def inject(model: nn.Module, names: Iterable[str], r: int, lora_alpha: float, lora_dropout: float) -> dict[str, MiloraLinear]:
    """Freeze the model and replace each named nn.Linear by a MiloraLinear around it."""
    model.requires_grad_(False)
    linear = set(linear_layer_names(model))
    adapters = {}
    for name in names:
        if name not in linear:
            raise ModelError(f"the model has no linear layer '{name}' to adapt: the adapter was trained on another model")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MiloraLinear(getattr(parent, child), r, lora_alpha, lora_dropout)
        setattr(parent, child, layer)
        adapters[name] = layer
    return adapters


def set_trainable(adapters: dict[str, MiloraLinear], init: Init) -> None:
    """Which factors train: A and B, or A alone for the inits in FROZEN_B (B stays B0)."""
    for layer in adapters.values():
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(init not in FROZEN_B)


def initial_factors(
    layer: MiloraLinear,
    init: Init,
    svd_dtype: SvdDtype,
    svd_driver: SvdDriver,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of one layer: SVD components for milora/pissa/mica, Kaiming-uniform A and zero B for lora.

    `weight`: the full-precision weight to decompose when the layer's own is quantized (quantize.py).
    """
    in_features, out_features = layer.lora_A.in_features, layer.lora_B.out_features
    if init == "lora":
        lora_A = torch.empty(layer.r, in_features)
        # PEFT's default LoRA init: kaiming_uniform_(a=sqrt(5)) has bound 1/sqrt(in_features).
        bound = 1.0 / math.sqrt(in_features)
        lora_A.uniform_(-bound, bound, generator=generator)
        return lora_A, torch.zeros(out_features, layer.r)
    weight = layer.base_layer.weight if weight is None else weight
    if init == "mica":
        return svd.mica_factors(weight, layer.r, svd_dtype, svd_driver)
    return svd.init_factors(weight, layer.r, layer.scaling, _SVD_COMPONENTS[init], svd_dtype, svd_driver)


def initialise(
    adapters: dict[str, MiloraLinear],
    init: Init,
    svd_dtype: SvdDtype,
    svd_driver: SvdDriver,
    seed: int,
) -> None:
    """Set every adapter's factors and frozen initial factors for `init`, in a fixed layer order."""
    generator = torch.Generator().manual_seed(seed)
    for _name, layer in adapters.items():
        lora_A, lora_B = initial_factors(layer, init, svd_dtype, svd_driver, generator)
        layer.set_factors(lora_A, lora_B)
    set_trainable(adapters, init)


def adapter_tensors(adapters: dict[str, MiloraLinear], keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trained, initial) factors keyed `{layer}.lora_A.weight` / `{layer}.lora_B.weight`, CPU, in the factors'
    dtype (float32; float64 for a float64 base, so that a resume continues from the very values). Whole tensors:
    under fsdp a collective that every process calls; a process without `keep` gathers each tensor for the others
    and drops it, and gets ({}, {}) (so only the process that writes holds the whole adapter on its host)."""
    def cpu(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtypes.at_least_fp32(tensor.dtype)).cpu().contiguous()

    trained, initial = {}, {}
    for name, layer in adapters.items():
        for part, factor, start in (("A", layer.lora_A.weight, layer.lora_A0), ("B", layer.lora_B.weight, layer.lora_B0)):
            factor, start = dtensor.whole(factor.detach()), dtensor.whole(start.detach())  # one tensor at a time on the device
            if keep:
                trained[adapter_folder.key(name, part)], initial[adapter_folder.key(name, part)] = cpu(factor), cpu(start)
    return trained, initial


def load_adapter_tensors(
    adapters: dict[str, MiloraLinear], trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> None:
    """Inverse of adapter_tensors: the initial factors first, then the trained ones over them."""
    expected = {adapter_folder.key(name, part) for name in adapters for part in "AB"}
    for label, tensors in (("trained", trained), ("initial", initial)):
        if set(tensors) != expected:
            missing = sorted(expected - set(tensors))[:1] or sorted(set(tensors) - expected)[:1]
            raise ModelError(f"{label} adapter factors do not match the model's adapted layers (first difference: {missing[0]})")
    for name, layer in adapters.items():
        needed = (tuple(layer.lora_A.weight.shape), tuple(layer.lora_B.weight.shape))
        found = (tuple(trained[adapter_folder.key(name, "A")].shape), tuple(trained[adapter_folder.key(name, "B")].shape))
        if found != needed:
            raise ModelError(f"the factors of {name} have shapes {found}, the model's layer needs {needed}: the adapter was trained on another model")
    for name, layer in adapters.items():
        layer.set_factors(initial[adapter_folder.key(name, "A")], initial[adapter_folder.key(name, "B")])
        layer.set_factors(trained[adapter_folder.key(name, "A")], trained[adapter_folder.key(name, "B")], initial=False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; the frozen initial factors A0, B0 count in neither (a copy, not the model)."""
    initial = {id(p) for module in model.modules() if isinstance(module, InitialFactors) for p in module.parameters()}
    counted = [p for p in model.parameters() if id(p) not in initial]
    trainable = sum(p.numel() for p in counted if p.requires_grad)
    # bitsandbytes' 4-bit parameters hold two weights a byte: count weights, not bytes
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in counted)
    return trainable, total
