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
