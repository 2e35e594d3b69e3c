"""The recipe's choices that the command line offers too, in a module without pydantic or torch: `milora --help`
and shell completion import this, not recipe.py (which imports them from here and is where modules read them)."""

from typing import Literal

DEFAULT_SHARD_SIZE = "5GB"  # the largest weight file of a merged folder, as transformers' save_pretrained
Dtype = Literal["fp32", "bf16", "fp16"]
MergeFormat = Literal["merged", "peft"]
# How the frozen base is stored (quantize.py): bitsandbytes' 4-bit NormalFloat or float, LLM.int8(), or not at all.
Quantize = Literal["none", "nf4", "fp4", "int8"]
