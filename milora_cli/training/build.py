"""What a run trains: the model and tokenizer loaded, adapters injected and initialised, the data tokenised.

`build` loads (nothing is written), `initialise` sets the initial factors, decomposed or from the factor
cache (init_cache.py), and returns the adapter metadata every saved adapter folder carries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from milora_cli import adapter, models, quantize, terminal
from milora_cli.data import chat, records, tokens
from milora_cli.errors import RecipeError
from milora_cli.evaluation import tasks
from milora_cli.recipe import Recipe, dump_recipe
from milora_cli.training import init_cache, sharded_load


@dataclass
class Setup:
    """What the loop works on, built once from the recipe."""

    model: Any
    tokenizer: Any
    adapters: dict[str, adapter.MiloraLinear]
    train_set: tokens.TokenizedDataset
    val_set: tokens.TokenizedDataset
    val_examples: list[records.Record]
    model_path: str
    sharded: str | None = None  # under fsdp with N > 1 processes: the line saying what each process holds
    bytes_read: int = 0  # of the checkpoint by this process, when sharded
    chat_template: str | None = None  # data.chat_template's text: written into every adapter folder of the run


def is_sharded(recipe: Recipe, world: int) -> bool:
    """The base is sharded (sharded_load.py) under train.distributed=fsdp with more than one process."""
    return recipe.train.distributed == "fsdp" and world > 1


def build(recipe: Recipe, device: torch.device | str, world: int = 1, trust: models.Trust = models.UNTRUSTED,
          console: Console | None = None) -> Setup:
    """Load the model and tokenizer, inject adapters (not yet initialised), tokenise the data; with `world` > 1
    processes under fsdp, the base sharded as it loads (sharded_load.py).

    Everything the recipe names is checked here, before the run folder is written or a step trained. `trust`
    comes from the command line: the recipe's model.trust_remote_code alone runs no code.
    """
    tasks.check_data(recipe.eval.tasks, recipe.eval.data_dir, "eval.data_dir")
    train_examples, val_examples = records.load_records(recipe.data, recipe.train.seed)  # first: no model load to fail after
    template = chat.read_template(recipe.data.chat_template)
    cfg = recipe.model
    quantize.check(cfg.quantize, cfg.dtype, torch.device(device).type, recipe.train.distributed)
    sharded, bytes_read = None, 0
    with terminal.working(console or terminal.console(quiet=True), models.loading(cfg.name_or_path)):
        path = models.resolve(cfg.name_or_path, cfg.revision, code=trust.remote_code)  # a local folder: fetched or cached
        tokenizer = models.load_tokenizer(path, trust=trust)
        if template is not None:
            tokenizer.chat_template = template
        if is_sharded(recipe, world):
            model, adapters, sharded, bytes_read = sharded_load.sharded_model(path, cfg, recipe.adapter, device, trust.remote_code)
        else:
            model = quantize.load_model(path, cfg.dtype, cfg.quantize, trust=trust, device=device, attn_implementation=cfg.attn_implementation)
            names = adapter.find_targets(model, recipe.adapter.target_modules)
            adapters = adapter.inject(model, names, recipe.adapter.r, recipe.adapter.alpha, recipe.adapter.dropout)
            adapter.set_trainable(adapters, recipe.adapter.init)
    args = (tokenizer, recipe.data.max_length, recipe.data.train_on_prompt)
    train_set, val_set = tokens.build_dataset(train_examples, *args), tokens.build_dataset(val_examples, *args)
    if not train_set.examples:
        raise RecipeError("no training example has a response token left after truncation; raise data.max_length")
    return Setup(model=model, tokenizer=tokenizer, adapters=adapters, train_set=train_set, val_set=val_set, val_examples=val_examples,
                 model_path=path, sharded=sharded, bytes_read=bytes_read, chat_template=template)


def describe(recipe: Recipe, console: Console, trust: models.Trust = models.UNTRUSTED) -> None:
    """`--dry-run`: the resolved recipe, one tokenised example with its label mask, parameter counts."""
    from rich.syntax import Syntax

    console.print(Syntax(dump_recipe(recipe), "yaml", theme="ansi_dark"))
    setup = build(recipe, "cpu", trust=trust, console=console)
    trainable, total = adapter.count_parameters(setup.model)
    console.print(data_line(recipe, setup))
    console.print("first training example (dim: prompt, no loss; [bold green]green[/]: trained tokens):")
    console.print(tokens.render_label_mask(setup.tokenizer, setup.train_set.examples[0]))
    console.print(
        f"adapters on {len(setup.adapters)} layers; trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.3f}%)"
    )
    console.print("dry run: nothing trained, nothing written")


def data_line(recipe: Recipe, setup: Setup) -> str:
    train_set = setup.train_set
    return (
        f"data: {len(train_set.examples)} training examples ({train_set.n_truncated} truncated to "
        f"{recipe.data.max_length} tokens, {train_set.n_dropped} dropped as all-prompt), "
        f"{len(setup.val_set.examples)} validation"
    )


def initialise(recipe: Recipe, setup: Setup, accelerator: Accelerator, console: Console) -> tuple[dict, dict]:
    """Set the initial factors on the model's device; return the adapter metadata and a summary."""
    note = models.quantisation_note(setup.model_path)
    if note:
        console.print(f"[yellow]note:[/] {recipe.model.name_or_path}: {note}")
    model_cfg = recipe.model
    if model_cfg.quantize != "none":
        console.print(f"{model_cfg.quantize} base: the initial factors come from the full-precision weights of {setup.model_path}")
    start = time.perf_counter()
    weights = quantize.full_precision_weights(setup.adapters, model_cfg.quantize, setup.model_path, model_cfg.dtype,
                                              from_checkpoint=setup.sharded is not None)
    report = init_cache.initialise(setup.adapters, recipe.adapter, seed=recipe.train.seed, use_cache=recipe.adapter.cache_factors,
                                   rank=accelerator.process_index, world=accelerator.num_processes, weights=weights)
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
        # absolute, so that the run is usable from any folder
        "base_model_path": str(Path(setup.model_path).resolve()) if Path(setup.model_path).is_dir() else setup.model_path,
        "revision": recipe.model.revision, "base_dtype": recipe.model.dtype,
        "base_quantize": model_cfg.quantize, "base_fingerprint": report.fingerprint,
    }
    summary = {"run_dir": recipe.output.dir, "init_seconds": seconds, "init_decomposed": report.computed,
               "init_from_cache": report.cached, "trainable": trainable, "total": total}
    if setup.sharded:  # what each process read of the checkpoint: its slices, and the weights it decomposed
        read = setup.bytes_read + weights.bytes_read
        summary["checkpoint_bytes_read"] = [int(n) for n in accelerator.gather(torch.tensor([read], device=accelerator.device))]
    return meta, summary
