"""Fixtures shared by the test modules: the real SmolLM2 tokenizer and the real data beside the repo."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once into milora's cache (the real model)."""
    from milora_cli import models
    from milora_cli.errors import ModelError

    try:
        return models.resolve("smollm2-135m")
    except ModelError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_path):
    """SmolLM2-135M-Instruct's real tokenizer (no BOS; eos = pad = "<|im_end|>")."""
    from milora_cli import models

    return models.load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data files of ../shared/data (never copied into the repo)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("MILORA_SHARED_DATA", default))
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MILORA_SHARED_DATA to ../shared/data)")
    return path


TINY_RECORDS = [
    {"instruction": f"Repeat the word {word} {n} times.", "input": "", "output": " ".join([word] * n), "answer": word}
    for n in range(1, 9)
    for word in ("red", "blue", "green", "yellow", "purple")
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny seeded Llama with SmolLM2's real tokenizer, saved as a plain local HF folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_path, hidden_size=32)


@pytest.fixture(scope="session")
def tiny64_model_dir(tmp_path_factory, smollm2_path) -> str:
    """The tiny Llama at hidden size 64: bitsandbytes' CPU 4-bit kernels need in_features of whole 64-blocks."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny64-llama"), smollm2_path, hidden_size=64)


def save_tiny_llama(folder, smollm2_path: str, hidden_size: int) -> str:
    """A seeded 2-layer Llama of `hidden_size` (MLP twice as wide) with SmolLM2's tokenizer, saved in `folder`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from milora_cli import models

    tokenizer = models.load_tokenizer(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """40 short LLM-Adapters records of varied length (so token-count normalisation matters)."""
    import json

    path = tmp_path_factory.mktemp("data") / "tiny.json"
    path.write_text(json.dumps(TINY_RECORDS))
    return str(path)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test builds its own Accelerator (mixed precision differs between tests) in this one process."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
