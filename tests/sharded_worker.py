"""Run by tests/test_sharded_load.py under torchrun: build and initialise a recipe's model as `milora train`
does (sharded under fsdp), then save rank 0's logits at init on fixed token ids and every rank's factors."""

import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from rich.console import Console
from safetensors.torch import save_file

from milora_cli import adapter
from milora_cli.recipe import validate
from milora_cli.training.build import build, initialise

recipe, out = validate(yaml.safe_load(Path(sys.argv[1]).read_text())), Path(sys.argv[2])
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
setup = build(recipe, accelerator.device, accelerator.num_processes)
meta, summary = initialise(recipe, setup, accelerator, Console(quiet=True))
ids = torch.randint(0, setup.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
with torch.no_grad():
    logits = setup.model(input_ids=ids).logits.contiguous()  # a collective under FSDP: every rank runs it
_, initial = adapter.adapter_tensors(setup.adapters)
save_file(initial | {"logits": logits, "ids": ids}, out / f"rank{rank}.safetensors",
          metadata={"fingerprint": meta["base_fingerprint"], "sharded": str(setup.sharded)})
torch.distributed.barrier()  # both ranks reach teardown together (see init_worker.py)
torch.distributed.destroy_process_group()
