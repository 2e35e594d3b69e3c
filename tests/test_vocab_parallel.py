"""training/vocab_parallel.py on 2 gloo processes: each holds half the rows of the embedding and the head, and
each has tokens of its own (of different lengths, as data-parallel ranks do); every process gets what the whole
nn.Embedding / nn.Linear computes for its own tokens, forward and backward."""

import os
import tempfile

import torch
import torch.multiprocessing as mp
from torch import nn

from helpers import EXACT_FP64

VOCAB, HIDDEN = 1001, 24  # an odd vocabulary: the two processes hold 501 and 500 rows (torch.chunk's split)


def _worker(rank: int, world: int, init_file: str, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from milora_cli.training import vocab_parallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same whole weights on both processes, as the checkpoint is
        embedding, head = nn.Embedding(VOCAB, HIDDEN, dtype=torch.float64), nn.Linear(HIDDEN, VOCAB, bias=False, dtype=torch.float64)
        mesh = init_device_mesh("cpu", (world,))
        split_embedding = vocab_parallel.VocabParallelEmbedding(vocab_parallel._row_shard(embedding.weight, mesh), mesh)
        split_head = vocab_parallel.VocabParallelHead(vocab_parallel._row_shard(head.weight, mesh), mesh)
        generator = torch.Generator().manual_seed(1 + rank)  # each process its own tokens, rank 1 more of them
        ids = torch.randint(0, VOCAB, (2, 5 + 3 * rank), generator=generator)
        ids[0, 0], ids[0, 1] = 0, VOCAB - 1  # the first row of the first process, the last of the second
        hidden = torch.randn(2, 5 + 3 * rank, HIDDEN, dtype=torch.float64, generator=generator, requires_grad=True)
        weights = torch.randn(2, 5 + 3 * rank, VOCAB, dtype=torch.float64, generator=generator)  # a loss's gradient
        logits = split_head(hidden)
        (logits * weights).sum().backward()
        split_grad, hidden.grad = hidden.grad, None
        (head(hidden) * weights).sum().backward()
        results[rank] = {
            "local rows": (split_embedding.weight.to_local().shape[0], split_head.weight.to_local().shape[0]),
            "embedding equal": torch.equal(split_embedding(ids), embedding(ids)),
            "logits": ((logits - head(hidden)).abs().max() / head(hidden).abs().max()).item(),
            "gradient": ((split_grad - hidden.grad).abs().max() / hidden.grad.abs().max()).item(),
            "weight frozen": not split_head.weight.requires_grad and split_head.weight.grad is None,
        }
    finally:
        torch.distributed.destroy_process_group()


def test_split_rows_compute_the_whole_layers_for_each_processs_own_tokens():
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(2, os.path.join(folder, "init"), results), nprocs=2, join=True, start_method="spawn")
    assert [results[rank]["local rows"] for rank in (0, 1)] == [(501, 501), (500, 500)]
    for rank in (0, 1):
        # the lookup is exact (one term is not zero); the logits are the same dot products, the hidden states'
        # gradient the same sum over the vocabulary in two halves: float64 rounding (helpers.EXACT_FP64)
        assert results[rank]["embedding equal"] and results[rank]["weight frozen"]
        assert results[rank]["logits"] <= EXACT_FP64 and results[rank]["gradient"] <= EXACT_FP64
