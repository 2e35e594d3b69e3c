"""milora: fine-tune LLMs with MiLoRA, LoRA adapters initialised from the minor singular components."""

from milora_cli import terminal

__version__ = "0.1.0"

terminal.library_bars_off()  # first: `import torch` imports tqdm, which reads its switch once
