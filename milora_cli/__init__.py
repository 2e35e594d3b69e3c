"""milora: fine-tune LLMs with MiLoRA, LoRA adapters initialised from the minor singular components."""

__version__ = "0.1.0"
