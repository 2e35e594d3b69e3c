"""`milora train`: recipe -> model -> adapters -> data -> the Accelerate loop -> checkpoints.

The loop owns its batching: the training examples form one stream of seeded per-epoch permutations,
and optimizer step k consumes the next G = world_size * accumulation * micro_batch examples. So the
data position of a run is just its step count, which makes resume exact, and 2 processes x b examples
see the same global batch as 1 process x 2b.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from rich.console import Console

from milora_cli import adapter, checkpoint, data, evaluate, models
from milora_cli.errors import RecipeError
from milora_cli.recipe import Recipe, dump_recipe
from milora_cli.runlog import MetricsLog, Progress, versions

# Architectures whose logits are exactly lm_head(last hidden state): the loss then projects only the
# label positions onto the vocabulary instead of every prompt and padding position.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3"}


class CausalLMLoss(torch.nn.Module):
    """Sum of next-token cross-entropies over label positions, and their count."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.plain_head = getattr(model.config, "model_type", None) in _PLAIN_HEAD

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        targets = labels[:, 1:]  # (B, T-1)
        keep = targets != -100  # (B, T-1)
        if self.plain_head:
            hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = self.model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][keep])  # (N, V)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()


def learning_rate(step: int, recipe: Recipe, max_steps: int) -> float:
    """The lr of optimizer step `step` (0-based)."""
    cfg = recipe.train
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

    def __init__(self, n_examples: int, seed: int, micro: int, accumulation: int, rank: int, world: int):
        self.n, self.seed, self.micro, self.accumulation, self.rank, self.world = n_examples, seed, micro, accumulation, rank, world
        self.global_batch = micro * accumulation * world
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(self._order[position % self.n])

    def step(self, k: int) -> list[list[int]]:
        indices = [self._index(k * self.global_batch + i) for i in range(self.global_batch)]
        slots = [j * self.world + self.rank for j in range(self.accumulation)]  # micro-batch j of this rank
        return [indices[s * self.micro : (s + 1) * self.micro] for s in slots]


@dataclass
class Setup:
    """What the loop works on, built once from the recipe."""

    model: Any
    tokenizer: Any
    adapters: dict[str, adapter.MiloraLinear]
    train_set: data.TokenizedDataset
    val_set: data.TokenizedDataset
    val_examples: list[data.Example]
    model_path: str


def build(recipe: Recipe, device: torch.device | str) -> Setup:
    """Load the model and tokenizer, inject adapters (not yet initialised), tokenise the data."""
    path = models.resolve(recipe.model.name_or_path)
    tokenizer = models.load_tokenizer(path, recipe.model.revision, recipe.model.trust_remote_code)
    model = models.load_model(path, recipe.model.dtype, recipe.model.revision, recipe.model.trust_remote_code, device)
    names = adapter.find_targets(model, recipe.adapter.target_modules)
    adapters = adapter.inject(model, names, recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.dropout)
    train_examples, val_examples = data.load_records(recipe.data, recipe.train.seed)
    args = (tokenizer, recipe.data.max_length, recipe.data.train_on_prompt)
    train_set, val_set = data.build_dataset(train_examples, *args), data.build_dataset(val_examples, *args)
    if not train_set.examples:
        raise RecipeError("no training example has a response token left after truncation; raise data.max_length")
    return Setup(model, tokenizer, adapters, train_set, val_set, val_examples, path)


def describe(recipe: Recipe, console: Console) -> None:
    """`--dry-run`: the resolved recipe, one tokenised example with its label mask, parameter counts."""
    from rich.syntax import Syntax

    console.print(Syntax(dump_recipe(recipe), "yaml", theme="ansi_dark"))
    setup = build(recipe, "cpu")
    trainable, total = adapter.count_parameters(setup.model)
    console.print(_data_line(recipe, setup))
    console.print("first training example (dim: prompt, no loss; [bold green]green[/]: trained tokens):")
    console.print(data.render_label_mask(setup.tokenizer, setup.train_set.examples[0]))
    console.print(
        f"adapters on {len(setup.adapters)} layers; trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.3f}%)"
    )
    console.print("dry run: nothing trained, nothing written")


def _data_line(recipe: Recipe, setup: Setup) -> str:
    train_set = setup.train_set
    return (
        f"data: {len(train_set.examples)} training examples ({train_set.n_truncated} truncated to "
        f"{recipe.data.max_length} tokens, {train_set.n_dropped} dropped as all-prompt), "
        f"{len(setup.val_set.examples)} validation"
    )


def total_steps(recipe: Recipe, n_examples: int, global_batch: int) -> int:
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    return max(1, math.ceil(recipe.train.epochs * n_examples / global_batch))


def train(recipe: Recipe, console: Console | None = None) -> dict[str, Any]:
    """Run the recipe's training; returns a summary (steps, losses, held-out scores, paths)."""
    cfg = recipe.train
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True is what makes accelerate use gloo for a torchrun-launched job on a machine without CUDA.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)  # the frozen A0/B0 are equal on every rank
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    main = accelerator.is_main_process
    console = console if (console is not None and main) else Console(quiet=not main)
    run_dir = Path(recipe.output.dir)
    recipe_yaml = dump_recipe(recipe)
    resume_from = _claim_run_dir(run_dir, recipe_yaml, console)
    if resume_from == "complete":
        return {"complete": True, "run_dir": str(run_dir)}
    set_seed(cfg.seed)

    setup = build(recipe, accelerator.device)
    console.print(_data_line(recipe, setup))
    note = models.quantisation_note(setup.model_path)
    if note:
        console.print(f"[yellow]note:[/] {recipe.model.name_or_path}: {note}")
    start = time.perf_counter()
    adapter.initialise(setup.adapters, recipe.adapter.init, recipe.adapter.svd_dtype, cfg.seed)
    init_seconds = time.perf_counter() - start
    base_weights = {name: layer.base_layer.weight for name, layer in setup.adapters.items()}
    meta = {
        "init": recipe.adapter.init, "r": recipe.adapter.r, "lora_alpha": recipe.adapter.alpha,
        "scaling": recipe.adapter.alpha / recipe.adapter.r, "lora_dropout": recipe.adapter.dropout,
        "target_modules": list(setup.adapters), "base_model": recipe.model.name_or_path, "base_model_path": setup.model_path,
        "revision": recipe.model.revision, "base_dtype": recipe.model.dtype,
        "base_fingerprint": models.weights_fingerprint(base_weights), "versions": versions(),
    }
    trainable, total = adapter.count_parameters(setup.model)
    console.print(
        f"{recipe.adapter.init} init of {len(setup.adapters)} layers (r={recipe.adapter.r}) in {init_seconds:.1f} s on "
        f"{accelerator.device}; trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"
    )
    summary: dict[str, Any] = {"run_dir": str(run_dir), "init_seconds": init_seconds, "trainable": trainable, "total": total}
    scorer = data.scorer_for(recipe.data) or evaluate.contains_answer
    heldout = [ex for ex in setup.val_examples if ex.answer][: recipe.eval.heldout]

    def score(label: str) -> None:
        if heldout and main:
            accuracy, records = evaluate.heldout_accuracy(
                setup.model, setup.tokenizer, heldout, scorer, recipe.eval.max_new_tokens, recipe.eval.batch_size
            )
            summary[f"heldout_{label}"] = accuracy
            checkpoint.write_text_atomic(run_dir / f"heldout_{label}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
            console.print(f"held-out score {label} training: [bold]{100 * accuracy:.1f}%[/] ({len(heldout)} examples)")

    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        setup.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_module = CausalLMLoss(setup.model)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    stream = BatchStream(len(setup.train_set.examples), cfg.seed, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                         accelerator.process_index, accelerator.num_processes)
    max_steps = total_steps(recipe, len(setup.train_set.examples), stream.global_batch)
    step, best = 0, math.inf
    if isinstance(resume_from, Path):
        step, best = _resume(resume_from, setup, optimizer, accelerator)
        console.print(f"resumed from {resume_from} at step {step}")
    else:
        score("before")
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    collate = data.Collator(setup.tokenizer.pad_token_id)
    log = MetricsLog(run_dir, step if isinstance(resume_from, Path) else None, recipe.output.tensorboard) if main else None

    def save(kind: str, val_loss: float | None = None) -> None:
        accelerator.wait_for_everyone()
        if not main:
            return
        trained, initial = adapter.adapter_tensors(setup.adapters)
        final = {"best": run_dir / "best", "final": run_dir / "adapter"}.get(kind, run_dir / "checkpoints" / f"step-{step:06d}")
        with checkpoint.atomic_folder(final) as folder:
            checkpoint.write_adapter(folder, trained, initial, {**meta, "step": step, "val_loss": val_loss}, recipe_yaml)
            if kind == "periodic":
                rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
                checkpoint.write_training_state(folder, optimizer.optimizer, {"step": step, "best_val_loss": best}, rng)
        if kind == "periodic":
            checkpoint.prune(run_dir, cfg.keep_checkpoints)

    def validate() -> float:
        return validation_loss(loss_module, setup.val_set, collate, cfg.micro_batch_size, accelerator)

    interrupted = _interrupt_flag()
    progress = Progress(console, max_steps, start_step=step, enabled=main)
    window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.perf_counter()
    loss_module.train()
    with progress:
        while step < max_steps:
            micro = [collate([setup.train_set.examples[i] for i in part]) for part in stream.step(step)]
            micro = [{key: value.to(accelerator.device) for key, value in batch.items()} for batch in micro]
            n_tokens = accelerator.reduce(sum(b["labels"][:, 1:].ne(-100).sum() for b in micro), "sum").item()
            lr = learning_rate(step, recipe, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=accelerator.device)
            for j, batch in enumerate(micro):
                # Normalise by the label tokens of the whole global batch, so accumulation and the
                # number of processes do not change the gradient (DDP averages over processes).
                sync = nullcontext() if j == len(micro) - 1 else accelerator.no_sync(loss_module)
                with sync, accelerator.autocast():
                    loss_sum, _ = loss_module(**batch)
                    accelerator.backward(loss_sum * accelerator.num_processes / n_tokens)
                step_loss += loss_sum.detach()
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.advance(step)
            window_loss += accelerator.reduce(step_loss, "sum").item()
            window_tokens += n_tokens
            window_seen += sum(int(b["attention_mask"].sum()) for b in micro) * accelerator.num_processes
            if step == 1 or step % cfg.log_every == 0 or step == max_steps:
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "loss": window_loss / window_tokens, "lr": lr,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None,
                          "tokens_per_s": window_seen / elapsed, "epoch": step * stream.global_batch / stream.n}
                if log:
                    log.write(record)
                progress.update(step, record)
                window_loss, window_tokens, window_seen, window_start = 0.0, 0, 0, time.perf_counter()
            if setup.val_set.examples and cfg.eval_every and (step % cfg.eval_every == 0 or step == max_steps):
                val_loss = validate()
                if log:
                    log.write({"step": step, "val_loss": val_loss})
                progress.note(f"step {step}: validation loss {val_loss:.4f}")
                if val_loss < best:
                    best = val_loss
                    save("best", val_loss)
            if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
                save("periodic")
            if interrupted(accelerator) and step < max_steps:
                save("periodic")
                console.print(f"[yellow]interrupted:[/] checkpoint at step {step}; run the same command again to resume")
                raise SystemExit(130)
    save("final")
    if log:
        log.close()
    summary |= {"steps": step, "best_val_loss": best if best < math.inf else None}
    score("after")
    if main:
        checkpoint.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        console.print(f"adapter written to [bold]{run_dir / 'adapter'}[/]")
    return summary


@torch.no_grad()
def validation_loss(loss_module, val_set: data.TokenizedDataset, collate, micro: int, accelerator: Accelerator) -> float:
    """Mean token loss over the validation set, each process scoring its own share."""
    was_training = loss_module.training
    loss_module.eval()
    total = torch.zeros(2, device=accelerator.device)
    share = val_set.examples[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(share), micro):
        batch = {k: v.to(accelerator.device) for k, v in collate(share[start : start + micro]).items()}
        with accelerator.autocast():
            loss_sum, count = loss_module(**batch)
        total += torch.stack([loss_sum.float(), count.float()])
    loss_module.train(was_training)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _claim_run_dir(run_dir: Path, recipe_yaml: str, console: Console) -> Path | str | None:
    """Start, resume or refuse: a run dir belongs to one recipe. Returns None, a checkpoint, or 'complete'."""
    saved = run_dir / "recipe.yaml"
    if saved.is_file():
        if saved.read_text() != recipe_yaml:
            raise RecipeError(
                f"output.dir {run_dir} holds a run of a different recipe; choose another output.dir (or resume with its own {saved})"
            )
        if (run_dir / "adapter" / checkpoint.META_FILE).is_file():
            console.print(f"{run_dir} already holds this run, complete; to train it again, add output.dir=NEW_DIR")
            return "complete"
        found = checkpoint.training_checkpoints(run_dir)
        if found:
            return found[-1]
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomic(saved, recipe_yaml)
    checkpoint.write_text_atomic(run_dir / "versions.json", json.dumps(versions(), indent=2))
    return None


def _resume(folder: Path, setup: Setup, optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> tuple[int, float]:
    trained, initial, _ = checkpoint.read_adapter(folder)
    adapter.load_adapter_tensors(setup.adapters, trained, initial)
    state, rng = checkpoint.read_training_state(folder, optimizer)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"], state["best_val_loss"]


def _interrupt_flag():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so a checkpoint is whole."""
    hit = {"signal": False}

    def handler(signum, frame):
        if hit["signal"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        hit["signal"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)

    def interrupted(accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return hit["signal"]
        # Every process must stop at the same step, or the others would wait forever in a collective.
        flag = torch.tensor(float(hit["signal"]), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    return interrupted
