"""Model loading: straight onto the device in the asked dtype, the attention kernel, eval in the checkpoint's dtype,
and benchmark prompts scored longest first but written back in their original order."""

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from milora_cli import models
from milora_cli.errors import ModelError
from milora_cli.evaluation import generate, suite
from milora_cli.recipe import eval_settings

QUIET = Console(quiet=True)


def test_the_model_is_built_on_its_device_in_the_recipe_dtype(tiny_model_dir):
    model = models.load_model(tiny_model_dir, "bf16", device="cpu")
    # device_map={"": device} places every tensor as it is read (on CUDA: no full CPU copy first; only CPU runs here).
    assert {(p.dtype, p.device.type) for p in model.parameters()} == {(torch.bfloat16, "cpu")} and not model.training
    assert model.config._attn_implementation == "sdpa"
    assert models.load_model(tiny_model_dir, "fp32", attn_implementation="eager").config._attn_implementation == "eager"


def test_flash_attention_on_cpu_or_fp32_is_one_line(tiny_model_dir):
    with pytest.raises(ModelError, match="flash"):
        models.load_model(tiny_model_dir, "bf16", attn_implementation="flash_attention_2")


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(folder)
    for file in Path(tiny_model_dir).glob("tokenizer*"):
        (folder / file.name).write_bytes(file.read_bytes())
    return str(folder)


def test_eval_loads_a_model_in_the_dtype_it_was_saved_in(bf16_model_dir, tiny_model_dir):
    assert models.checkpoint_dtype(bf16_model_dir) == "bf16" and models.checkpoint_dtype(tiny_model_dir) == "fp32"
    model, _, identity = suite.load(bf16_model_dir, None, "cpu", QUIET)
    assert next(model.parameters()).dtype == torch.bfloat16 and identity.endswith("[bf16]")
    model, _, identity = suite.load(bf16_model_dir, "fp32", "cpu", QUIET)
    assert next(model.parameters()).dtype == torch.float32 and identity.endswith("[fp32]")


def test_prompts_are_generated_longest_first_and_written_in_their_order(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "data" / "commonsense" / "boolq"
    folder.mkdir(parents=True)
    records = [{"instruction": "Is it so?" + " Really?" * (i * 7 % 5), "input": "", "answer": "true",
                "output": "the correct answer is true"} for i in range(9)]
    (folder / "test.json").write_text(json.dumps(records))
    seen = []
    real = generate.generate

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(generate, "generate", recording)
    model, tokenizer = models.load_model(tiny_model_dir, "fp32"), models.load_tokenizer(tiny_model_dir)
    cfg = eval_settings({"tasks": ["boolq"], "data_dir": str(tmp_path / "data"), "batch_size": 4, "choice_max_new_tokens": 2})
    suite.evaluate_model(model, tokenizer, cfg, tmp_path / "out", "tiny", QUIET)
    assert [len(p) for p in seen] == sorted((len(p) for p in seen), reverse=True) and len(seen) == 9
    written = [json.loads(line) for line in (tmp_path / "out" / suite.RESULTS_FILE).read_text().splitlines()]
    assert [r["id"] for r in written] == [str(i) for i in range(9)]
    assert [r["prompt"] for r in written] != seen  # the file is not in generation order
