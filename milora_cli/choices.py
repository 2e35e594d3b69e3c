"""The recipe's choices (its Literals), in a module without pydantic or torch: `milora --help` and shell completion
import this, not recipe.py; recipe.py validates them and modules may import them from either."""

from typing import Literal

DEFAULT_SHARD_SIZE = "5GB"  # the largest weight file of a merged folder, as transformers' save_pretrained
Dtype = Literal["fp32", "bf16", "fp16"]
# model.dtype also takes fp64: the whole run (base, factors, optimizer) in float64, where an equality that is exact
# in exact arithmetic (packed == padded, N processes == one, resume == straight) holds to ~1e-12 on any CPU.
ModelDtype = Literal["fp32", "bf16", "fp16", "fp64"]
MergeFormat = Literal["merged", "peft"]
# How the frozen base is stored (quantize.py): bitsandbytes' 4-bit NormalFloat or float, LLM.int8(), or not at all.
Quantize = Literal["none", "nf4", "fp4", "int8"]
Init = Literal["milora", "pissa", "lora", "mica"]
SvdDtype = Literal["float32", "float64"]
SvdDriver = Literal["gram", "svd"]
Packing = Literal["auto", "on", "off"]
Distributed = Literal["ddp", "fsdp"]
PromptStyle = Literal["alpaca", "chat"]  # benchmark questions: the paper's Alpaca prompt, or one user turn through the chat template
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio", "comet", "none"]  # as HF's report_to; training/trackers.py
# The benchmarks `milora eval` and the recipe's eval.tasks know (tasks.py holds their data and protocols).
BenchmarkTask = Literal[
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa",
    "gsm8k", "math", "math500", "wikitext",
]
