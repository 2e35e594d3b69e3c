"""What training changes with the number of processes: the accumulation of a global batch, one RNG stream
per rank (saved and restored per rank), and FSDP2 sharding of the model (ranks.py shares out the
scoring).

Under `train.distributed: fsdp` the whole model is sharded, on the meta device, before loading
(sharded_load.py): the embedding and the head by vocabulary rows (vocab_parallel.py), the rest by
torch.distributed.fsdp.fully_shard (each adapter's factors, each linear layer, each decoder layer, the
root, as torchtitan and torchtune do). The adapter state divides by the
process count too: lora_A, lora_B (float32), their gradients (reduce-scattered in the factors' dtype: float32, float64 in an fp64 run), AdamW's two
moments and the frozen A0, B0 are each held as this process's rows. The adapter folder, the checkpoints
and a resume see whole tensors (dtensor.py gathers and slices them).
"""

from __future__ import annotations

import torch

from milora_cli import adapter
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


def shard(model: torch.nn.Module, device_type: str) -> str:
    """Spread the model over the processes: the input embedding and the head by vocabulary rows
    (vocab_parallel.py); as FSDP2 units, the adapters' factors, each linear layer of the decoder layers, then
    each decoder layer (its norms), then the root. Returns a line saying how much of the model this rank holds.

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
    _shard_adapters(model, mesh)  # innermost first: a unit takes the parameters no inner unit holds
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # no base parameter trains; fp32 if one ever does
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = not split and head is not None and head.weight is not embeddings.weight
    layers = list(model.get_decoder().layers)
    linears = [module for layer in layers for module in layer.modules() if type(module) is torch.nn.Linear]  # the factors' are FSDPLinear now
    for unit in linears + [embeddings] * untied + layers + [head] * untied:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=split)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=split)
    # What transformers' own FSDP2 helper marks: generate() then keeps every rank stepping until all are
    # done (synced_gpus), since each forward all-gathers the layers' weights on all ranks.
    model._is_fsdp_managed_module = True
    held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return f"fsdp: {held:,} of {total:,} parameters on each of {torch.distributed.get_world_size()} processes"


def _shard_adapters(model: torch.nn.Module, mesh) -> None:
    """Each adapter's lora_A, lora_B and frozen A0/B0 (adapter.InitialFactors) an FSDP2 unit of its own.

    As torchtune's recipes/lora_finetune_distributed.py does (_setup_model at commit 00360f7: it fully_shards
    every nn.Linear whose weight requires grad, innermost first, before the decoder layers): the fp32 factors
    never share a unit with a bf16 base (FSDP2 refuses mixed dtypes in a unit), and their gradients are
    reduce-scattered, in the factors' own dtype (float32; float64 for the exactness tests' float64 runs),
    into sharded gradients that AdamW steps with sharded moments.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for layer in [module for module in model.modules() if isinstance(module, adapter.MiloraLinear)]:
        policy = MixedPrecisionPolicy(reduce_dtype=layer.lora_A.weight.dtype)
        for unit in (layer.lora_A, layer.lora_B, layer.lora_initial):
            fully_shard(unit, mesh=mesh, mp_policy=policy)


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
