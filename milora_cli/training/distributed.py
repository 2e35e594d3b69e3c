"""What training changes with the number of processes: the accumulation of a global batch, one RNG stream
per rank (saved and restored per rank), and FSDP2 sharding of the base weights (ranks.py shares out the
scoring).

Under `train.distributed: fsdp` only the frozen base weights are sharded (torch.distributed.fsdp.
fully_shard: the embeddings, each decoder layer, the head, then the root, as torchtitan does; on the meta
device, before loading: sharded_load.py). The adapter factors lora_A, lora_B (0.6 % of Llama-3-70B's
parameters at r=32 on all seven projections, 2.35 % at r=128) stay whole on
every rank, outside FSDP, in float32, and their gradients are averaged in float32 by all-reduces of 25 MB
buckets: so clipping sees whole gradients, the saver and the optimizer state see whole tensors, and a bf16
base never shares an FSDP unit with fp32 trainable factors. A0, B0 are buffers: whole, float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from milora_cli import dtypes
from milora_cli.errors import RecipeError
from milora_cli.ranks import Ranks
from milora_cli.recipe import TrainConfig
from milora_cli.training import vocab_parallel


def accumulation_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on each of `world` processes.

    train.global_batch_size, when set, wins: accumulation = global / (micro_batch_size x processes), the
    same global batch on 1 or 8 GPUs. Unset, train.gradient_accumulation_steps is taken as it is.
    """
    if cfg.global_batch_size is None:
        return cfg.gradient_accumulation_steps
    per_pass = cfg.micro_batch_size * world
    if cfg.global_batch_size % per_pass:
        fix = (f"a micro_batch_size that divides {cfg.global_batch_size // world}" if cfg.global_batch_size % world == 0
               else f"a process count that divides {cfg.global_batch_size}")
        raise RecipeError(
            f"train.global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size x processes"
            f" = {cfg.micro_batch_size} x {world} = {per_pass}; choose {fix}"
        )
    return cfg.global_batch_size // per_pass


def shard(model: torch.nn.Module, adapter_params: list[torch.nn.Parameter], device_type: str) -> str:
    """Spread the frozen base over the processes: the input embedding and the head by vocabulary rows
    (vocab_parallel.py); as FSDP2 units, each linear layer of the decoder layers, then each decoder layer (its
    norms), then the root; the adapters left whole. Returns a line saying how much of the model this rank holds.

    A unit's weights are gathered whole while it runs, and FSDP2 holds about 2.5 copies of it then (the gathered
    buffer, the parameters copied out of it, its shard): a unit per linear layer keeps that working set to the
    largest matrix (Llama-3-70B's MLP projections, 470 MB in bf16, where a decoder layer is 1.7 GB) for the same
    bytes all-gathered, in 7 collectives a layer instead of one. Where the embedding and head cannot be split
    (vocab_parallel.split), they get units of their own (as torchtitan gives them): in the root they would be
    whole together for all of a forward. Tied, they are one Parameter and stay in the root.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    split = vocab_parallel.split(model, mesh)
    ignored = set(adapter_params) | split
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # no sharded parameter trains; fp32 if one ever does
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = not split and head is not None and head.weight is not embeddings.weight
    layers = list(model.get_decoder().layers)
    linears = [module for layer in layers for module in layer.modules() if type(module) is torch.nn.Linear and not module.weight.requires_grad]
    for unit in linears + [embeddings] * untied + layers + [head] * untied:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    # What transformers' own FSDP2 helper marks: generate() then keeps every rank stepping until all are
    # done (synced_gpus), since each forward all-gathers the layers' weights on all ranks.
    model._is_fsdp_managed_module = True
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return f"fsdp: {held:,} of {total:,} parameters on each of {torch.distributed.get_world_size()} processes"


BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb: one all-reduce's flat buffer, not one as large as all the adapters


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Mean over the processes of the whole adapters' gradients, in float32, one all-reduce per bucket of at
    most BUCKET_BYTES (what DDP does for them under ddp; the same elementwise sums, so the same result)."""
    for param in params:
        if param.grad is None:  # a factor the batch did not reach still takes part in the collective
            param.grad = torch.zeros_like(param)
    for bucket in _buckets(params, BUCKET_BYTES):
        flat = torch.cat([param.grad.reshape(-1).to(dtypes.at_least_fp32(param.grad.dtype)) for param in bucket])  # (sum of the bucket's numels,)
        torch.distributed.all_reduce(flat)
        flat /= world
        for param, grad in zip(bucket, flat.split([param.numel() for param in bucket]), strict=True):
            param.grad.copy_(grad.view_as(param.grad))


def _buckets(params: list[torch.nn.Parameter], cap: int) -> Iterator[list[torch.nn.Parameter]]:
    """Consecutive parameters in groups of at most `cap` bytes of float32 (float64: half as many parameters) (a larger parameter alone)."""
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for param in params:
        if bucket and size + 4 * param.numel() > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(param)
        size += 4 * param.numel()
    if bucket:
        yield bucket


def any_process(flag: bool, group=None) -> bool:
    """Whether `flag` is set on any process (a collective: every process calls it at the same point).

    The reduction runs over a gloo group on a CPU tensor (`control_group()`): under NCCL the default group
    reduces device tensors only, and reading the result back with .item() would make the host wait for
    the GPU at every call.
    """
    flag_tensor = torch.tensor([int(flag)], dtype=torch.int32)  # on the CPU
    torch.distributed.all_reduce(flag_tensor, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(flag_tensor.item())


def control_group():
    """A process group for small CPU-side decisions: the default group when it already runs gloo, else a
    new gloo group over the same processes (a collective: every process creates it)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    return torch.distributed.new_group(backend="gloo")


def seed_rank(seed: int, ranks: Ranks) -> None:
    """Give every rank its own dropout stream once the shared initialisation is done.

    Rank 0 continues the run's seeded stream (one process behaves as it always did); rank r > 0 restarts
    from seed + r, so dropout masks differ across ranks instead of repeating rank 0's.
    """
    if ranks.rank > 0:
        torch.manual_seed(seed + ranks.rank)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(seed + ranks.rank)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: the CPU generator and, where there is one, the current CUDA device's."""
    return {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})


def gathered_rng(ranks: Ranks) -> dict[str, torch.Tensor]:
    """Every rank's RNG states as {"RANK.torch": ..., "RANK.cuda": ...} (a collective: call on every rank)."""
    return {f"{rank}.{name}": state for rank, states in enumerate(ranks.gather(rng_state())) for name, state in states.items()}


def rank_rng(saved: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s RNG states ("torch", "cuda") among a checkpoint's (those of checkpoints written before
    per-rank states, unprefixed, are rank 0's)."""
    mine = {name.partition(".")[2]: state for name, state in saved.items() if name.startswith(f"{rank}.")}
    return mine or {name: state for name, state in saved.items() if "." not in name}


def restore_rng(saved: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Restore this rank's RNG states from a checkpoint's."""
    mine = rank_rng(saved, ranks.rank)
    if "torch" in mine:
        torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
