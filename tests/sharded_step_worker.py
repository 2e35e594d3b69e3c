"""Run by tests/test_sharded_load.py under torchrun: build and initialise a recipe's model as `milora train` does
(sharded under fsdp), take one optimizer step (step.optimizer_step, then AdamW), and write, for every adapter
tensor (lora_A, lora_B, A0, B0, the gradients and AdamW's two moments of those that train), whether it is a
DTensor, its rows and this process's rows."""

import json
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from rich.console import Console
from torch.distributed.tensor import DTensor

from milora_cli.recipe import validate
from milora_cli.training.build import build, initialise
from milora_cli.training.step import BatchStream, CausalLMLoss, optimizer_step
from milora_cli.training.train import collator

recipe, out = validate(yaml.safe_load(Path(sys.argv[1]).read_text())), Path(sys.argv[2])
accelerator = Accelerator(cpu=True)
rank, world = accelerator.process_index, accelerator.num_processes
setup = build(recipe, accelerator.device, world)
initialise(recipe, setup, accelerator, Console(quiet=True))
params = [param for param in setup.model.parameters() if param.requires_grad]
optimizer = torch.optim.AdamW(params, lr=recipe.train.lr)
examples = setup.train_set.examples
stream = BatchStream(len(examples), seed=0, micro=recipe.train.micro_batch_size, accumulation=1, rank=rank, world=world)
collate = collator(recipe, setup.model, setup.tokenizer.pad_token_id)
micro = [collate([examples[i] for i in part]) for part in stream.step(0)]
n_targets = sum(examples[i].n_targets for i in stream.global_indices(0))
_, grad_norm = optimizer_step(CausalLMLoss(setup.model, sharded=True), micro, accelerator, params, 1.0, n_targets)
grads = [param.grad for param in params]  # before the step: what the reduce-scatter left
optimizer.step()


def shape(tensor: torch.Tensor) -> dict:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return {"dtensor": isinstance(tensor, DTensor), "rows": tensor.shape[0], "local_rows": local.shape[0]}


report = {"grad_norm": float(grad_norm), "tensors": {}}
for name, layer in setup.adapters.items():
    for part, tensor in (("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight), ("A0", layer.lora_A0), ("B0", layer.lora_B0)):
        report["tensors"][f"{name}.{part}"] = shape(tensor)
        if tensor.requires_grad:
            report["tensors"][f"{name}.{part}.grad"] = shape(next(g for p, g in zip(params, grads, strict=True) if p is tensor))
            for moment in ("exp_avg", "exp_avg_sq"):
                report["tensors"][f"{name}.{part}.{moment}"] = shape(optimizer.state[tensor][moment])
(out / f"rank{rank}.json").write_text(json.dumps(report))
torch.distributed.barrier()  # both ranks reach teardown together (see init_worker.py)
torch.distributed.destroy_process_group()
