"""The input embedding and the output head split by vocabulary rows over the processes of an fsdp run, never
gathered whole.

An FSDP unit is gathered whole while it runs, and FSDP2 then holds about 2.5 copies of it (the gathered buffer,
the parameters copied out of it, its own shard): the embedding and the head are a model's largest tensors
(Llama-3's head, 128256 x 8192, is 2.1 GB in bf16; in a 200M model with a 49k vocabulary each is a quarter of
the model). Here each process keeps rows [start, stop) of the (V, H) weight for good (torch.chunk's split, as
FSDP's Shard(0): a DTensor, so the loader reads those rows from the checkpoint like any other shard), and the
tokens travel instead, as in Megatron's vocabulary-parallel embedding and column-parallel head. Unlike tensor
parallelism, each process has tokens of its own (they are data-parallel ranks), so the tokens of all of them
are gathered (padded to the longest; a few KB of ids, M x H hidden values) and the results handed back:

1. Embedding: each process looks up all the gathered ids that fall in its rows (zeros for the others), and a
   reduce-scatter sums them and gives each process the vectors of its own ids: exact, one term is not zero.
2. Head: each process computes the logits of its rows for all the gathered tokens, and an all-to-all gives
   each process its own tokens' logits over the whole vocabulary (the same dot products as the whole head).
   Backward: the logits' gradient goes back by the same all-to-all, each process multiplies by its rows, and a
   reduce-scatter sums the hidden states' partial gradients (another order of the same sum).

The base is frozen: the weight takes no gradient. A model whose embedding or head is not a plain nn.Embedding /
bias-free nn.Linear (a scaled embedding, say) keeps them as FSDP units instead (distributed.shard).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def split(model: nn.Module, mesh) -> set[nn.Parameter]:
    """Replace the model's embedding and head by vocabulary-parallel ones over `mesh` (still on the meta device
    or not); their parameters, for FSDP to leave alone (empty where the model's are not plain, see above)."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embeddings) is not nn.Embedding or (head is not None and (type(head) is not nn.Linear or head.bias is not None)):
        return set()
    weight = _row_shard(embeddings.weight, mesh)
    model.set_input_embeddings(VocabParallelEmbedding(weight, mesh))
    if head is not None:
        tied = head.weight is embeddings.weight
        model.set_output_embeddings(VocabParallelHead(weight if tied else _row_shard(head.weight, mesh), mesh))
    return set(model.get_input_embeddings().parameters()) | set(model.get_output_embeddings().parameters() if head is not None else [])


def _row_shard(weight: torch.Tensor, mesh) -> nn.Parameter:
    """This process's rows of `weight` (torch.chunk's split) as a frozen DTensor parameter of the global shape."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    chunk = -(-weight.shape[0] // world)
    start, stop = min(rank * chunk, weight.shape[0]), min((rank + 1) * chunk, weight.shape[0])
    local = weight.detach()[start:stop].clone()  # (rows, H); on meta: no storage
    tensor = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=weight.shape, stride=weight.stride())
    return nn.Parameter(tensor, requires_grad=False)


class _SplitRows(nn.Module):
    """Holds this process's rows of a (V, H) weight split over the processes of `mesh` (a DTensor, Shard(0))."""

    def __init__(self, weight: nn.Parameter, mesh):
        super().__init__()
        self.weight = weight
        self.group = mesh.get_group()

    def rows(self) -> tuple[int, torch.Tensor]:
        """(the first row this process holds, its rows)."""
        chunk = -(-self.weight.shape[0] // self.weight.device_mesh.size())
        return self.weight.device_mesh.get_local_rank() * chunk, self.weight.to_local()


class VocabParallelEmbedding(_SplitRows):
    """nn.Embedding's lookup with the rows spread over the processes (step 1 above)."""

    def __init__(self, weight: nn.Parameter, mesh):
        super().__init__(weight, mesh)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start, local = self.rows()
        gathered, counts = _gather_padded(ids.reshape(-1), self.group)  # (N * longest,)
        shifted = gathered - start
        inside = (shifted >= 0) & (shifted < local.shape[0])
        vectors = nn.functional.embedding(shifted.clamp(0, max(local.shape[0] - 1, 0)), local)  # (N * longest, H)
        vectors = torch.where(inside[:, None], vectors, torch.zeros((), dtype=vectors.dtype, device=vectors.device))
        mine = vectors.new_empty((max(counts), vectors.shape[1]))
        dist.reduce_scatter_tensor(mine, vectors, group=self.group)
        return mine[: ids.numel()].view(*ids.shape, -1)  # (..., H)


class VocabParallelHead(_SplitRows):
    """A bias-free nn.Linear to the vocabulary with its rows spread over the processes (step 2 above)."""

    def __init__(self, weight: nn.Parameter, mesh):
        super().__init__(weight, mesh)
        self.out_features, self.in_features = weight.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.weight.to_local()  # (rows, H)
        flat = hidden.reshape(-1, hidden.shape[-1])  # (M, H)
        if torch.is_autocast_enabled(hidden.device.type):  # what nn.Linear under autocast computes in
            dtype = torch.get_autocast_dtype(hidden.device.type)
            flat, local = flat.to(dtype), local.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            logits = _HeadLogits.apply(flat, local, self.out_features, self.group)  # (M, V)
        return logits.view(*hidden.shape[:-1], -1)


class _HeadLogits(torch.autograd.Function):
    """(M, H) hidden states -> (M, V) logits, with each process holding (about V / N, H) rows of the head."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, local: torch.Tensor, vocab: int, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        gathered, counts = _gather_padded(flat, group)  # (N * longest, H)
        longest, chunk = max(counts), -(-vocab // world)
        partial = nn.functional.linear(gathered, local)  # (N * longest, rows)
        sent = partial.new_zeros((world * longest, chunk))
        sent[:, : local.shape[0]] = partial
        received = torch.empty_like(sent)  # block i: my tokens' logits in process i's rows
        dist.all_to_all_single(received, sent, group=group)
        ctx.save_for_backward(local)
        ctx.shape, ctx.group, ctx.counts, ctx.vocab = flat.shape, group, counts, vocab
        logits = received.view(world, longest, chunk).transpose(0, 1).reshape(longest, world * chunk)[:, :vocab]
        return logits[: flat.shape[0]].contiguous()  # (M, V)

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        (local,) = ctx.saved_tensors
        world, longest = dist.get_world_size(ctx.group), max(ctx.counts)
        chunk = -(-ctx.vocab // world)
        padded = grad_logits.new_zeros((longest, world * chunk))
        padded[: grad_logits.shape[0], : ctx.vocab] = grad_logits
        sent = padded.view(longest, world, chunk).transpose(0, 1).contiguous()  # (N, longest, chunk): block i to process i
        received = torch.empty_like(sent)  # block j: process j's tokens' gradient in my rows
        dist.all_to_all_single(received, sent, group=ctx.group)
        partial = received.view(world * longest, chunk)[:, : local.shape[0]] @ local.to(received.dtype)  # (N * longest, H)
        mine = partial.new_empty((longest, ctx.shape[1]))
        dist.reduce_scatter_tensor(mine, partial.contiguous(), group=ctx.group)
        return mine[: ctx.shape[0]], None, None, None


def _gather_padded(rows: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """(N * longest, ...) every process's `rows` padded with zeros to the longest, and how many each has."""
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = torch.empty(world, dtype=count.dtype, device=rows.device)
    dist.all_gather_into_tensor(counts, count, group=group)
    counts = counts.tolist()
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    gathered = rows.new_empty((world * padded.shape[0], *rows.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded, group=group)
    return gathered, counts
