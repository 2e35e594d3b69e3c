"""A run's own chat template (data.chat_template) follows its adapter: every adapter folder carries it as
chat_template.jinja, `milora eval RUN --prompt chat` asks with it, `milora merge` writes it into the merged folder
(where transformers' AutoTokenizer loads it) and beside a PEFT export (vLLM's --chat-template). A run without one
writes none, and the base's template applies.

The base is the tiny Llama with SmolLM2's real tokenizer and its real ChatML template (conftest.py); the run's own
template is a second real one, Zephyr's.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from test_chat import chat_rows, write_jsonl
from test_evaluate import read_results, tiny_data_dir
from test_train import tiny_recipe
from rich.console import Console
from transformers import AutoTokenizer
from typer.testing import CliRunner

from milora_cli import adapter_folder, models
from milora_cli.cli import app
from milora_cli.recipe import validate
from milora_cli.training.train import train

# HuggingFaceH4/zephyr-7b-beta's chat template, the "chat_template" of its tokenizer_config.json, character for
# character: as copied into huggingface.co/Rijgersberg/GEITje-7B commit c6ed7117 ("Add Zephyr-style chat template",
# tokenizer_config.json), into TRL's example scripts as DEFAULT_CHAT_TEMPLATE (examples/scripts/orpo.py), and into
# the swift-jinja test suite's "HuggingFace H4 Zephyr-7B-Beta" cases (with its expected output for eos_token "</s>":
# "<|system|>\n...</s>\n<|user|>\n...</s>\n<|assistant|>\n").
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def trained_run(tiny_model_dir, tmp_path, template: str | None):
    """A 2-step run on conversations, a checkpoint and a best adapter at each step; with `template` as data.chat_template."""
    raw = tiny_recipe(tiny_model_dir, write_jsonl(tmp_path / "chat.jsonl", chat_rows(16)), tmp_path / "run",
                      max_steps=2, save_every=1, eval_every=1)
    if template is not None:
        (tmp_path / "zephyr.jinja").write_text(template)
        raw["data"]["chat_template"] = str(tmp_path / "zephyr.jinja")
    train(validate(raw), Console(quiet=True))
    return tmp_path / "run"


def adapter_folders(run) -> list:
    folders = [run / "adapter", run / "best", *sorted((run / "checkpoints").iterdir())]
    assert len(folders) >= 3 and all((folder / adapter_folder.META_FILE).is_file() for folder in folders)
    return folders


def eval_chat(run, tmp_path) -> tuple[str, list[dict]]:
    """`milora eval RUN --prompt chat` on a made-up boolq set: (console output, the prompts recorded)."""
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(run), "--tasks", "boolq", "--limit", "2", "--prompt", "chat", "--max-new-tokens", "2",
                                      "--data-dir", str(tiny_data_dir(tmp_path)), "--output", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output, read_results(out)


def asked(template: str, tokenizer, record: dict) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": record["instruction"]}], tokenize=False, add_generation_prompt=True,
                                         chat_template=template)


def test_a_run_with_its_own_template_keeps_it_in_every_adapter_folder_eval_merge_and_export(tiny_model_dir, tmp_path):
    run = trained_run(tiny_model_dir, tmp_path, ZEPHYR_TEMPLATE)
    for folder in adapter_folders(run):
        assert (folder / adapter_folder.CHAT_TEMPLATE_FILE).read_text() == ZEPHYR_TEMPLATE
        assert json.loads((folder / adapter_folder.META_FILE).read_text())["chat_template"] == adapter_folder.CHAT_TEMPLATE_FILE
        assert adapter_folder.read_adapter(folder).chat_template == ZEPHYR_TEMPLATE
    # eval asks each question through Zephyr's template, not the base's ChatML, and says so
    output, scored = eval_chat(run, tmp_path)
    assert "chat template: the run's own" in output
    base = models.load_tokenizer(tiny_model_dir)
    questions = json.loads((tmp_path / "data/commonsense/boolq/test.json").read_text())
    assert len(scored) == 2 and all(r["prompt"] == asked(ZEPHYR_TEMPLATE, base, questions[int(r["id"])]) for r in scored)
    assert scored[0]["prompt"].startswith("<|user|>\n") and scored[0]["prompt"].endswith("<|im_end|>\n<|assistant|>\n")
    # merge: transformers' own loader gives the merged folder the run's template
    assert CliRunner().invoke(app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")]).exit_code == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == ZEPHYR_TEMPLATE
    assert base.chat_template != ZEPHYR_TEMPLATE and "<|im_start|>" in base.chat_template  # the base's file it replaced
    # the PEFT export carries it, and the vLLM command it prints passes it
    result = CliRunner().invoke(app, ["merge", "--adapter", str(run / "best"), "--output", str(tmp_path / "peft"), "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "peft" / adapter_folder.CHAT_TEMPLATE_FILE).read_text() == ZEPHYR_TEMPLATE
    assert f"--chat-template {tmp_path / 'peft'}/chat_template.jinja" in " ".join(result.output.split())
    assert json.loads((tmp_path / "peft/milora_export.json").read_text())["chat_template"] == adapter_folder.CHAT_TEMPLATE_FILE


def test_a_run_without_its_own_template_writes_none_and_the_base_template_applies(tiny_model_dir, tmp_path):
    run = trained_run(tiny_model_dir, tmp_path, None)
    for folder in adapter_folders(run):
        assert not (folder / adapter_folder.CHAT_TEMPLATE_FILE).exists()
        assert json.loads((folder / adapter_folder.META_FILE).read_text())["chat_template"] is None
    output, scored = eval_chat(run, tmp_path)
    assert "chat template" not in output
    base = models.load_tokenizer(tiny_model_dir)
    questions = json.loads((tmp_path / "data/commonsense/boolq/test.json").read_text())
    assert all(r["prompt"] == asked(base.chat_template, base, questions[int(r["id"])]) for r in scored)
    assert scored[0]["prompt"].endswith("<|im_start|>assistant\n")  # SmolLM2's ChatML
    assert CliRunner().invoke(app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")]).exit_code == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == base.chat_template
    assert "chat_template" not in (tmp_path / "merged/README.md").read_text()


@pytest.mark.parametrize("damage", ["missing", "edited"])
def test_a_kept_template_that_is_missing_or_edited_is_one_line(tiny_model_dir, tmp_path, damage):
    run = trained_run(tiny_model_dir, tmp_path, ZEPHYR_TEMPLATE)
    path = run / "adapter" / adapter_folder.CHAT_TEMPLATE_FILE
    path.unlink() if damage == "missing" else path.write_text(ZEPHYR_TEMPLATE.replace("<|user|>", "<|human|>"))
    result = CliRunner().invoke(app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "merged")])
    assert result.exit_code == 2 and "chat_template.jinja" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "merged").exists()


def test_a_resume_after_the_template_file_changed_is_refused_and_resumes_once_restored(tiny_model_dir, tmp_path):
    """The recipe names the same file, so the recipe check passes; the checkpoint's kept template tells that the run
    would go on with another template than its first steps trained with."""
    template, run = tmp_path / "zephyr.jinja", tmp_path / "run"
    template.write_text(ZEPHYR_TEMPLATE)
    raw = tiny_recipe(tiny_model_dir, write_jsonl(tmp_path / "chat.jsonl", chat_rows(16)), run, max_steps=3, save_every=1, eval_every=None)
    raw["data"]["chat_template"] = str(template)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    train(validate(raw), Console(quiet=True))
    # the run as a stop after its step-2 checkpoint left it
    shutil.rmtree(run / "adapter"), (run / "summary.json").unlink()  # the last step writes the adapter, not a checkpoint
    template.write_text(ZEPHYR_TEMPLATE.replace("<|user|>", "<|human|>"))
    refused = CliRunner().invoke(app, ["train", str(recipe)])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and f"data.chat_template {template} has changed since" in said and "Traceback" not in said, said
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]  # nothing deleted
    template.write_text(ZEPHYR_TEMPLATE)
    resumed = CliRunner().invoke(app, ["train", str(recipe)])
    assert resumed.exit_code == 0 and "at step 2" in resumed.output, resumed.output
    assert adapter_folder.read_adapter(run / "adapter").chat_template == ZEPHYR_TEMPLATE
