"""`milora train`: recipe -> model -> adapters -> data -> the Accelerate loop -> checkpoints.

The step math (loss, batching, schedule) lives in loop.py; this module reads top to bottom: claim the
run folder, build, initialise, score before, train with validation and checkpoints, score after.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from rich.console import Console

from milora_cli import adapter, checkpoint, data, evaluate, init_cache, models, quantize, suite
from milora_cli.loop import BatchStream, CausalLMLoss, learning_rate, optimizer_step, validation_loss
from milora_cli.errors import RecipeError
from milora_cli.recipe import Recipe, dump_recipe, validate
from milora_cli.runlog import MetricsLog, Progress, versions


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


def build(recipe: Recipe, device: torch.device | str, distributed: str = "NO") -> Setup:
    """Load the model and tokenizer, inject adapters (not yet initialised), tokenise the data."""
    cfg = recipe.model
    quantize.check(cfg.quantize, cfg.dtype, torch.device(device).type, distributed)
    path = models.resolve(cfg.name_or_path)
    tokenizer = models.load_tokenizer(path, cfg.revision, cfg.trust_remote_code)
    model = quantize.load_model(path, cfg.dtype, cfg.quantize, cfg.revision, cfg.trust_remote_code, device)
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
    accelerator = _accelerator(cfg.mixed_precision)
    main = accelerator.is_main_process
    console = console if (console is not None and main) else Console(quiet=not main)
    run_dir = Path(recipe.output.dir)
    recipe_yaml = dump_recipe(recipe)
    # 1. the run folder: a fresh run, a resume, or nothing left to do
    resume_from = _claim_run_dir(run_dir, recipe_yaml, console)
    if resume_from == "complete":
        return {"complete": True, "run_dir": str(run_dir)}
    set_seed(cfg.seed)
    # 2. model, adapters, data, initial factors; a fresh run folder is written only once they load
    setup = build(recipe, accelerator.device, accelerator.distributed_type.value)
    if resume_from is None:
        _start_run_dir(run_dir, recipe_yaml)
    console.print(_data_line(recipe, setup))
    meta, summary = _initialise(recipe, setup, accelerator, console)
    saver = Saver(run_dir, setup.adapters, {**meta, "versions": versions()}, recipe_yaml, accelerator, cfg.keep_checkpoints)
    scorer = HeldoutScorer(recipe, setup, run_dir, console, summary, enabled=main)
    benchmarks = suite.TrainingBenchmarks(recipe.eval, setup.model, setup.tokenizer, run_dir, console, enabled=main)
    # 3. optimizer, batches, steps; resume or score the untrained model
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        setup.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        _compile_layers(setup.model)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    stream = BatchStream(len(setup.train_set.examples), cfg.seed, cfg.micro_batch_size, cfg.gradient_accumulation_steps,
                         accelerator.process_index, accelerator.num_processes)
    max_steps = total_steps(recipe, len(setup.train_set.examples), stream.global_batch)
    step, best = 0, math.inf
    if isinstance(resume_from, Path):
        step, best = _resume(resume_from, setup, optimizer)
        console.print(f"resumed from {resume_from} at step {step}")
    else:
        scorer.score("before")
    loss_module, optimizer = accelerator.prepare(CausalLMLoss(setup.model), optimizer)
    collate = data.Collator(setup.tokenizer.pad_token_id)
    log = MetricsLog(run_dir, step if isinstance(resume_from, Path) else None, recipe.output.tensorboard) if main else None
    # 4. the loop: a step, its log line, validation and the best adapter, periodic checkpoints
    window = Window()
    loss_module.train()
    with Progress(console, max_steps, start_step=step, enabled=main) as progress, _interrupt_flag() as interrupted:
        while step < max_steps:
            micro = [collate([setup.train_set.examples[i] for i in part]) for part in stream.step(step)]
            micro = [{key: value.to(accelerator.device) for key, value in batch.items()} for batch in micro]
            lr = learning_rate(step, recipe, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, n_tokens, grad_norm = optimizer_step(loss_module, micro, accelerator, params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.advance(step)
            window.add(accelerator.reduce(step_loss, "sum").item(), n_tokens,
                       sum(int(b["attention_mask"].sum()) for b in micro) * accelerator.num_processes)
            if step == 1 or step % cfg.log_every == 0 or step == max_steps:
                record = {"step": step, **window.flush(), "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                          "epoch": step * stream.global_batch / stream.n}
                if log:
                    log.write(record)
                progress.update(step, record)
            if setup.val_set.examples and cfg.eval_every and (step % cfg.eval_every == 0 or step == max_steps):
                val_loss = validation_loss(loss_module, setup.val_set, collate, cfg.micro_batch_size, accelerator)
                if log:
                    log.write({"step": step, "val_loss": val_loss})
                progress.note(f"step {step}: validation loss {val_loss:.4f}")
                if val_loss < best:
                    best = val_loss
                    saver.save("best", step, val_loss=val_loss)
            benchmarks.at_step(step, max_steps)
            if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
                saver.save("periodic", step, optimizer=optimizer.optimizer, best=best)
            if interrupted(accelerator) and step < max_steps:
                saver.save("periodic", step, optimizer=optimizer.optimizer, best=best)
                console.print(f"[yellow]interrupted:[/] checkpoint at step {step}; run the same command again to resume")
                raise SystemExit(130)
    # 5. the final adapter, the held-out score after training, the summary
    saver.save("final", step)
    if log:
        log.close()
    summary |= {"steps": step, "best_val_loss": best if best < math.inf else None}
    scorer.score("after")
    benchmarks.after_training(step, summary)
    if main:
        checkpoint.write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        console.print(f"adapter written to [bold]{run_dir / 'adapter'}[/]")
    return summary


def _compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer in place (parameter names, checkpoints and hooks unchanged).

    Per layer rather than the whole model: the layers share their code, so one compilation serves all of
    them; dynamic shapes, because batches differ in length.
    """
    for layer in model.get_decoder().layers:
        layer.compile(dynamic=True)


def _accelerator(mixed_precision: str) -> Accelerator:
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True is what makes accelerate use gloo for a torchrun-launched job on a machine without CUDA.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)  # the frozen A0/B0 are equal on every rank
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def _initialise(recipe: Recipe, setup: Setup, accelerator: Accelerator, console: Console) -> tuple[dict, dict]:
    """Set the initial factors on the model's device; return the adapter metadata and a summary."""
    note = models.quantisation_note(setup.model_path)
    if note:
        console.print(f"[yellow]note:[/] {recipe.model.name_or_path}: {note}")
    model_cfg = recipe.model
    if model_cfg.quantize != "none":
        console.print(f"{model_cfg.quantize} base: the initial factors come from the full-precision weights of {setup.model_path}")
    start = time.perf_counter()
    weights = quantize.full_precision_weights(setup.adapters, model_cfg.quantize, setup.model_path, model_cfg.revision, model_cfg.dtype)
    report = init_cache.initialise(setup.adapters, recipe.adapter, recipe.train.seed, recipe.adapter.cache_factors,
                                   accelerator.process_index, accelerator.num_processes, weights)
    seconds = time.perf_counter() - start
    trainable, total = adapter.count_parameters(setup.model)
    console.print(
        f"{recipe.adapter.init} init of {len(setup.adapters)} layers (r={recipe.adapter.r}) in {seconds:.1f} s on "
        f"{accelerator.device}{report.describe(accelerator.num_processes)}; "
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)"
    )
    meta = {
        "init": recipe.adapter.init, "r": recipe.adapter.r, "lora_alpha": recipe.adapter.alpha,
        "scaling": recipe.adapter.alpha / recipe.adapter.r, "lora_dropout": recipe.adapter.dropout,
        "target_modules": list(setup.adapters), "base_model": recipe.model.name_or_path,
        "base_model_path": setup.model_path, "revision": recipe.model.revision, "base_dtype": recipe.model.dtype,
        "base_quantize": model_cfg.quantize, "base_fingerprint": models.weights_fingerprint(weights),
    }
    summary = {"run_dir": recipe.output.dir, "init_seconds": seconds, "init_decomposed": report.computed,
               "init_from_cache": report.cached, "trainable": trainable, "total": total}
    return meta, summary


class Window:
    """Token-weighted loss and throughput since the last log line."""

    def __init__(self):
        self.loss, self.tokens, self.seen, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss_sum: float, label_tokens: int, input_tokens: int) -> None:
        self.loss, self.tokens, self.seen = self.loss + loss_sum, self.tokens + label_tokens, self.seen + input_tokens

    def flush(self) -> dict[str, float]:
        report = {"loss": self.loss / self.tokens, "tokens_per_s": self.seen / (time.perf_counter() - self.start)}
        self.__init__()
        return report


class Saver:
    """Writes adapter folders (final, best, periodic with training state) on the main process only."""

    def __init__(self, run_dir: Path, adapters, meta: dict, recipe_yaml: str, accelerator: Accelerator, keep: int):
        self.run_dir, self.adapters, self.meta, self.recipe_yaml = run_dir, adapters, meta, recipe_yaml
        self.accelerator, self.keep = accelerator, keep

    def save(self, kind: str, step: int, val_loss: float | None = None, optimizer=None, best: float | None = None) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        trained, initial = adapter.adapter_tensors(self.adapters)
        final = {"best": self.run_dir / "best", "final": self.run_dir / "adapter"}.get(kind, self.run_dir / "checkpoints" / f"step-{step:06d}")
        with checkpoint.atomic_folder(final) as folder:
            checkpoint.write_adapter(folder, trained, initial, {**self.meta, "step": step, "val_loss": val_loss}, self.recipe_yaml)
            if kind == "periodic":
                rng = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
                checkpoint.write_training_state(folder, optimizer, {"step": step, "best_val_loss": best}, rng)
        if kind == "periodic":
            checkpoint.prune(self.run_dir, self.keep)


class HeldoutScorer:
    """The held-out generation score before and after training (eval.heldout examples of the validation split)."""

    def __init__(self, recipe: Recipe, setup: Setup, run_dir: Path, console: Console, summary: dict, enabled: bool):
        self.recipe, self.setup, self.run_dir, self.console, self.summary = recipe, setup, run_dir, console, summary
        self.examples = [ex for ex in setup.val_examples if ex.answer][: recipe.eval.heldout] if enabled else []
        self.scorer = data.scorer_for(recipe.data) or evaluate.contains_answer

    def score(self, label: str) -> None:
        if not self.examples:
            return
        cfg = self.recipe.eval
        accuracy, records = evaluate.heldout_accuracy(
            self.setup.model, self.setup.tokenizer, self.examples, self.scorer, cfg.max_new_tokens, cfg.batch_size
        )
        self.summary[f"heldout_{label}"] = accuracy
        checkpoint.write_text_atomic(self.run_dir / f"heldout_{label}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        self.console.print(f"held-out score {label} training: [bold]{100 * accuracy:.1f}%[/] ({len(self.examples)} examples)")


def _claim_run_dir(run_dir: Path, recipe_yaml: str, console: Console) -> Path | str | None:
    """Start, resume or refuse: a run dir belongs to one recipe. Returns None (start), a checkpoint, or 'complete'.

    Writes nothing: a recipe that then fails to load its model or data leaves no folder that would refuse
    the next, corrected recipe.
    """
    saved = run_dir / "recipe.yaml"
    if saved.is_file():
        if _resolved(saved.read_text()) != recipe_yaml:
            raise RecipeError(
                f"output.dir {run_dir} holds a run of a different recipe; choose another output.dir (or resume with its own {saved})"
            )
        if (run_dir / "adapter" / checkpoint.META_FILE).is_file():
            console.print(f"{run_dir} already holds this run, complete; to train it again, add output.dir=NEW_DIR")
            return "complete"
        found = checkpoint.training_checkpoints(run_dir)
        if found:
            return found[-1]
    return None


def _start_run_dir(run_dir: Path, recipe_yaml: str) -> None:
    """A fresh run's folder: its resolved recipe (which claims the folder) and the library versions."""
    checkpoint.write_text_atomic(run_dir / "recipe.yaml", recipe_yaml)
    checkpoint.write_text_atomic(run_dir / "versions.json", json.dumps(versions(), indent=2))


def _resolved(recipe_yaml: str) -> str | None:
    """A saved recipe with today's defaults filled in, so a key added since does not orphan a run."""
    try:
        return dump_recipe(validate(yaml.safe_load(recipe_yaml) or {}))
    except (RecipeError, yaml.YAMLError):
        return None


def _resume(folder: Path, setup: Setup, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    trained, initial, _ = checkpoint.read_adapter(folder)
    adapter.load_adapter_tensors(setup.adapters, trained, initial)
    state, rng = checkpoint.read_training_state(folder, optimizer)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"], state["best_val_loss"]


@contextmanager
def _interrupt_flag():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so a checkpoint is whole."""
    hit = {"signal": False}

    def handler(signum, frame):
        if hit["signal"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        hit["signal"] = True

    def interrupted(accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return hit["signal"]
        # Every process must stop at the same step, or the others would wait forever in a collective.
        flag = torch.tensor(float(hit["signal"]), device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
