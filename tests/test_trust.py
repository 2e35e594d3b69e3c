"""Files from strangers (issue 20): a downloaded recipe, run, eval folder, adapter, model folder or factor cache
runs no code unasked, leaks nothing into what milora writes, and makes milora delete or write nothing outside
its output. One test per thing such a file does; the runs and folders are issue 12's (test_bad_input.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import milora
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import test_bad_input
from test_bad_input import World, cli, edit_json, eval_args, squash
from transformers import LlamaForCausalLM

from milora_cli import adapter, adapter_folder, atomic, locate, models
from milora_cli.errors import HubError
from milora_cli.recipe import AdapterConfig
from milora_cli.training import init_cache

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
originals, world = test_bad_input.originals, test_bad_input.world  # its fixtures: a finished tiny run, a stopped one


def refused(code: int, err: str, *needles: str) -> bool:
    """Exit code 2 and one `error: ` line holding every needle."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # transformers' load bar may precede it
    return code == 2 and len(lines) == 1 and all(squash(needle) in squash(lines[0]) for needle in needles) and "Traceback" not in err


def with_remote_code(model: Path, marker: Path) -> Path:
    """A model folder whose config.json maps the Auto classes onto its own evil.py (as hub repositories with custom
    code do: transformers' auto_map), which writes `marker` when it runs."""
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('the repository code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'llama'\n\n\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    return model


# --- 1. remote code only with --trust-remote-code ---------------------------------------------------------


def test_recipe_with_trust_remote_code_runs_no_code_without_the_flag(world: World):
    marker = world.tmp / "RAN"
    model = with_remote_code(world.tmp / "model", marker)
    recipe = world.tmp / "stranger.yaml"
    raw = yaml.safe_load(world.recipe.read_text())
    raw["model"] |= {"name_or_path": str(model), "trust_remote_code": True}
    raw["output"]["dir"] = str(world.tmp / "new")
    recipe.write_text(yaml.safe_dump(raw))
    code, out, err = cli("train", recipe, "--dry-run")
    assert code == 0, out + err
    assert not marker.exists()
    assert "note: model.trust_remote_code in the recipe runs no code by itself; add --trust-remote-code" in err


def test_the_trust_remote_code_flag_runs_the_model_code(world: World):
    marker = world.tmp / "RAN"
    model = with_remote_code(world.tmp / "model", marker)
    env = {**os.environ, "HF_MODULES_CACHE": str(world.tmp / "modules"), "OMP_NUM_THREADS": "1"}  # transformers copies the code there
    done = milora("train", str(world.recipe), f"model.name_or_path={model}", f"output.dir={world.tmp / 'new'}", "--dry-run",
                  "--trust-remote-code", env=env)
    assert done.returncode == 0, done.stderr
    assert marker.read_text() == "the repository code ran"


def test_a_run_folder_of_another_recipe_does_not_say_to_run_its_recipe(world: World):
    code, _, err = cli("train", world.recipe, "train.lr=0.5")
    assert refused(code, err, "holds a run of a different recipe") and "recipe.yaml" not in err


# --- 2, 3. nothing deleted, emptied or written through a symbolic link ----------------------------------


def test_force_through_a_symlinked_output_deletes_nothing_it_points_to(world: World):
    results = world.tmp / "results"
    results.symlink_to(world.tmp / "model")
    code, _, err = cli(*eval_args(world, world.model, results, "--force"))
    assert (world.tmp / "model" / "config.json").is_file() and results.is_symlink()
    assert refused(code, err, str(results), "symbolic link")


def test_a_metrics_file_linked_to_another_file_is_not_emptied(world: World):
    precious = world.tmp / "precious.txt"
    precious.write_text("export SECRET=1\n")
    metrics = world.stopped / "metrics.jsonl"
    metrics.unlink()
    metrics.symlink_to(precious)
    code, _, err = cli("train", world.recipe)
    assert precious.read_text() == "export SECRET=1\n"
    assert refused(code, err, str(metrics), "symbolic link")


def test_a_predictions_file_linked_to_another_eval_gets_no_lines_appended(world: World):
    first, second = world.tmp / "first", world.tmp / "second"
    assert cli(*eval_args(world, world.model, first))[0] == 0
    before = (first / "predictions.jsonl").read_bytes()
    second.mkdir()
    shutil.copyfile(first / "settings.json", second / "settings.json")
    (second / "predictions.jsonl").symlink_to(first / "predictions.jsonl")
    code, _, err = cli(*eval_args(world, world.model, second)[:-6], "--limit", "4", "--max-new-tokens", "2", "--output", second)
    assert (first / "predictions.jsonl").read_bytes() == before
    assert refused(code, err, str(second / "predictions.jsonl"), "symbolic link")


def test_a_tensorboard_folder_linked_elsewhere_gets_no_event_files(world: World):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: the run writes no TensorBoard logs")
    elsewhere, run = world.tmp / "elsewhere", world.tmp / "fresh"
    elsewhere.mkdir()
    run.mkdir()
    (run / "tensorboard").symlink_to(elsewhere)
    code, _, err = cli("train", world.recipe, f"output.dir={run}", "output.report_to=tensorboard", "train.max_steps=1")
    assert not list(elsewhere.iterdir())
    assert refused(code, err, str(run / "tensorboard"), "symbolic link")


def test_a_checkpoints_folder_linked_to_another_run_deletes_or_replaces_nothing_there(world: World):
    other = world.tmp / "other"
    shutil.copytree(world.stopped, other)
    shutil.rmtree(world.stopped / "checkpoints")
    (world.stopped / "checkpoints").symlink_to(other / "checkpoints")
    mine = other / "checkpoints" / "step-000004" / "mine.txt"  # gone if step-4 is deleted, even when trained again
    mine.write_text("the other run's")
    code, _, err = cli("train", world.recipe, "--resume", world.checkpoint(2))
    assert mine.is_file()
    assert refused(code, err, str(world.stopped / "checkpoints"), "symbolic link")


# --- 6. --resume through a link into another run --------------------------------------------------------


def test_resume_through_a_symlinked_checkpoint_deletes_nothing_in_the_other_run(world: World):
    other = world.tmp / "other"
    shutil.copytree(world.stopped, other)
    linked = world.checkpoint(2)
    shutil.rmtree(linked)
    linked.symlink_to(other / "checkpoints" / "step-000002")
    code, _, err = cli("train", world.recipe, "--resume", linked)
    assert (other / "checkpoints" / "step-000004").is_dir()
    assert refused(code, err, str(linked), "symbolic link")


# --- 4, 5. merge copies and reads only files inside the base folder -------------------------------------


def test_merge_does_not_copy_a_symlink_in_the_base_folder(world: World):
    token = world.tmp / "token"
    token.write_text("hf_secret")
    base = world.tmp / "model"
    (base / "notes.txt").symlink_to(token)
    code, _, err = cli("merge", "--adapter", world.run, "--base", base, "--output", world.tmp / "merged")
    assert not (world.tmp / "merged").exists()
    assert refused(code, err, str(base / "notes.txt"), str(token))


@pytest.mark.parametrize("where", ["../elsewhere/weights.safetensors", "{tmp}/elsewhere/weights.safetensors"],
                         ids=["relative", "absolute"])
def test_a_safetensors_index_naming_a_file_outside_the_folder_is_not_read(world: World, where: str):
    base = world.tmp / "model"
    (world.tmp / "elsewhere").mkdir()
    os.replace(base / "model.safetensors", world.tmp / "elsewhere" / "weights.safetensors")
    names = load_file(world.tmp / "elsewhere" / "weights.safetensors")
    entry = where.format(tmp=world.tmp)
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, entry)}))
    code, _, err = cli("merge", "--adapter", world.run, "--base", base, "--output", world.tmp / "merged")
    assert not (world.tmp / "merged").exists()
    assert refused(code, err, entry, "not a plain file name")


# --- 7. base_model_path in adapter_meta.json is a hint checked against the fingerprint ------------------


def test_an_adapter_naming_a_private_model_as_its_base_does_not_merge_onto_it(world: World):
    private = world.tmp / "private"
    shutil.copytree(world.model, private)
    model = LlamaForCausalLM.from_pretrained(private)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(0.01)
    model.save_pretrained(private)
    edit_json(world.run / "adapter" / adapter_folder.META_FILE, base_model_path=str(private))
    code, _, err = cli("merge", "--adapter", world.run, "--output", world.tmp / "merged")
    assert not (world.tmp / "merged").exists()
    assert refused(code, err, str(private), "pass --base")


def test_merge_says_which_base_it_used(world: World):
    code, out, err = cli("merge", "--adapter", world.run, "--output", world.tmp / "merged")
    assert code == 0, out + err
    assert squash(f"base model: {world.model.resolve()}") in squash(out)


# --- 8. no process-wide umask change --------------------------------------------------------------------


def test_an_atomic_write_leaves_the_process_umask_alone(tmp_path, monkeypatch):
    umask = int(re.search(r"Umask:\s*(\d+)", Path("/proc/self/status").read_text())[1], 8)  # read without changing it

    def changed(mask):
        raise AssertionError("os.umask was called: for a moment every thread's new files had another mode")

    monkeypatch.setattr(os, "umask", changed)
    atomic.write_text_atomic(tmp_path / "file.txt", "x")
    folder = atomic.new_folder(tmp_path, ".converted-")
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


# --- 9. revisions stay inside the hub cache -------------------------------------------------------------


def test_a_recipe_revision_climbing_out_of_the_hub_cache_is_refused(world: World):
    code, _, err = cli("train", world.recipe, "model.revision=../../../../etc", f"output.dir={world.tmp / 'new'}", "--dry-run")
    assert refused(code, err, "model.revision", "is not a hub revision")


def test_an_adapter_meta_revision_climbing_out_of_the_hub_cache_is_refused():
    with pytest.raises(HubError, match="is not a hub revision"):
        locate.hub_snapshot("milora-test/tiny-llama", "model", "../../../../etc")
    assert locate.check_revision("refs/pr/1") == "refs/pr/1"  # the hub's own pull-request refs stay legal


# --- 10. safetensors only, unless --allow-pickle-weights ------------------------------------------------


def test_a_model_folder_of_pickled_weights_is_not_unpickled_without_the_flag(world: World):
    pickled = world.tmp / "pickled"
    shutil.copytree(world.model, pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    code, _, err = cli(*eval_args(world, pickled, world.tmp / "e"))
    assert refused(code, err, "--allow-pickle-weights")
    code, out, err = cli(*eval_args(world, pickled, world.tmp / "e"), "--allow-pickle-weights")
    assert code == 0, out + err


# --- 11. ~ expanded once; the factor cache checked against the weight -----------------------------------


def test_an_output_dir_under_home_is_written_there_not_into_a_folder_named_tilde(world: World, monkeypatch):
    home, cwd = world.tmp / "home", world.tmp / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MILORA_CACHE", str(world.tmp / "cache"))
    monkeypatch.chdir(cwd)
    code, out, err = cli("train", world.recipe, "output.dir=~/runs/x", "train.max_steps=0")
    assert code == 0, out + err
    assert (home / "runs/x/adapter" / adapter_folder.META_FILE).is_file() and not (cwd / "~").exists()


@pytest.mark.parametrize("init", ["milora", "mica"])
def test_a_poisoned_factor_cache_file_is_not_used(tiny_model_dir, tmp_path, monkeypatch, init):
    """...and an honest one is (MiCA's A0 is 0: its B0 is checked on its own)."""
    monkeypatch.setenv("MILORA_CACHE", str(tmp_path / "cache"))
    cfg = AdapterConfig(init=init, r=4, target_modules=["q_proj"])

    def adapted() -> dict[str, adapter.MiloraLinear]:
        model = models.load_model(tiny_model_dir, "fp32")
        return adapter.inject(model, adapter.find_targets(model, cfg.target_modules), cfg.r, cfg.alpha, 0.0)

    honest = adapted()
    init_cache.initialise(honest, cfg, seed=0, use_cache=True)
    assert (init_cache.initialise(adapted(), cfg, seed=0, use_cache=True).cached) == 2  # honest files are used
    for path in (tmp_path / "cache" / "factors").glob("*.safetensors"):  # same key, other factors: what a poisoner writes
        with safe_open(path, "pt") as opened:
            key = opened.metadata()["key"]
        factors = load_file(path)
        save_file({name: torch.randn_like(value) for name, value in factors.items()}, path, metadata={"format": init_cache.FORMAT, "key": key})
    again = adapted()
    report = init_cache.initialise(again, cfg, seed=0, use_cache=True)
    assert (report.computed, report.cached) == (2, 0)
    for name, layer in again.items():
        assert torch.equal(layer.lora_A0, honest[name].lora_A0) and torch.equal(layer.lora_B0, honest[name].lora_B0)
