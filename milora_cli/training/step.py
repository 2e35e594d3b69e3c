"""One optimizer step's math: the loss, the batching stream, the learning rate, validation loss.

The loop owns its batching: the training examples form one stream of seeded per-epoch permutations,
and optimizer step k consumes the next G = world_size * accumulation * micro_batch examples. So the
data position of a run is just its step count, which makes resume exact, and 2 processes x b examples
see the same global batch as 1 process x 2b.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from accelerate import Accelerator

from milora_cli import dtypes
from milora_cli.data import tokens
from milora_cli.evaluation.generate import eval_mode
from milora_cli.errors import RecipeError
from milora_cli.ranks import Ranks, my_batches
from milora_cli.recipe import Packing, TrainConfig

# Architectures whose logits are exactly lm_head(last hidden state): the loss then projects only the
# label positions onto the vocabulary instead of every prompt and padding position. transformers also
# masks their packed rows (position_ids restarting at 0 mark a new sequence) for sdpa, eager and flash
# attention, so examples packed into one row attend only to themselves.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3"}


def packs(choice: Packing, model: torch.nn.Module) -> bool:
    """Whether data.packing (auto, on, off) packs the micro-batches of `model`."""
    supported = getattr(model.config, "model_type", None) in _PLAIN_HEAD
    if choice == "on" and not supported:
        raise RecipeError(f"data.packing=on: model type '{model.config.model_type}' has no packed-sequence masks in milora; "
                          f"use data.packing=auto or off (packing supports {', '.join(sorted(_PLAIN_HEAD))})")
    return choice == "on" or (choice == "auto" and supported)


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropies over the label positions of a Batch (data/tokens.py)."""

    def __init__(self, model: torch.nn.Module, sharded: bool = False):
        super().__init__()
        self.model = model
        # A sharded model's root forward is what gathers its embeddings and head: call it whole.
        self.plain_head = getattr(model.config, "model_type", None) in _PLAIN_HEAD and not sharded

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        if self.plain_head:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state  # (B, T, H)
            logits = self.model.get_output_embeddings()(hidden.flatten(0, 1).index_select(0, positions))  # (N, V)
        else:
            logits = self.model(**inputs).logits.flatten(0, 1).index_select(0, positions)  # (N, V)
        return torch.nn.functional.cross_entropy(logits.to(dtypes.at_least_fp32(logits.dtype)), targets, reduction="sum")


def loss_inputs(batch: tokens.Batch) -> dict[str, torch.Tensor]:
    """CausalLMLoss's keyword arguments for a Batch already on the device."""
    return {**batch.inputs, "positions": batch.positions, "targets": batch.targets}


def learning_rate(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """The lr of optimizer step `step` (0-based)."""
    warmup = min(cfg.warmup_steps, max_steps)
    # 1) linear warmup from lr/warmup to lr
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    # 2) after warmup: constant, or decay to 0 at max_steps, linearly or on a half cosine
    progress = (step - warmup) / max(1, max_steps - warmup)
    decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
    return cfg.lr * decay[cfg.scheduler]


class BatchStream:
    """The examples of optimizer step k, split into this process's micro-batches."""

    def __init__(self, n_examples: int, *, seed: int, micro: int, accumulation: int, rank: int, world: int):
        self.n, self.seed, self.micro, self.accumulation, self.rank, self.world = n_examples, seed, micro, accumulation, rank, world
        self.global_batch = micro * accumulation * world
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._order[position % self.n])

    def global_indices(self, k: int) -> list[int]:
        """The examples of step k over all processes."""
        return [self._index(k * self.global_batch + i) for i in range(self.global_batch)]

    def step(self, k: int) -> list[list[int]]:
        indices = self.global_indices(k)
        slots = [j * self.world + self.rank for j in range(self.accumulation)]  # micro-batch j of this rank
        return [indices[s * self.micro : (s + 1) * self.micro] for s in slots]



def optimizer_step(loss_module, micro: list[tokens.Batch], accelerator: Accelerator, params, max_grad_norm: float | None,
                   n_targets: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward/backward over this process's micro-batches of one step, then clip; returns (summed token loss of
    this process, on the device; gradient norm or None).

    The loss is normalised by `n_targets`, the label tokens of the whole global batch (counted on the CPU,
    so no process waits for another here): accumulation and the number of processes do not change the
    gradient (DDP averages gradients over processes once, after the last micro-batch; under fsdp each
    micro-batch's backward reduce-scatters its mean over the processes into the sharded gradients, so no
    process holds a whole gradient). The norm is the global one over every shard (accelerate gathers the
    DTensor gradients' partial norms), the same number on every process.
    """
    step_loss = torch.zeros((), device=accelerator.device)
    for j, batch in enumerate(micro):
        sync = nullcontext() if j == len(micro) - 1 else accelerator.no_sync(loss_module)
        with sync, accelerator.autocast():
            loss_sum = loss_module(**loss_inputs(batch))
            accelerator.backward(loss_sum * accelerator.num_processes / n_targets)
        step_loss = step_loss + loss_sum.detach()  # float64 for a float64 model (not truncated in place)
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    return step_loss, grad_norm


@torch.no_grad()
def validation_loss(loss_module, val_set: tokens.TokenizedDataset, collate: tokens.Collator, micro: int, accelerator: Accelerator) -> float:
    """Mean token loss over the validation set: one process's batches shared out over the processes, the
    same number of forwards on each (ranks.my_batches), then one sum over the processes."""
    loss, count = torch.zeros((), device=accelerator.device), 0
    batches = [val_set.examples[start : start + micro] for start in range(0, len(val_set.examples), micro)]
    with eval_mode(loss_module):
        for index, keep in my_batches(len(batches), Ranks.of(accelerator)):
            batch = collate(batches[index]).to(accelerator.device)
            with accelerator.autocast():
                batch_loss = loss_module(**loss_inputs(batch))
            if keep:
                loss, count = loss + batch_loss, count + batch.targets.numel()
    total = accelerator.reduce(torch.stack([loss, torch.tensor(float(count), device=accelerator.device, dtype=loss.dtype)]), "sum")
    return (total[0] / total[1].clamp(min=1)).item()
