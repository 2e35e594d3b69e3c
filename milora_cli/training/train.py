"""`milora train`: recipe -> model -> adapters -> data -> the Accelerate loop -> checkpoints.

The step math (loss, batching, schedule) lives in step.py; this module reads top to bottom: claim the
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
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from rich.console import Console

from milora_cli import runlock, terminal
from milora_cli.data import tokens
from milora_cli.models import UNTRUSTED, Trust
from milora_cli.errors import RecipeError
from milora_cli.ranks import Ranks
from milora_cli.recipe import Recipe, dump_recipe
from milora_cli.runlog import MetricsLog, Progress, versions
from milora_cli.training import distributed, run_dir, trackers
from milora_cli.training.benchmarks import TrainingBenchmarks
from milora_cli.training.build import Setup, build, data_line, initialise
from milora_cli.training.heldout import HeldoutScorer
from milora_cli.training.step import BatchStream, CausalLMLoss, learning_rate, optimizer_step, packs, validation_loss


def total_steps(recipe: Recipe, n_examples: int, global_batch: int) -> int:
    if recipe.train.max_steps is not None:
        return recipe.train.max_steps
    return max(1, math.ceil(recipe.train.epochs * n_examples / global_batch))


@dataclass
class Loop:
    """What the training loop advances, built once by _prepare."""

    recipe: Recipe
    setup: Setup
    accelerator: Accelerator
    loss_module: Any
    optimizer: Any
    params: list[torch.nn.Parameter]
    stream: BatchStream
    max_steps: int
    saver: run_dir.Saver
    benchmarks: TrainingBenchmarks
    log: MetricsLog | None
    step: int = 0
    best: float = math.inf


def train(recipe: Recipe, console: Console | None = None, resume_at: str | None = None, trust: Trust = UNTRUSTED) -> dict[str, Any]:
    """Run the recipe's training; returns a summary (steps, losses, held-out scores, paths).

    `resume_at`: run_dir.LATEST or a checkpoint folder (`--resume`); None resumes an existing run folder
    from its latest checkpoint if it has one, and starts otherwise. `trust`: what the command line allows (build).
    """
    trackers.check_installed(recipe.output.report_to)  # before the model loads
    accelerator = _accelerator(recipe.train.mixed_precision, recipe.model.dtype, recipe.output.report_to, Path(recipe.output.dir))
    ranks = Ranks.of(accelerator)
    console = console if (console is not None and ranks.main) else terminal.console(quiet=not ranks.main)
    with runlock.hold(Path(recipe.output.dir), ranks):  # one writer per run folder, for the whole run (runlock.py)
        return _train(recipe, accelerator, ranks, console, resume_at, trust)


def _train(recipe: Recipe, accelerator: Accelerator, ranks: Ranks, console: Console, resume_at: str | None, trust: Trust) -> dict[str, Any]:
    """train() with the run folder locked."""
    run = run_dir.RunDir(Path(recipe.output.dir), dump_recipe(recipe), ranks.main)
    accumulation = distributed.accumulation_steps(recipe.train, ranks.world)  # a bad global batch fails here
    # 1. the run folder: a fresh run, a resume, or nothing left to do
    resume_from = run.claim(console, resume_at)
    if resume_from == run_dir.COMPLETE:
        return {"complete": True, "run_dir": str(run.path)}
    set_seed(recipe.train.seed)
    # 2. model, adapters, data, initial factors; a fresh run folder is written only once they load
    setup = build(recipe, accelerator.device, ranks.world, trust, console)
    if resume_from is None:
        run.start()
    if setup.sharded:
        console.print(setup.sharded)
    console.print(data_line(recipe, setup))
    meta, summary = initialise(recipe, setup, accelerator, console)
    distributed.seed_rank(recipe.train.seed, ranks)  # after the shared init: dropout differs across ranks
    scorer = HeldoutScorer(recipe, setup.model, setup.tokenizer, setup.val_examples, run, console, ranks)
    # 3. optimizer, batches, steps; resume or score the untrained model
    saver = run_dir.Saver(run, setup.adapters, {**meta, "versions": versions()}, accelerator, recipe.train.keep_checkpoints,
                          setup.chat_template)
    loop = _prepare(recipe, setup, accelerator, saver, console, accumulation)
    if isinstance(resume_from, list):
        template = (recipe.data.chat_template, setup.chat_template) if setup.chat_template is not None else None
        loop.step, loop.best = run_dir.resume(resume_from, setup.adapters, loop.optimizer.optimizer, ranks, console, template)
    else:
        summary |= scorer.score("before")
    resume_step = loop.step if isinstance(resume_from, list) else None
    trackers.start(accelerator, recipe, run.path, resume_step)
    loop.log = MetricsLog(run.path, resume_step, accelerator.log if recipe.output.report_to else None) if ranks.main else None
    # 4. the loop: steps, log lines, validation and the best adapter, periodic checkpoints
    _run_loop(loop, console)
    # 5. the final adapter, the held-out score after training, the summary
    loop.saver.save("final", loop.step)
    if loop.log:
        loop.log.close()
    summary |= {"steps": loop.step, "best_val_loss": loop.best if loop.best < math.inf else None}
    summary |= scorer.score("after")
    summary |= loop.benchmarks.after_training(loop.step)
    run.write("summary.json", json.dumps(summary, indent=2))
    console.print(f"adapter written to [bold]{run.path / 'adapter'}[/]")
    _leave_process_group(accelerator, loop)
    return summary


def _leave_process_group(accelerator: Accelerator, loop: Loop) -> None:
    """Every process done, then the trackers closed and the group torn down (end_training): a gloo process that
    exits with its threads still running aborts ('terminate called without an active exception'), failing a run
    that finished. DDP's wrapper goes first, while its group lives: its Reducer freed after the teardown, at
    exit, once left rank 0 waiting on a gloo thread for good (seen in a 2-process test)."""
    loop.loss_module = loop.optimizer = None
    accelerator.free_memory()  # Accelerate's own references to what it prepared
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _prepare(recipe: Recipe, setup: Setup, accelerator: Accelerator, saver: run_dir.Saver, console: Console, accumulation: int) -> Loop:
    """The optimizer over the adapter parameters, the batch stream, and the model prepared by Accelerate."""
    cfg = recipe.train
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        setup.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        _compile_layers(setup.model)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    sharded = setup.sharded is not None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    stream = BatchStream(len(setup.train_set.examples), seed=cfg.seed, micro=cfg.micro_batch_size, accumulation=accumulation,
                         rank=accelerator.process_index, world=accelerator.num_processes)
    max_steps = total_steps(recipe, len(setup.train_set.examples), stream.global_batch)
    benchmarks = TrainingBenchmarks(recipe.eval, setup.model, setup.tokenizer, saver.run.path, console, Ranks.of(accelerator))
    if sharded:  # no DDP around it: FSDP reduce-scatters the sharded factors' gradients
        loss_module, optimizer = CausalLMLoss(setup.model, sharded=True), accelerator.prepare(optimizer)
    else:
        loss_module, optimizer = accelerator.prepare(CausalLMLoss(setup.model), optimizer)
    return Loop(recipe=recipe, setup=setup, accelerator=accelerator, loss_module=loss_module, optimizer=optimizer, params=params,
                stream=stream, max_steps=max_steps, saver=saver, benchmarks=benchmarks, log=None)


def collator(recipe: Recipe, model: torch.nn.Module, pad_token_id: int) -> tokens.Collator:
    """The training and validation collate: rows of at most data.max_length tokens, or, under flash attention,
    the whole micro-batch in one row (the only packed layout transformers' flash attention keeps apart)."""
    one_row = recipe.model.attn_implementation == "flash_attention_2"
    return tokens.Collator(pad_token_id, packed=packs(recipe.data.packing, model), row_tokens=None if one_row else recipe.data.max_length)


def _run_loop(loop: Loop, console: Console) -> None:
    """Optimizer steps up to max_steps; a signal stops after a whole step with a checkpoint to resume from."""
    cfg, accelerator, setup = loop.recipe.train, loop.accelerator, loop.setup
    collate = collator(loop.recipe, setup.model, setup.tokenizer.pad_token_id)
    window = Window()
    loop.loss_module.train()
    progress_bar = Progress(console, loop.max_steps, start_step=loop.step, enabled=loop.saver.run.main)
    with progress_bar as progress, _interrupt_flag(accelerator.num_processes) as interrupted:
        while loop.step < loop.max_steps:
            micro = [collate([setup.train_set.examples[i] for i in part]).to(accelerator.device) for part in loop.stream.step(loop.step)]
            everyone = [setup.train_set.examples[i] for i in loop.stream.global_indices(loop.step)]
            n_targets = sum(ex.n_targets for ex in everyone)
            lr = learning_rate(loop.step, cfg, loop.max_steps)
            for group in loop.optimizer.param_groups:
                group["lr"] = lr
            step_loss, grad_norm = optimizer_step(loop.loss_module, micro, accelerator, loop.params, cfg.max_grad_norm, n_targets)
            loop.optimizer.step()
            loop.optimizer.zero_grad(set_to_none=True)
            loop.step += 1
            progress.advance(loop.step)
            window.add(step_loss, n_targets, sum(len(ex.input_ids) for ex in everyone))
            if loop.step == 1 or loop.step % cfg.log_every == 0 or loop.step == loop.max_steps:
                record = {"step": loop.step, **window.flush(accelerator), "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                          "epoch": loop.step * loop.stream.global_batch / loop.stream.n}
                if loop.log:
                    loop.log.write(record)
                progress.update(loop.step, record)
            _after_step(loop, collate, progress)
            if interrupted() and loop.step < loop.max_steps:
                loop.saver.save("periodic", loop.step, optimizer=loop.optimizer.optimizer, best=loop.best)
                console.print(f"[yellow]interrupted:[/] checkpoint at step {loop.step}; run the same command again to resume")
                _leave_process_group(accelerator, loop)  # every process stops at this step: interrupted() agreed on it
                raise SystemExit(130)


def _after_step(loop: Loop, collate: tokens.Collator, progress: Progress) -> None:
    """Validation (saving the best adapter), benchmarks and periodic checkpoints that fall on this step."""
    cfg, step = loop.recipe.train, loop.step
    if loop.setup.val_set.examples and cfg.eval_every and (step % cfg.eval_every == 0 or step == loop.max_steps):
        val_loss = validation_loss(loop.loss_module, loop.setup.val_set, collate, cfg.micro_batch_size, loop.accelerator)
        if loop.log:
            loop.log.write({"step": step, "val_loss": val_loss})
        progress.note(f"step {step}: validation loss {val_loss:.4f}")
        if val_loss < loop.best:
            loop.best = val_loss
            loop.saver.save("best", step, val_loss=val_loss)
    loop.benchmarks.at_step(step, loop.max_steps)
    if cfg.save_every and step % cfg.save_every == 0 and step < loop.max_steps:
        loop.saver.save("periodic", step, optimizer=loop.optimizer.optimizer, best=loop.best)


def _compile_layers(model: torch.nn.Module) -> None:
    """torch.compile every decoder layer in place (parameter names, checkpoints and hooks unchanged).

    Per layer rather than the whole model: the layers share their code, so one compilation serves all of
    them; dynamic shapes, because batches differ in length.
    """
    for layer in model.get_decoder().layers:
        layer.compile(dynamic=True)


def autocast_dtype(mixed_precision: str, base_dtype: str, cuda: bool) -> str:
    """The autocast accelerate runs: auto follows the base's dtype on a GPU (a bf16 base autocasts to bf16, an
    fp32 base not at all) and is off on CPU; an explicit choice other than the base's 16-bit dtype is refused.

    Autocast to a dtype the frozen base is not stored in casts every base weight on every op and keeps
    the cast copies for backward (~16 GB for an 8B fp32 base under bf16): store the base in it instead.
    """
    if base_dtype == "fp16" and not (cuda and mixed_precision in ("auto", "fp16")):
        # fp16 gradients through the frozen base underflow without a loss scaler, and accelerate makes one only
        # for mixed_precision=fp16 on a GPU: anything else would train silently wrong.
        where = "on a CPU" if not cuda else f"with train.mixed_precision={mixed_precision}"
        raise RecipeError(f"model.dtype=fp16 {where} would train without a loss scaler (fp16 gradients underflow); "
                          "use model.dtype=bf16 or fp32" + ("" if not cuda else ", or train.mixed_precision=fp16"))
    if mixed_precision == "auto":
        return base_dtype if cuda and base_dtype in ("bf16", "fp16") else "no"
    if mixed_precision != "no" and mixed_precision != base_dtype:
        raise RecipeError(
            f"train.mixed_precision={mixed_precision} with model.dtype={base_dtype} would recast every frozen weight on "
            f"every op; set model.dtype={mixed_precision} (or train.mixed_precision=auto)"
        )
    return mixed_precision


def _accelerator(mixed_precision: str, base_dtype: str, report_to: list[str], run_path: Path) -> Accelerator:
    mixed_precision = autocast_dtype(mixed_precision, base_dtype, torch.cuda.is_available())
    # cpu=True is what makes accelerate use gloo for a torchrun-launched job on a machine without CUDA.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)  # the frozen A0/B0 are equal on every rank
    project = ProjectConfiguration(project_dir=str(run_path), logging_dir=str(run_path / "tensorboard"))
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp],
                       log_with=trackers.log_with(report_to), project_config=project)


class Window:
    """Token-weighted loss and throughput since the last log line.

    The loss stays on the device until a log line needs it: reading it (and summing it over processes)
    makes the host wait for the GPU, so it happens on log steps only, which every process shares.
    """

    def __init__(self):
        self.loss, self.tokens, self.seen, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss_sum: torch.Tensor, label_tokens: int, input_tokens: int) -> None:
        """This process's summed loss of a step; the label and input tokens of the step's whole global batch."""
        self.loss, self.tokens, self.seen = self.loss + loss_sum, self.tokens + label_tokens, self.seen + input_tokens

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        loss = accelerator.reduce(self.loss, "sum").item()
        report = {"loss": loss / self.tokens, "tokens_per_s": self.seen / (time.perf_counter() - self.start)}
        self.__init__()
        return report


@contextmanager
def _interrupt_flag(world: int):
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, so a checkpoint is whole. A collective
    when `world` > 1: every process enters it at the loop's start."""
    hit = {"signal": False}

    def handler(signum, frame):
        if hit["signal"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        hit["signal"] = True

    group = distributed.control_group() if world > 1 else None

    def interrupted() -> bool:
        # Every process must stop at the same step, or the others would wait forever in a collective.
        return distributed.any_process(hit["signal"], group) if world > 1 else hit["signal"]

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield interrupted
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
