"""Whole tensors to and from the sharded parameters of an fsdp run (FSDP2 DTensors, Shard(0): each process
holds a block of rows); plain tensors pass through unchanged, so unsharded runs take the very same path.

The adapter folder, the checkpoints and the factor cache hold whole tensors whatever the process count:
`whole` gathers one (a collective: every process calls it at the same point, in the same order), and
`copy_whole` sets a sharded parameter from a whole tensor by keeping this process's rows, without
communication (every process holds the whole tensor already).
"""

from __future__ import annotations

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (a parameter of an fsdp run, its gradient or optimizer state)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective), else `tensor` itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: for a DTensor, a DTensor of the same mesh and placements holding this process's
    part of `full` (src_data_rank=None: each process slices its own copy, nothing is sent); else `full`."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def copy_whole(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full, in place; a sharded param keeps its own rows of `full` (call under no_grad)."""
    param.copy_(local_like(full, param))
