"""The initial factors, decomposed once: shared out across processes and cached on disk.

Under N processes, target layer i (in model order) is decomposed by rank i % N alone and its factors are
broadcast from that rank. Every rank then holds the same factors bit for bit (singular vectors are
defined only up to sign, so a decomposition repeated on each rank need not agree), and the init time
falls about as 1/N.

The factors of the SVD inits are cached as safetensors under cache_root()/factors/, one file per layer,
keyed by the sha256 of the weight's bytes (with its shape and dtype), the init, r, alpha and the svd
driver and dtype. A rerun, a resume or another run on the same weights reads them instead of
decomposing. Files are written under a temporary name and renamed; a file that cannot be read, whose key
or shapes differ, or whose factors are not singular triplets of the weight, is recomputed and replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from milora_cli import adapter, atomic, models, svd
from milora_cli.recipe import AdapterConfig, Init

FORMAT = "milora-factors/1"
Factors = tuple[torch.Tensor, torch.Tensor]  # (A0 (r, in), B0 (out, r)), float32


@dataclass(frozen=True)
class InitReport:
    """Layers decomposed and layers read from the cache, over all processes; `mine`: decomposed here;
    `fingerprint`: models.weights_fingerprint of the weights, each sampled by the process that read it."""

    computed: int
    cached: int
    mine: int
    fingerprint: str

    def describe(self, processes: int) -> str:
        """The train output's note on where the factors came from, e.g. ' (init from cache)', or ''."""
        parts = []
        if self.cached:
            parts.append("init from cache" if not self.computed else f"{self.cached} layers from cache")
        if self.computed and processes > 1:
            parts.append(f"decomposed by {processes} processes")
        return f" ({', '.join(parts)})" if parts else ""


def cache_dir() -> Path:
    return models.cache_root() / "factors"


def cache_key(layer: adapter.MiloraLinear, cfg: AdapterConfig, weight: torch.Tensor) -> str:
    """Everything the factors depend on; the scaling alpha / r enters A0 and B0 as sqrt(S / s)."""
    digest = models.tensor_digest(weight)
    return f"{FORMAT}|{digest}|init={cfg.init}|r={layer.r}|alpha={layer.lora_alpha}|{cfg.svd_driver}|{cfg.svd_dtype}"


def read_cached(path: Path, key: str, layer: adapter.MiloraLinear, weight: torch.Tensor, init: Init) -> Factors | None:
    """The cached factors of `key`, or None when absent, unreadable, not what this layer needs, or not singular
    triplets of `weight`: the key holds the weight's sha256, but anyone who can write to a shared cache can
    write a file under that key (svd.are_singular_pairs)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as opened:  # the key is checked from the file's own metadata
            stored_key = (opened.metadata() or {}).get("key")
            tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118 - safe_open is not iterable
    except (SafetensorError, OSError, ValueError):
        return None
    lora_A, lora_B = tensors.get("lora_A"), tensors.get("lora_B")
    if stored_key != key or lora_A is None or lora_B is None:
        return None
    if lora_A.shape != layer.lora_A0.shape or lora_B.shape != layer.lora_B0.shape:
        return None
    mica = init == "mica"  # A0 = 0: only B0's columns can be checked
    if mica and (lora_A.any() or not svd.are_left_singular_vectors(weight, lora_B)):
        return None
    if not mica and not svd.are_singular_pairs(weight, lora_A, lora_B, layer.scaling):
        return None
    return lora_A, lora_B


def write_cached(path: Path, key: str, factors: Factors) -> None:
    """Write atomically, so readers never see half a file."""
    lora_A, lora_B = (f.detach().float().cpu().contiguous() for f in factors)
    atomic.save_file_atomic(path, {"lora_A": lora_A, "lora_B": lora_B}, metadata={"format": FORMAT, "key": key})


def _own_factors(layer: adapter.MiloraLinear, cfg: AdapterConfig, use_cache: bool, weight: torch.Tensor) -> tuple[Factors, bool]:
    """(factors, from_cache) of one layer this process is responsible for, decomposing `weight`."""
    if use_cache:
        key = cache_key(layer, cfg, weight)
        path = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.safetensors"
        cached = read_cached(path, key, layer, weight, cfg.init)
        if cached is not None:
            return cached, True
    lora_A, lora_B = adapter.initial_factors(layer, cfg.init, cfg.svd_dtype, cfg.svd_driver, weight=weight)
    factors = (lora_A.float(), lora_B.float())  # what the layer holds; the cache stores exactly that
    if use_cache:
        with contextlib.suppress(OSError):  # an unwritable cache ($MILORA_CACHE read-only, a full disk) only costs speed
            write_cached(path, key, factors)
    return factors, False


def initialise(adapters: dict[str, adapter.MiloraLinear], cfg: AdapterConfig, *, seed: int, use_cache: bool,
               rank: int = 0, world: int = 1, weights: Mapping[str, torch.Tensor] | None = None) -> InitReport:
    """Set every adapter's initial factors; the SVD inits decomposed once per layer over all processes.

    `weights`: {layer: full-precision weight} to decompose instead of the layers' own (a quantized base, or
    a sharded one: shards.LazyWeights reads them from the checkpoint); the same weights give the same cache
    keys, so a quantized, a sharded and a plain run share the cache. Each weight is read once, by its owner.
    """
    names = list(adapters)
    # 1. this rank's share (round-robin over the layers): its fingerprint part, and from the cache or decomposed
    owned: dict[str, Factors] = {}
    parts: dict[str, bytes] = {}
    counts = torch.zeros(2, dtype=torch.int64)  # (computed, cached)
    for i, name in enumerate(names):
        if i % world == rank:
            layer = adapters[name]
            weight = layer.base_layer.weight if weights is None else weights[name].to(layer.lora_A0.device)
            parts[name] = models.fingerprint_part(name, weight)
            if cfg.init != "lora":
                owned[name], hit = _own_factors(layer, cfg, use_cache, weight)
                counts[int(hit)] += 1
    mine = int(counts[0])
    if world > 1:
        shared: list[dict[str, bytes]] = [{} for _ in range(world)]
        torch.distributed.all_gather_object(shared, parts)  # ~16 KB a layer; between this job's own processes
        parts = {name: part for rank_parts in shared for name, part in rank_parts.items()}
    fingerprint = models.fingerprint_of(parts)
    if cfg.init == "lora":  # random A, zero B from the seed: the same on every rank, nothing to share
        adapter.initialise(adapters, cfg.init, cfg.svd_dtype, cfg.svd_driver, seed)
        return InitReport(0, 0, 0, fingerprint)
    # 2. every layer's factors from its owner to all ranks, then into the layers
    for i, name in enumerate(names):
        layer = adapters[name]
        device = layer.lora_A0.device
        if name in owned:
            lora_A, lora_B = (f.to(device, layer.lora_A0.dtype).contiguous() for f in owned[name])  # a broadcast needs one dtype
        else:
            # whole tensors to receive into, even where A0/B0 are sharded DTensors (their shape is the whole one)
            lora_A, lora_B = (torch.empty(f.shape, dtype=f.dtype, device=device) for f in (layer.lora_A0, layer.lora_B0))
        if world > 1:
            torch.distributed.broadcast(lora_A, src=i % world)
            torch.distributed.broadcast(lora_B, src=i % world)
        layer.set_factors(lora_A, lora_B)
    if world > 1:
        counts = counts.to(adapters[names[0]].lora_A0.device)
        torch.distributed.all_reduce(counts)
    return InitReport(int(counts[0]), int(counts[1]), mine, fingerprint)
