"""train.distributed=fsdp on 2 gloo processes with the sharded loading (training/sharded_load.py): no process holds
the whole base, each reads its slices of the checkpoint, and the model is the one a single process builds."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import REPO
from milora_cli import shards
from test_distributed import lines, torchrun, write_recipe
from test_train import factors, max_rel_diff, tiny_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}


def _benchmark():
    """benchmarks/sharded_memory.py: the ~200M model, the recipe and the measure the benchmark runs."""
    spec = importlib.util.spec_from_file_location("sharded_memory", REPO / "benchmarks" / "sharded_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny seeded Llama with an untied head and SmolLM2's tokenizer, saved in bf16 in 3 or more shards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from milora_cli import models

    folder = tmp_path_factory.mktemp("untied-llama")
    tokenizer = models.load_tokenizer(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="2MB")
    tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return str(folder)


def _launch(processes: int, script: str, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), script, *args]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sharded_init_has_the_factors_and_logits_of_one_unsharded_process(untied_model_dir, tiny_data, tmp_path):
    """The same build and initialise as `milora train`: sharded on 2 processes, unsharded on 1 (world 1 never shards).
    Both decompose the same bytes with the same code in one thread, and the sharded forward runs the same ops on
    all-gathered copies of the same weights, so the factors and the logits are equal bit for bit."""
    raw = tiny_recipe(untied_model_dir, tiny_data, tmp_path / "run", distributed="fsdp", max_steps=0)
    raw["adapter"]["cache_factors"] = False  # each run decomposes
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    one, two = tmp_path / "one", tmp_path / "two"
    for folder, processes in ((one, 1), (two, 2)):
        folder.mkdir()
        _launch(processes, "tests/sharded_worker.py", str(recipe), str(folder))
    reference, sharded = load_file(one / "rank0.safetensors"), [load_file(two / f"rank{r}.safetensors") for r in (0, 1)]
    assert len(reference) == 2 + 2 * 14  # logits, ids, A0 and B0 of the 14 linear layers
    for rank in sharded:
        assert all(torch.equal(rank[name], reference[name]) for name in reference), "factors or logits differ"
    metadata = []
    for path in (one / "rank0.safetensors", two / "rank0.safetensors", two / "rank1.safetensors"):
        with safe_open(str(path), "pt") as opened:
            metadata.append(opened.metadata())
    assert len({m["fingerprint"] for m in metadata}) == 1  # sampled by each weight's reader, shared: the same
    assert metadata[0]["sharded"] == "None" and "of 2 processes" in metadata[1]["sharded"]


def test_two_sharded_processes_train_as_ddp_and_as_one_process(untied_model_dir, tiny_data, tmp_path):
    def recipe(out: Path, **train) -> Path:
        return write_recipe(tmp_path / f"{out.name}.yaml", tiny_recipe(untied_model_dir, tiny_data, out, eval_every=None, **train))
    one, fsdp, ddp = tmp_path / "one", tmp_path / "fsdp", tmp_path / "ddp"
    _launch(1, "-m", "milora_cli", "train", str(recipe(one, micro_batch_size=4)))
    torchrun(recipe(fsdp, micro_batch_size=2, distributed="fsdp"))
    torchrun(recipe(ddp, micro_batch_size=2, distributed="ddp"))
    # FSDP and DDP compute the same ops on the same values per rank; DDP averages gradients as a/2 + b/2, FSDP's
    # adapters as (a + b)/2: equal in floating point (halving is exact), so the adapters are equal bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(factors(fsdp / "adapter").values(), factors(ddp / "adapter").values(), strict=True))
    # One process sums each gradient over 4 examples in one pass where 2 processes sum 2 + 2: fp32 sums in another
    # order, each within n * 2^-24 relative of exact (n <= 256 terms: 1.5e-5 at most, ~1e-6 typically), over 3 steps.
    assert max_rel_diff(factors(fsdp / "adapter"), factors(one / "adapter")) <= 1e-5
