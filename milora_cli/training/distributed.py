"""What training changes with the number of processes: the accumulation of a global batch and one RNG
stream per rank, saved and restored per rank (ranks.py shares out the scoring)."""

from __future__ import annotations

import torch

from milora_cli.errors import RecipeError
from milora_cli.ranks import Ranks
from milora_cli.recipe import TrainConfig


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


def restore_rng(saved: dict[str, torch.Tensor], ranks: Ranks) -> None:
    """Restore this rank's RNG states from a checkpoint's (those of checkpoints written before per-rank
    states, "torch" and "cuda", are rank 0's)."""
    mine = {name.partition(".")[2]: state for name, state in saved.items() if name.startswith(f"{ranks.rank}.")}
    mine = mine or {name: state for name, state in saved.items() if "." not in name}
    if "torch" in mine:
        torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
