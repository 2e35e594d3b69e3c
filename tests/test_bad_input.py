"""Bad input as a hostile but ordinary user types it (issue 12): each case ends in one line and exit code 2,
or in a correct result; never in a traceback, and nothing the command did not create is overwritten.

CASES is the list, one row per thing the user did, numbered by the issue's classes. Each row damages fresh
copies of a finished tiny run and of a run stopped after two checkpoints, then runs the real CLI (the Typer
app in this process, so the rows stay fast; TestSubprocess runs the installed command for the traceback
check of OSErrors).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, milora
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from milora_cli import adapter_folder
from milora_cli.cli import app
from milora_cli.recipe import validate
from milora_cli.training import checkpoints
from milora_cli.training.train import train

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@dataclass
class World:
    """Fresh copies for one case: a finished run, a run stopped after checkpoints step-2 and step-4, and inputs."""

    run: Path
    stopped: Path
    recipe: Path  # the stopped run's recipe, which resumes it
    model: Path
    data: Path
    bench: Path  # a --data-dir with a 4-question boolq
    tmp: Path
    wide: Path  # a model of another architecture

    def checkpoint(self, step: int) -> Path:
        return self.stopped / "checkpoints" / f"step-{step:06d}"


def tiny_recipe(model: str, data: str, out: Path, **adapter_values) -> dict:
    return {
        "model": {"name_or_path": model},
        "adapter": {"init": "milora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], **adapter_values},
        "data": {"path": data, "val_size": 8, "max_length": 48},
        "train": {"max_steps": 6, "lr": 1e-2, "warmup_steps": 1, "save_every": 2, "keep_checkpoints": 2, "micro_batch_size": 2},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_model_dir, tiny_data) -> dict[str, Path]:
    """One finished tiny run (6 steps, checkpoints at 2 and 4), an r=8 init-only run, a benchmark folder."""
    root = tmp_path_factory.mktemp("bad-input")
    train(validate(tiny_recipe(tiny_model_dir, tiny_data, root / "run")), Console(quiet=True))
    raw8 = tiny_recipe(tiny_model_dir, tiny_data, root / "r8", r=8)
    raw8["train"]["max_steps"] = 0
    train(validate(raw8), Console(quiet=True))
    bench = root / "bench"
    (bench / "commonsense/boolq").mkdir(parents=True)
    records = [{"instruction": f"Is {i} even?", "input": "", "answer": ["true", "false"][i % 2], "output": "true"} for i in range(4)]
    (bench / "commonsense/boolq/test.json").write_text(json.dumps(records))
    wide = root / "wide"  # another architecture: the tiny Llama with hidden size 64
    shutil.copytree(tiny_model_dir, wide)
    config = LlamaConfig.from_pretrained(wide)
    config.hidden_size, config.intermediate_size = 64, 128
    LlamaForCausalLM(config).save_pretrained(wide)
    return {"run": root / "run", "r8": root / "r8", "bench": bench, "wide": wide}


@pytest.fixture
def world(originals, tiny_model_dir, tiny_data, tmp_path) -> World:
    run, stopped = tmp_path / "run", tmp_path / "stopped"
    for copy in (run, stopped):
        shutil.copytree(originals["run"], copy)
        recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
        recipe["output"]["dir"] = str(copy)  # the copy is its own run
        (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for name in ("adapter", "best", "summary.json"):  # stopped after step 4's checkpoint
        target = stopped / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    bench = tmp_path / "bench"
    shutil.copytree(originals["bench"], bench)
    return World(run, stopped, stopped / "recipe.yaml", Path(tiny_model_dir), Path(tiny_data), bench, tmp_path, originals["wide"])


def cli(*args: str | Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the real Typer app; an uncaught exception fails the test with its traceback."""
    result = CliRunner().invoke(app, [str(arg) for arg in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def squash(text: str) -> str:
    """`text` without whitespace: rich wraps long lines (and paths) at the terminal's width."""
    return "".join(text.split())


def eval_args(world: World, target: Path | str, output: Path, *more: str) -> list:
    return ["eval", target, "--tasks", "boolq", "--data-dir", world.bench, "--limit", "2", "--max-new-tokens", "2",
            "--output", output, *more]


# --- what the users did to their files ------------------------------------------------------------------


def truncate(path: Path, keep: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def flip_tensor_bytes(path: Path) -> None:
    """Overwrite the tensor bytes after the header with NaN bit patterns; the header stays intact."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


def edit_json(path: Path, drop: str | None = None, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    meta.pop(drop, None)
    path.write_text(json.dumps(meta))


def damaged_resume(*damages: Callable[[World], None]):
    def setup(w: World) -> list:
        for damage in damages:
            damage(w)
        return ["train", w.recipe]
    return setup


def latin1(path: Path, text: str) -> None:
    path.write_bytes(text.encode("latin-1"))


def train_on(w: World, rows: list[dict], *overrides: str) -> list:
    """`milora train` of the stopped run's recipe on `rows` (a .jsonl data file) into a new folder."""
    (w.tmp / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["train", w.recipe, f"data.path={w.tmp / 'd.jsonl'}", f"output.dir={w.tmp / 'new'}", *overrides]


@dataclass
class Case:
    name: str  # what the user did
    setup: Callable[[World], list]  # damages the world's files; returns the CLI arguments
    needle: str  # in the one error line (exit 2), or in the output of a command that succeeds (code 0)
    code: int = 2


CASES = [
    # 1. a damaged adapter or checkpoint: the resume skips it (or refuses when none is intact), the readers refuse it
    Case("1 truncated the latest checkpoint's optimizer.safetensors, trained again",
         damaged_resume(lambda w: truncate(w.checkpoint(4) / checkpoints.OPTIMIZER_FILE)), "skipping a damaged checkpoint", 0),
    Case("1 wrote bad JSON into the latest trainer_state.json, trained again",
         damaged_resume(lambda w: (w.checkpoint(4) / checkpoints.STATE_FILE).write_text("{step: 4")), "trainer_state.json is damaged", 0),
    Case("1 truncated both checkpoints' adapter_model.safetensors, trained again",
         damaged_resume(*(lambda w, s=s: truncate(w.checkpoint(s) / adapter_folder.ADAPTER_FILE) for s in (2, 4))),
         "no intact checkpoint"),
    Case("1 wrote bad JSON into adapter_meta.json, merged",
         lambda w: [(w.run / "adapter" / adapter_folder.META_FILE).write_text("{oops"), "merge", "--adapter", w.run, "--output", w.tmp / "m"][1:],
         "adapter_meta.json is damaged"),
    Case("1 deleted a key of adapter_meta.json, evaluated",
         lambda w: [edit_json(w.run / "adapter" / adapter_folder.META_FILE, drop="scaling"), *eval_args(w, w.run, w.tmp / "e")][1:],
         "lacks scaling"),
    Case("1 truncated adapter_init.safetensors, ran svd-inspect",
         lambda w: [truncate(w.run / "adapter" / adapter_folder.INIT_FILE), "svd-inspect", w.run][1:], "adapter_init.safetensors is damaged"),
    Case("1 truncated a model's model.safetensors, ran svd-inspect",
         lambda w: [truncate(w.tmp / "model/model.safetensors", 200), "svd-inspect", w.tmp / "model"][1:], "model.safetensors is damaged"),
    # 2. text that is not UTF-8, corrupt data files, a benchmark file of the wrong shape
    Case("2 saved the recipe as Latin-1", lambda w: [latin1(w.tmp / "r.yaml", "# café\ndata: {builtin: quickstart}\n"),
                                                     "train", w.tmp / "r.yaml"][1:], "is not UTF-8 text"),
    Case("2 saved the data file as Latin-1",
         lambda w: [latin1(w.tmp / "d.json", json.dumps([{"instruction": "café", "output": "x"}], ensure_ascii=False)),
                    "train", w.recipe, f"data.path={w.tmp / 'd.json'}", f"output.dir={w.tmp / 'new'}"][1:], "d.json is not UTF-8"),
    Case("2 truncated a parquet data file",
         lambda w: [(w.tmp / "d.parquet").write_bytes(b"PAR1\x00\x01garbage"), "train", w.recipe, f"data.path={w.tmp / 'd.parquet'}",
                    f"output.dir={w.tmp / 'new'}"][1:], "not a readable parquet file"),
    Case("2 saved a benchmark file as Latin-1",
         lambda w: [latin1(w.bench / "commonsense/boolq/test.json", '[{"instruction": "café"}]'), *eval_args(w, w.model, w.tmp / "e")][1:],
         "is not UTF-8 text"),
    Case("2 wrote a benchmark file that is one JSON object",
         lambda w: [(w.bench / "commonsense/boolq/test.json").write_text('{"instruction": "x"}'), *eval_args(w, w.model, w.tmp / "e")][1:],
         "must hold a list of records"),
    Case("2 tore predictions.jsonl's last line mid-character, evaluated again",
         lambda w: [cli(*eval_args(w, w.model, w.tmp / "e")),
                    (w.tmp / "e/predictions.jsonl").write_bytes((w.tmp / "e/predictions.jsonl").read_bytes()[:-20] + b"\xc3"),
                    *eval_args(w, w.model, w.tmp / "e")][2:], "per-example results", 0),
    Case("2 removed 'correct' from a line of predictions.jsonl, evaluated again",
         lambda w: [cli(*eval_args(w, w.model, w.tmp / "e")),
                    (w.tmp / "e/predictions.jsonl").write_text('{"task": "boolq", "id": "0"}\n'),
                    *eval_args(w, w.model, w.tmp / "e")][2:], "per-example results", 0),
    # 4. unusable output paths
    Case("4 gave an output.dir that is a file",
         lambda w: [(w.tmp / "f").write_text("x"), "train", w.recipe, f"output.dir={w.tmp / 'f'}"][1:], "is a file, not a folder"),
    Case("4 gave an output.dir whose parent is a file",
         lambda w: [(w.tmp / "f").write_text("x"), "train", w.recipe, f"output.dir={w.tmp / 'f/run'}"][1:], "is a file, not a folder"),
    Case("4 gave an eval --output in a place nobody may write", lambda w: eval_args(w, w.model, "/sys/milora-eval"), "/sys/milora-eval:"),
    Case("4 pointed --json at a folder", lambda w: ["svd-inspect", w.model, "--json", w.tmp], "is a folder"),
    Case("6 pointed --csv at a run's summary.json", lambda w: ["svd-inspect", w.run, "--csv", w.run / "summary.json"],
         "would replace a file of a training run"),
    Case("4 gave output.dir='' (the current folder)", lambda w: ["train", w.recipe, "output.dir=''"], "output.dir"),
    # 5. a recipe that cannot train is refused before it writes recipe.yaml
    Case("5 set adapter.target_modules=[]",
         lambda w: ["train", w.recipe, "adapter.target_modules=[]", f"output.dir={w.tmp / 'new'}"], "adapter.target_modules"),
    # 6. nothing a command did not create is overwritten
    Case("6 evaluated a run into the run folder itself", lambda w: eval_args(w, w.run, w.run), "lies inside"),
    Case("6 evaluated a model into a run folder", lambda w: eval_args(w, w.model, w.run), "holds a training run"),
    Case("6 trained into an eval's output folder",
         lambda w: [cli(*eval_args(w, w.model, w.tmp / "e")), "train", w.recipe, f"output.dir={w.tmp / 'e'}"][1:], "holds an eval"),
    Case("6 merged into a folder inside a checkpoint",
         lambda w: ["merge", "--adapter", w.run, "--output", w.run / "checkpoints/step-000002/merged"], "lies inside the adapter folder"),
    # 7. inconsistent adapters
    Case("7 edited adapter_meta.json's r",
         lambda w: [edit_json(w.run / "adapter" / adapter_folder.META_FILE, r=8), "merge", "--adapter", w.run, "--output", w.tmp / "m"][1:],
         "says r=8"),
    Case("7 edited adapter_meta.json's lora_alpha, exported to PEFT",
         lambda w: [edit_json(w.run / "adapter" / adapter_folder.META_FILE, lora_alpha=64), "merge", "--adapter", w.run,
                    "--output", w.tmp / "m", "--format", "peft"][1:], "is not lora_alpha / r"),
    Case("7 wrote base_dtype: fp8 into adapter_meta.json, merged",
         lambda w: [edit_json(w.run / "adapter" / adapter_folder.META_FILE, base_dtype="fp8"), "merge", "--adapter", w.run,
                    "--output", w.tmp / "m"][1:], "adapter_meta.json is damaged"),
    Case("1 edited the latest trainer_state.json's step into text, trained again",
         damaged_resume(lambda w: edit_json(w.checkpoint(4) / checkpoints.STATE_FILE, step="four")), "trainer_state.json is damaged", 0),
    # 8. a checkpoint whose tensor bytes are corrupted, header intact
    Case("8 corrupted the latest checkpoint's tensor bytes, trained again",
         damaged_resume(lambda w: flip_tensor_bytes(w.checkpoint(4) / adapter_folder.ADAPTER_FILE)), "sha256 mismatch", 0),
    Case("8 corrupted the only checkpoint's tensor bytes and its checksum went with an old copy, trained again",
         damaged_resume(lambda w: shutil.rmtree(w.checkpoint(2)),
                        lambda w: flip_tensor_bytes(w.checkpoint(4) / adapter_folder.ADAPTER_FILE),
                        lambda w: edit_json(w.checkpoint(4) / adapter_folder.META_FILE, checksums={})),
         "no intact checkpoint"),
    # 9. an empty benchmark
    Case("9 scored a benchmark file holding []",
         lambda w: [(w.bench / "commonsense/boolq/test.json").write_text("[]"), *eval_args(w, w.model, w.tmp / "e")][1:], "no records"),
    # 10. a recipe's eval.data_dir that does not exist is refused before training
    Case("10 trained a recipe whose eval.data_dir does not exist",
         lambda w: ["train", w.recipe, "eval.tasks=[boolq]", f"eval.data_dir={w.tmp / 'nope'}", f"output.dir={w.tmp / 'new'}"],
         "eval.data_dir"),
    # 11. conversations and text that cannot train (issue 19): refused when the data is read, before anything is written
    Case("11 trained on a conversation without an assistant turn",
         lambda w: train_on(w, [{"messages": [{"role": "user", "content": "Hi"}]}]), "no assistant turn"),
    Case("11 trained on a conversation with the role 'bot'",
         lambda w: train_on(w, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}]), "unknown role 'bot'"),
    Case("11 trained on a conversation with an empty assistant turn",
         lambda w: train_on(w, [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]}]), "empty content"),
    Case("11 trained on a text record without text", lambda w: train_on(w, [{"text": "Some words."}, {"text": None}]),
         "record 1: a text record needs a non-empty string 'text'"),
    Case("11 trained conversations on a model whose tokenizer has no chat template",
         lambda w: [(w.tmp / "model" / "chat_template.jinja").unlink(),
                    *train_on(w, [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
                                  for i in range(12)], f"model.name_or_path={w.tmp / 'model'}")][1:],
         "has no chat template"),
    Case("11 named a data.chat_template file that is not there",
         lambda w: train_on(w, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}] * 12,
                            f"data.chat_template={w.tmp / 'chatml.jinja'}"), "chatml.jinja is not a file"),
    # messages: literal text, the flag the user typed, the keys that differ, a moved base
    Case("messages: evaluated again with another --dtype",
         lambda w: [cli(*eval_args(w, w.model, w.tmp / "e")), *eval_args(w, w.model, w.tmp / "e", "--dtype", "bf16")][1:], "[bf16]"),
    Case("messages: gave --max-new-tokens 0", lambda w: eval_args(w, w.model, w.tmp / "e")[:-4] + ["--max-new-tokens", "0"],
         "--max-new-tokens"),
    Case("messages: changed train.lr and reran into the same folder", lambda w: ["train", w.recipe, "train.lr=0.5"],
         "train.lr: 0.01 there, 0.5 now"),
    Case("messages: moved the base model away, then evaluated the run",
         lambda w: [edit_json(w.run / "adapter" / adapter_folder.META_FILE, base_model_path=str(w.tmp / "gone"), base_model=str(w.tmp / "gone")),
                    *eval_args(w, w.run, w.tmp / "e")][1:], "pass --base"),
    Case("messages: evaluated the run with --base of another architecture",
         lambda w: eval_args(w, w.run, w.tmp / "e", "--base", w.wide), "trained on another model"),
    Case("messages: ran svd-inspect on the run with --base of another architecture",
         lambda w: ["svd-inspect", w.run, "--base", w.wide], "is not the architecture the adapter was trained on"),
    Case("messages: asked merge for --rank without --format peft",
         lambda w: ["merge", "--adapter", w.run, "--output", w.tmp / "m", "--rank", "4"], "add --format peft"),
    Case("messages: gave merge --base a data file", lambda w: ["merge", "--adapter", w.run, "--output", w.tmp / "m", "--base", w.data],
         "--base"),
    Case("messages: moved the base model away, evaluated the run with --base",
         lambda w: [edit_json(w.run / "adapter" / adapter_folder.META_FILE, base_model_path=str(w.tmp / "gone"), base_model=str(w.tmp / "gone")),
                    *eval_args(w, w.run, w.tmp / "e", "--base", w.tmp / "model")][1:], "per-example results", 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_input(case: Case, world: World, monkeypatch):
    monkeypatch.chdir(world.tmp)  # a case that goes wrong writes here, never into the repository
    before = (world.run / "summary.json").read_bytes()
    code, out, err = cli(*case.setup(world))
    assert code == case.code, out + err
    if case.code == 2:
        lines = [line for line in err.splitlines() if line.startswith("error")]  # transformers' load bar may precede it
        assert len(lines) == 1 and lines[0].startswith("error: ") and case.needle in lines[0] and "Traceback" not in err, err
    else:
        assert squash(case.needle) in squash(out), out + err
    assert (world.run / "summary.json").read_bytes() == before  # the finished run is never touched


def test_a_resume_past_a_damaged_checkpoint_finishes_with_a_finite_adapter(world):
    flip_tensor_bytes(world.checkpoint(4) / adapter_folder.ADAPTER_FILE)
    code, out, err = cli("train", world.recipe)
    assert code == 0, out + err
    assert squash("skipping a damaged checkpoint") in squash(out)
    assert squash(f"resumed from {world.checkpoint(2)} at step 2") in squash(out)
    final = adapter_folder.read_adapter(world.stopped / "adapter")  # validated: finite, checksums
    assert final.meta["step"] == 6


def test_an_adapter_of_r8_beside_initial_factors_of_r4_is_refused(world, originals):
    shutil.copyfile(originals["r8"] / "adapter" / adapter_folder.ADAPTER_FILE, world.run / "adapter" / adapter_folder.ADAPTER_FILE)
    meta = world.run / "adapter" / adapter_folder.META_FILE
    edit_json(meta, checksums={})  # as a folder of an older milora, without checksums, would be
    code, _, err = cli("merge", "--adapter", world.run, "--output", world.tmp / "peft", "--format", "peft")
    assert code == 2 and "says r=4; the files come from different runs" in err and not (world.tmp / "peft").exists()


def test_eval_force_replaces_another_kind_of_result(world):
    merged = world.tmp / "merged"
    assert cli("merge", "--adapter", world.run, "--output", merged)[0] == 0
    assert cli(*eval_args(world, world.model, merged))[0] == 2
    code, out, err = cli(*eval_args(world, world.model, merged, "--force"))
    assert code == 0, out + err
    assert not (merged / "milora_export.json").exists() and (merged / "summary.json").is_file()


def test_nan_values_in_an_adapter_are_refused(world):
    path = world.run / "adapter" / adapter_folder.ADAPTER_FILE
    tensors = load_file(path)
    first = next(iter(tensors))
    tensors[first][0, 0] = torch.nan
    save_file(tensors, path)
    edit_json(world.run / "adapter" / adapter_folder.META_FILE, checksums={})
    code, _, err = cli("merge", "--adapter", world.run, "--output", world.tmp / "m")
    assert code == 2 and "NaN" in err


def test_a_run_trained_on_a_relative_model_path_works_from_another_folder(world, monkeypatch):
    monkeypatch.chdir(world.tmp)
    raw = tiny_recipe("model", str(world.data), world.tmp / "rel")
    raw["train"]["max_steps"] = 0
    train(validate(raw), Console(quiet=True))
    monkeypatch.chdir(world.stopped)
    code, out, err = cli(*eval_args(world, world.tmp / "rel", world.tmp / "e"))
    assert code == 0, out + err


class TestSubprocess:
    """The installed command: an OSError is one line naming the path, without a traceback."""

    def test_an_unwritable_output_is_one_line(self, world):
        result = milora("merge", "--adapter", str(world.run), "--output", "/sys/milora-merge")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "/sys/milora-merge" in result.stderr

    def test_an_unwritable_milora_cache_is_one_line(self, tmp_path):
        blocker = tmp_path / "cache"
        blocker.write_text("a file where the cache folder should be")
        env = {**os.environ, "MILORA_CACHE": str(blocker)}
        result = milora("svd-inspect", "smollm2-135m", "--layers", "0", env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(blocker) in result.stderr

    def test_a_full_disk_is_one_line_naming_the_output(self, world):
        """RLIMIT_FSIZE makes every write past 64 KiB fail as a full disk does (Python ignores SIGXFSZ)."""
        out = world.tmp / "merged"
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

        result = subprocess.run([sys.executable, "-m", "milora_cli", "merge", "--adapter", str(world.run), "--output", str(out)],
                                cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=limit, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip() == f"error: {out}: File too large" and not out.exists()
