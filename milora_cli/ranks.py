"""Work shared out over the processes of a job with equal collective counts: each rank scores its share
of the batches one process would score, and the main process gets every result in order.

Every collective here is entered by every rank the same number of times, whatever the split: a rank
that idles in one while another scores alone is killed by NCCL's watchdog (600 s) on GPUs, and under
sharded weights every forward is itself a collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

Item = TypeVar("Item")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a job (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, accelerator) -> Ranks:
        return cls(accelerator.process_index, accelerator.num_processes)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (one collective; none for one process)."""
        if self.world == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, obj)
        return gathered


def my_batches(n_batches: int, ranks: Ranks) -> Iterator[tuple[int, bool]]:
    """(batch index, keep) of this rank, one per round: in round k rank r takes batch k N + r.

    A rank without a batch in the last round takes the last batch again with keep=False, so a sharded
    model, whose forward is itself a collective, runs the same number of forwards on every rank.
    """
    for start in range(0, n_batches, ranks.world):
        mine = start + ranks.rank
        yield min(mine, n_batches - 1), mine < n_batches


def shared_rounds(
    batches: Sequence[Item], ranks: Ranks, score: Callable[[Item], list[Any]], emit: Callable[[list[Any]], None]
) -> None:
    """Score `batches` over all ranks (my_batches); after each round the round's results are gathered
    and `emit` gets them on the main process, in batch order.

    Each batch is the batch one process would score, so the results equal one process's.
    """
    for index, keep in my_batches(len(batches), ranks):
        records = score(batches[index])
        gathered = ranks.gather(records if keep else [])
        if ranks.main:
            emit([record for part in gathered for record in part])


ONE = Ranks()  # a process on its own: no collectives
