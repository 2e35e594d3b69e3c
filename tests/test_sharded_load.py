"""train.distributed=fsdp on 2 gloo processes with the sharded loading (training/sharded_load.py): no process holds
the whole base, each reads its slices of the checkpoint, and the model is the one a single process builds."""

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import EXACT_FP64, REPO
from milora_cli import shards
from milora_cli.errors import ModelError
from milora_cli.training import sharded_load
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
    """With validation and held-out generation, in float64 (the equalities are exact in exact arithmetic, and
    differ only in the order of sums: fsdp's vocabulary-parallel head sums a hidden state's gradient over the
    vocabulary in two halves, one process sums 4 examples where two sum 2 + 2; helpers.EXACT_FP64 says what
    bounds that rounding)."""
    def recipe(out: Path, **train) -> Path:
        raw = tiny_recipe(untied_model_dir, tiny_data, out, "fp64", eval_every=3, **train)
        raw["eval"] = {"heldout": 4, "batch_size": 2, "max_new_tokens": 4}
        return write_recipe(tmp_path / f"{out.name}.yaml", raw)
    one, fsdp, ddp = tmp_path / "one", tmp_path / "fsdp", tmp_path / "ddp"
    _launch(1, "-m", "milora_cli", "train", str(recipe(one, micro_batch_size=4)))
    torchrun(recipe(fsdp, micro_batch_size=2, distributed="fsdp"))
    torchrun(recipe(ddp, micro_batch_size=2, distributed="ddp"))
    assert max_rel_diff(factors(fsdp / "adapter"), factors(ddp / "adapter")) <= EXACT_FP64
    assert max_rel_diff(factors(fsdp / "adapter"), factors(one / "adapter")) <= EXACT_FP64
    for name in ("heldout_before.jsonl", "heldout_after.jsonl"):
        assert [r.get("generation") for r in lines(fsdp / name)] == [r.get("generation") for r in lines(ddp / name)]
    val = [[r["val_loss"] for r in lines(run / "metrics.jsonl") if "val_loss" in r] for run in (fsdp, ddp)]
    assert len(val[0]) == 1 and val[0] == pytest.approx(val[1], rel=EXACT_FP64)


def test_fsdp_with_a_quantized_base_is_refused_in_a_real_launch_before_any_model_loads(tiny_model_dir, tiny_data, tmp_path):
    raw = tiny_recipe(tiny_model_dir, tiny_data, tmp_path / "run", distributed="fsdp")
    raw["model"] |= {"quantize": "nf4", "dtype": "bf16"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "milora_cli", "train",
               str(write_recipe(tmp_path / "r.yaml", raw))]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    # torchrun itself exits 1 when a worker fails and prints its own summary; each worker exits 2 with one line
    assert result.returncode != 0 and result.stderr.count("exitcode  : 2") + result.stderr.count("exitcode : 2") >= 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("model.quantize=nf4 with train.distributed=fsdp" in line for line in errors)
    assert "[rank0]: Traceback" not in result.stderr and "Loading weights" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_of_one_process_train_the_adapter_of_one_launcher_of_two(tiny_model_dir, tiny_data, tmp_path):
    """Multi-node as a cluster runs it (c10d rendezvous, one launcher per node), both nodes on 127.0.0.1."""
    def recipe(out: Path) -> Path:
        raw = tiny_recipe(tiny_model_dir, tiny_data, out, micro_batch_size=2, distributed="fsdp", eval_every=None)
        return write_recipe(tmp_path / f"{out.name}.yaml", raw)
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    torchrun(recipe(single))
    endpoint = f"127.0.0.1:{_free_port()}"
    launchers = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                   "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--node-rank", str(node),
                                   "-m", "milora_cli", "train", str(recipe(nodes))],
                                  cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "fsdp: " in outputs[0][0] + outputs[1][0] and "of 2 processes" in outputs[0][0] + outputs[1][0]
    # the same 2 ranks compute the same ops on the same values, wherever their processes run
    expected, trained = factors(single / "adapter"), factors(nodes / "adapter")
    assert all(torch.equal(trained[name], expected[name]) for name in expected)
    assert [r["loss"] for r in lines(nodes / "metrics.jsonl") if "loss" in r] == [r["loss"] for r in lines(single / "metrics.jsonl") if "loss" in r]


def _slice_bytes(shape: tuple[int, ...], itemsize: int, rank: int, world: int) -> int:
    """Bytes of a rank's FSDP2 shard of a tensor: Shard(0), rows in chunks of ceil(rows / world) (torch.chunk's split)."""
    rows, chunk = shape[0], math.ceil(shape[0] / world)
    return max(0, min(rows, (rank + 1) * chunk) - rank * chunk) * math.prod(shape[1:]) * itemsize


@pytest.mark.slow
def test_no_sharded_process_holds_the_whole_model_nor_reads_it(smollm2_path, tmp_path):
    """The ~200M model of benchmarks/sharded_memory.py (814 MB in fp32, 407 MB of bf16 in 5 shards) on 2 processes.

    Loading and initialising, and through a training step, a process holds its half of the base plus, at most,
    the bounds below. A step adds FSDP's working set (a unit is whole while it runs: the gathered buffer, the
    parameters copied out of it, its shard's copy), here for one linear layer (distributed.shard), never the
    embedding or the head (vocabulary-parallel), and the activations and logits of 80 tokens."""
    bench = _benchmark()
    model_dir = bench.save_model(tmp_path / "model", smollm2_path)
    runs = {(mode, steps): bench.measure(model_dir, tmp_path, mode, 2, steps) for mode, steps in (("fsdp", 0), ("fsdp", 1), ("ddp", 0))}
    tensors = shards.read_index(model_dir)
    whole = 4 * bench.n_parameters()  # fp32, the recipe's dtype
    largest = max(tensors.values(), key=lambda info: math.prod(info.shape))
    # 1. load + init: the half; the largest slice twice (its pages mapped, get_slice's copy); the decomposition of a
    # 1024 x 1024 target (bf16 read, fp32, fp64 copy, Gram, eigenvectors, eigh's workspace: < 6 fp64 copies); the
    # fp32 adapter state (A, B, A0, B0, gradients, 2 moments, the all-reduce buffer); 64 MiB for the tokenizer, the
    # data, the process group and Python's objects
    workspace = 6 * 8 * bench.HIDDEN**2  # the targets, q_proj and v_proj, are HIDDEN x HIDDEN
    adapter_state = 9 * 4 * len(bench.TARGETS) * bench.LAYERS * bench.RANK * 2 * bench.HIDDEN
    bound = whole / 2 + 2 * _slice_bytes(largest.shape, 2, 0, 2) + workspace + adapter_state + 64 * 2**20
    assert max(runs["fsdp", 0]["peaks"]) < bound < whole < min(runs["ddp", 0]["peaks"]), runs
    # 2. one training step: within the same bound (what loading held at once, the largest slice twice and a
    # decomposition, is gone; FSDP's 2.5 units of 11.5 MB and 80 tokens' activations and logits take its place)
    assert max(runs["fsdp", 1]["peaks"]) < bound, runs
    # 3. bytes read: each rank's rows of every tensor, and the targets it decomposes (round-robin over the layers)
    targets = [f"model.layers.{i}.self_attn.{name}.weight" for i in range(bench.LAYERS) for name in bench.TARGETS]
    for rank in (0, 1):
        own = sum(shards.nbytes((name, "BF16", tensors[name].shape)) for name in targets[rank::2])
        expected = sum(_slice_bytes(info.shape, 2, rank, 2) for info in tensors.values()) + own
        assert runs["fsdp", 0]["bytes_read"][rank] == expected
        assert expected == whole / 4 + own  # half the bf16 checkpoint (every tensor's rows are even), its own targets



def test_a_checkpoint_without_the_models_names_is_one_line_before_any_read(tiny_model_dir, tmp_path):
    """A config.json that asks for a third layer the safetensors do not hold: named, before a byte of weights is read."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    model = sharded_load.empty_model(str(folder), "fp32", False, "sdpa")
    assert all(param.is_meta for param in model.parameters())  # nothing allocated: the base is built without storage
    with pytest.raises(ModelError, match=r"has 'model\.layers\.2\.self_attn\.q_proj\.weight' absent, the model built from its "
                                         r"config\.json needs \[32, 32\]"):
        sharded_load.load_shards(model, str(folder))


def test_sharded_adapter_state_holds_half_the_rows_on_each_process(untied_model_dir, tiny_data, tmp_path):
    """After a training step under fsdp on 2 processes, every lora_A, lora_B, A0, B0, gradient and AdamW moment is a
    DTensor of which each process holds at most ceil(rows / 2) rows, every row on exactly one process (the worker of
    benchmarks/sharded_memory.py --adapter-state)."""
    raw = tiny_recipe(untied_model_dir, tiny_data, tmp_path / "run", distributed="fsdp", micro_batch_size=2)
    _launch(2, "benchmarks/sharded_memory.py", "--adapter-worker", str(write_recipe(tmp_path / "r.yaml", raw)), str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    tensors = [report["tensors"] for report in reports]
    assert len(tensors[0]) == 14 * (4 + 2 * 3)  # 14 layers: A, B, A0, B0, and the gradient and 2 moments of A and B
    for name, mine in tensors[0].items():
        theirs = tensors[1][name]
        assert mine["dtensor"] and theirs["dtensor"], f"{name} is whole on every process"
        assert max(mine["local_rows"], theirs["local_rows"]) <= math.ceil(mine["rows"] / 2), name
        assert mine["local_rows"] + theirs["local_rows"] == mine["rows"], name
    assert reports[0]["grad_norm"] == reports[1]["grad_norm"] > 0  # the global norm, the same number on both
