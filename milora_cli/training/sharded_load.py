"""A sharded base that no process ever holds whole (`train.distributed=fsdp`, N > 1 processes).

1. The model is built from its config with its parameters on the meta device (accelerate's
   init_empty_weights: no storage; buffers such as the rotary inv_freq are computed for real, from the
   config, as from_pretrained computes them), and the adapters are injected.
2. The model is sharded (distributed.shard: the embedding and head split by vocabulary rows, FSDP2 units per
   adapter factor, linear layer and decoder layer), still on meta.
3. Each process allocates only its own shards (to_empty) and reads only its own slice of every base
   weight from the safetensors files: torch.distributed.checkpoint's load with its HuggingFaceStorageReader,
   which plans each process's slices from the DTensors' placements and reads each one with safetensors'
   get_slice. (set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True), the other documented
   route, has rank 0 read and hold every full tensor; torchtune's distribute_tensor from memory-mapped full
   tensors has every process map every tensor.)
4. Nothing is left on meta (checked): the adapter factors (sharded as well) are set after, by init_cache from
   the checkpoint.

A tied output embedding is the same Parameter as the input one (transformers ties them as it builds the
model), sharded and loaded once.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException

from milora_cli import adapter, dtypes, models, shards
from milora_cli.errors import ModelError, first_line
from milora_cli.recipe import AdapterConfig, ModelConfig
from milora_cli.training import distributed


def sharded_model(path: str, model_cfg: ModelConfig, adapter_cfg: AdapterConfig, device: torch.device | str,
                  trust_remote_code: bool = False) -> tuple[torch.nn.Module, dict[str, adapter.MiloraLinear], str, int]:
    """(model, adapters, the fsdp line, bytes this process read): the steps above. A collective.
    `trust_remote_code`: the command line's (the recipe key alone runs nothing)."""
    models.check_attention(model_cfg.attn_implementation, model_cfg.dtype, device)
    model = empty_model(path, model_cfg.dtype, trust_remote_code, model_cfg.attn_implementation)
    names = adapter.find_targets(model, adapter_cfg.target_modules)
    adapters = adapter.inject(model, names, adapter_cfg.r, adapter_cfg.alpha, adapter_cfg.dropout)
    adapter.set_trainable(adapters, adapter_cfg.init)
    line = distributed.shard(model, torch.device(device).type)
    materialise(model, device)
    bytes_read = load_shards(model, path)
    if model_cfg.dtype == "fp64":
        models.float64_norms(model)  # as models.load_model does for fp64
    return model, adapters, line, bytes_read


def empty_model(path: str, dtype: str, trust_remote_code: bool, attn_implementation: str) -> torch.nn.Module:
    """The model of the folder `path` with its parameters on the meta device and its buffers computed, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtypes.TORCH[dtype], attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"cannot build model '{path}': {first_line(error)}") from None
    model.tie_weights()  # from_config leaves a tied head untied (from_pretrained ties it once loaded)
    if (Path(path) / "generation_config.json").is_file():  # what from_pretrained also reads: eos ids, defaults
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def materialise(model: torch.nn.Module, device: torch.device | str) -> None:
    """Storage for this process's shards (and every tensor left on meta) on `device`; the buffers computed at
    build time kept (to_empty would leave them uninitialised)."""
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers() if not buffer.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)


def checkpoint_name(parameter: str) -> str:
    """The checkpoint's name of a base parameter of an adapted model: adapters wrap a layer as `base_layer`."""
    return parameter.replace(".base_layer.", ".")


def load_shards(model: torch.nn.Module, path: str) -> int:
    """Read this process's slice of every base parameter from the safetensors files of `path`; the bytes read.

    A collective: every process calls it. The adapter factors (sharded too) are left to init_cache.
    """
    reader = _CountingReader(path)
    state = {checkpoint_name(name): param for name, param in model.named_parameters() if not _is_factor(name)}
    _check_names_and_shapes(state, path)
    try:
        dcp.load(state, storage_reader=reader)
    except CheckpointException as error:  # the failures of every rank, each (exception, traceback): name the first
        cause = next(iter(error.failures.values()))[0]
        raise ModelError(f"cannot read the weights of '{path}': {type(cause).__name__}: {first_line(cause)}") from None
    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    assert not left, f"left on the meta device: {left[:3]}"
    return reader.bytes_read


def _check_names_and_shapes(state: dict[str, torch.Tensor], path: str) -> None:
    """Every parameter in the checkpoint with its shape (the safetensors headers alone): the reader would
    otherwise fail on an internal assertion."""
    saved = shards.read_index(Path(path))
    for name, param in state.items():
        info = saved.get(name)
        if info is None or info.shape != tuple(param.shape):
            seen = "absent" if info is None else f"of shape {list(info.shape)}"
            raise ModelError(f"the checkpoint of '{path}' has '{name}' {seen}, the model built from its config.json needs "
                             f"{list(param.shape)}: sharded loading reads the weights under the model's own names")


def _is_factor(name: str) -> bool:
    """lora_A, lora_B and the initial factors (lora_initial.A0, .B0): not in the base's checkpoint."""
    return any(f".{part}." in name for part in ("lora_A", "lora_B", "lora_initial"))


class _CountingReader(HuggingFaceStorageReader):
    """The library's reader, counting the bytes of the slices this process reads (exactly what it asks
    safetensors for: get_slice copies those bytes and no others out of the file's memory map)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bytes_read = 0

    def read_data(self, plan, planner):
        for item in plan.items:
            self.bytes_read += math.prod(item.lengths) * self.storage_data[item.storage_index].dtype.itemsize
        return super().read_data(plan, planner)
