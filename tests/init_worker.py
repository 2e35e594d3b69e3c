"""Run by tests/test_init_cache.py under torchrun: initialise the tiny model's adapters, save this rank's factors."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from milora_cli import adapter, models
from milora_cli.training import init_cache
from milora_cli.recipe import AdapterConfig

model_dir, out = sys.argv[1], Path(sys.argv[2])
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
model = models.load_model(model_dir, "fp32")
cfg = AdapterConfig(init="milora", r=4, target_modules="all-linear")
adapters = adapter.inject(model, adapter.find_targets(model, cfg.target_modules), cfg.r, cfg.alpha, 0.0)
report = init_cache.initialise(adapters, cfg, seed=0, use_cache=False, rank=rank, world=world)
_, initial = adapter.adapter_tensors(adapters)
save_file(initial, out / f"rank{rank}.safetensors")
(out / f"rank{rank}.json").write_text(json.dumps({"computed": report.computed, "mine": report.mine}))
# Both ranks reach teardown together: a rank that destroys its gloo group while the other still talks to it
# aborts now and then ("terminate called without an active exception", SIGABRT).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
