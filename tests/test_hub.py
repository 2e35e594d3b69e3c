"""Hub ids, offline, through a real Hugging Face cache: train with a model id and a dataset id, merge --base ID,
eval on hub-hosted benchmark files; and what a user sees for an id that is neither cached nor reachable."""

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from helpers import milora
from hub_cache import add_folder, add_repo
from hub_repos import GSM8K_CARD, WIKITEXT_CARD, parquet, wikitext_rows

MODEL_ID, DATA_ID, BENCH_ID = "milora-test/tiny-llama", "milora-test/commonsense-mini", "milora-test/benchmarks"


def jsonl(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_dir, shared_data) -> Path:
    """A hub cache holding the tiny model, a training set, and the benchmark files under the ids tasks.py reads."""
    home = tmp_path_factory.mktemp("hf-home")
    add_folder(home, MODEL_ID, "model", Path(tiny_model_dir))
    train = json.loads((shared_data / "commonsense/boolq/train.json").read_text())[:40]
    add_repo(home, DATA_ID, "dataset", {"data/train.json": json.dumps(train).encode(), "README.md": b"# mini"})
    add_repo(home, BENCH_ID, "dataset", {"commonsense/boolq/test.json": shared_data / "commonsense/boolq/test.json"})
    add_repo(home, "openai/gsm8k", "dataset", {"README.md": GSM8K_CARD.encode(),
                                                 "main/test-00000-of-00001.parquet": parquet(jsonl(shared_data / "math/gsm8k_test.jsonl", 50))})
    lines = (shared_data / "wikitext2/test.txt").read_text().splitlines(keepends=True)[:200]
    add_repo(home, "Salesforce/wikitext", "dataset", {"README.md": WIKITEXT_CARD.encode(),
                                                        "wikitext-2-v1/test-00000-of-00001.parquet": parquet(wikitext_rows(lines))})
    return home


def offline(home: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_train_merge_eval_with_hub_ids_offline(hf_home, tmp_path):
    env, run = offline(hf_home), tmp_path / "run"
    recipe = {
        "model": {"name_or_path": MODEL_ID},
        "adapter": {"init": "milora", "r": 4, "dropout": 0.05},
        "data": {"path": DATA_ID, "val_size": 4, "max_length": 96},
        "train": {"max_steps": 2, "micro_batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 2},
        "output": {"dir": str(run)},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    trained = milora("train", str(tmp_path / "recipe.yaml"), env=env)
    assert trained.returncode == 0, trained.stderr
    assert "data: 36 training examples" in trained.stdout  # the 40 hub records, 4 held out
    meta = json.loads((run / "adapter" / "adapter_meta.json").read_text())
    assert meta["base_model"] == MODEL_ID and "/hub/models--milora-test--tiny-llama/snapshots/" in meta["base_model_path"]

    merged = milora("merge", "--adapter", str(run), "--output", str(tmp_path / "merged"), "--base", MODEL_ID, env=env)
    assert merged.returncode == 0, merged.stderr
    assert json.loads((tmp_path / "merged" / "milora_export.json").read_text())["base_model"] == MODEL_ID

    # boolq from a hub dataset laid out like ../shared/data; gsm8k and wikitext from their public ids' files.
    scored = [milora("eval", str(run), "--tasks", "boolq", "--data-dir", BENCH_ID, "--limit", "3", "--max-new-tokens", "4",
                     "--output", str(tmp_path / "eval-boolq"), env=env),
              milora("eval", str(tmp_path / "merged"), "--tasks", "gsm8k,wikitext", "--limit", "2", "--max-new-tokens", "4",
                     "--output", str(tmp_path / "eval-hub"), env=env)]
    assert [result.returncode for result in scored] == [0, 0], [result.stderr for result in scored]
    boolq = json.loads((tmp_path / "eval-boolq" / "summary.json").read_text())["tasks"]["boolq"]
    hub = json.loads((tmp_path / "eval-hub" / "summary.json").read_text())["tasks"]
    assert boolq["examples"] == 3 and hub["gsm8k"]["examples"] == 2 and hub["wikitext"]["windows"] == 2


@pytest.mark.parametrize("endpoint", ["offline", "unreachable"])
def test_an_id_neither_cached_nor_reachable_is_one_line_within_seconds(endpoint, tmp_path, tiny_model_dir):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    env |= {"HF_HUB_OFFLINE": "1"} if endpoint == "offline" else {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    cases = {  # a model id, a relative path that does not exist, a dataset id, a benchmark's hub dataset
        "model 'no-org/no-model'": ("train", "recipes/quickstart.yaml", "model.name_or_path=no-org/no-model"),
        "model 'models/missing'": ("train", "recipes/quickstart.yaml", "model.name_or_path=models/missing"),
        "dataset 'no-org/no-data'": ("train", "recipes/quickstart.yaml", f"model.name_or_path={tiny_model_dir}", "data.builtin=null",
                                     "data.path=no-org/no-data"),
        "dataset 'openai/gsm8k'": ("eval", tiny_model_dir, "--tasks", "gsm8k"),
    }
    for i, (named, args) in enumerate(cases.items()):
        out = ["--output", str(tmp_path / str(i))] if args[0] == "eval" else [f"output.dir={tmp_path / str(i)}"]
        start = time.perf_counter()
        result = milora(*args, *out, env=env)
        seconds = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert named in lines[0] and "not in the local Hugging Face cache" in lines[0] and "hf download" in lines[0]
        # what this tells apart: an answer (a few seconds of imports, ~15 s on a loaded 2-core machine) from a
        # wait on the network (huggingface_hub's 10 s timeout a try, with retries and back-off: a minute or more)
        assert seconds < 60, (args, seconds)


def test_tasks_without_a_public_hub_dataset_ask_for_data_dir():
    from milora_cli.errors import EvalError
    from milora_cli.evaluation import tasks

    for name in ("boolq", "math"):
        with pytest.raises(EvalError, match=f"task {name}: no public hub dataset holds its data; pass --data-dir"):
            tasks.data_files(tasks.TASKS[name], None)


def test_broken_model_folders_are_one_line(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", ')
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty")}
    for folder, message in ((broken, "is not valid JSON"), (no_tokenizer, "cannot load the tokenizer")):
        result = milora("train", "recipes/quickstart.yaml", f"model.name_or_path={folder}", f"output.dir={tmp_path / 'o'}", env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.slow
def test_the_real_model_by_hub_id_offline_in_eval_and_svd_inspect(smollm2_path, hf_home, tmp_path):
    """The embedded model's converted folder as the hub repository HuggingFaceTB/SmolLM2-135M-Instruct."""
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    add_folder(hf_home, model_id, "model", Path(smollm2_path))
    env = offline(hf_home)
    inspected = milora("svd-inspect", model_id, "--layers", "0", "--modules", "q_proj", env=env)
    assert inspected.returncode == 0, inspected.stderr
    assert model_id in inspected.stdout and "1 matrices" in inspected.stdout
    scored = milora("eval", model_id, "--tasks", "boolq", "--data-dir", BENCH_ID, "--limit", "2", "--max-new-tokens", "4",
                    "--output", str(tmp_path / "eval"), env=env)
    assert scored.returncode == 0, scored.stderr
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["model"] == f"{model_id} [fp32]" and summary["tasks"]["boolq"]["examples"] == 2
