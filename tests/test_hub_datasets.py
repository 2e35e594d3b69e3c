"""Hub datasets through a hub cache that copies the real repositories' layouts: their file names, their
columns and their dataset cards' YAML front-matter (where each was seen is cited beside it). Rows are a few
made here. The caches hold the repository's whole listing (trees/<commit>.json, as huggingface_hub writes it
online) but only the files a download of the chosen split would bring: were milora to ask for any other
file, huggingface_hub would refuse offline that the snapshot is incomplete, so each passing read also shows
that nothing else was fetched."""

import json
import os

import pyarrow.parquet as pq
import pytest

from hub_cache import add_repo
from hub_repos import (ALPACA_CARD, ALPACA_FILE, GITATTRIBUTES, GSM8K_CARD, METAMATH_CARD, ULTRACHAT_CARD, ULTRACHAT_FILES,
                       WIKITEXT_CARD, WIKITEXT_CONFIGS, parquet, wikitext_rows)
from milora_cli.data import hub
from milora_cli.data.records import load_records
from milora_cli.errors import DataError, HubError
from test_data import make_cfg

def gsm8k_rows(config: str, split: str, n: int = 3) -> list[dict]:
    return [{"question": f"{config} {split} question {i}?", "answer": f"{config} {split} step {i}.\n#### {i}"} for i in range(n)]


def gsm8k_files() -> dict[str, bytes]:
    files = {f"{c}/{s}-00000-of-00001.parquet": parquet(gsm8k_rows(c, s)) for c in ("main", "socratic") for s in ("train", "test")}
    return files | {"README.md": GSM8K_CARD.encode(), ".gitattributes": GITATTRIBUTES}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HOME, read offline (in this process: huggingface_hub reads its constants at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def test_gsm8k_a_config_and_its_splits_only(offline_cache):
    chosen = {"README.md", "main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet"}
    add_repo(offline_cache, "openai/gsm8k", "dataset", gsm8k_files(), listed=True, fetched=chosen)
    train, val = load_records(make_cfg(path="openai/gsm8k", config="main", validation_split="test"), seed=0)
    assert sorted(ex.instruction for ex in train) == [q["question"] for q in gsm8k_rows("main", "train")]
    assert sorted(ex.instruction for ex in val) == [q["question"] for q in gsm8k_rows("main", "test")]
    files = hub.split_files("openai/gsm8k", "main", "train", None)
    assert [f.relative_to(f.parents[1]).as_posix() for f in files] == ["main/train-00000-of-00001.parquet"]

    # Two configs and no default: the split alone is ambiguous, and so is a split the config lacks.
    listing = "configs and their splits: main: train, test; socratic: train, test"
    for overrides, message in [({}, "has several configs and no default: set data.config"),
                               ({"config": "main", "split": "validation"}, "config 'main' has no split 'validation'"),
                               ({"config": "main", "split": "main/train"}, "config 'main' has no split 'main/train'"),
                               ({"config": "Main"}, "has no config 'Main'")]:
        with pytest.raises(DataError) as error:
            load_records(make_cfg(path="openai/gsm8k", **overrides), seed=0)
        assert listing in str(error.value) and message in str(error.value), str(error.value)
    with pytest.raises(DataError, match="data.validation_split 'train' is the training split"):
        load_records(make_cfg(path="openai/gsm8k", config="main", validation_split="train"), seed=0)


def test_a_split_not_fetched_is_named_with_the_command_that_fetches_it(offline_cache):
    add_repo(offline_cache, "openai/gsm8k", "dataset", gsm8k_files(), listed=True,
             fetched={"README.md", "main/train-00000-of-00001.parquet"})
    train, _ = load_records(make_cfg(path="openai/gsm8k", config="main", val_size=1), seed=0)
    assert len(train) == 2
    with pytest.raises(HubError) as error:
        load_records(make_cfg(path="openai/gsm8k", config="socratic"), seed=0)
    assert "only partly in the local Hugging Face cache" in str(error.value)
    assert "--include socratic/train-00000-of-00001.parquet" in str(error.value) and "\n" not in str(error.value)


def test_wikitext_one_config_of_four_and_only_its_file(offline_cache):
    files = {"README.md": WIKITEXT_CARD.encode(), ".gitattributes": GITATTRIBUTES}
    for config in WIKITEXT_CONFIGS:
        shards = 2 if "103" in config else 1  # wikitext-103's train split is two shards on the hub
        files |= {f"{config}/test-00000-of-00001.parquet": parquet([{"text": f"{config} test"}, {"text": ""}]),
                  f"{config}/validation-00000-of-00001.parquet": parquet([{"text": f"{config} validation"}])}
        files |= {f"{config}/train-0000{i}-of-0000{shards}.parquet": parquet([{"text": f"{config} train {i}"}]) for i in range(shards)}
    add_repo(offline_cache, "Salesforce/wikitext", "dataset", files, listed=True,
             fetched={"README.md", "wikitext-2-v1/test-00000-of-00001.parquet"})
    [test] = hub.split_files("Salesforce/wikitext", "wikitext-2-v1", "test", None)
    assert test.name == "test-00000-of-00001.parquet" and test.parent.name == "wikitext-2-v1"
    assert pq.read_table(test).to_pylist() == [{"text": "wikitext-2-v1 test"}, {"text": ""}]
    with pytest.raises(DataError, match="wikitext-103-raw-v1: test, train, validation; wikitext-103-v1: test, train, validation; "
                                        "wikitext-2-raw-v1: test, train, validation; wikitext-2-v1: test, train, validation"):
        hub.split_files("Salesforce/wikitext", None, "test", None)


def test_ultrachat_splits_named_by_its_card(offline_cache):
    def conversation(split, shard, i):
        return {"prompt": f"{split} {shard} {i}", "prompt_id": f"{split}-{shard}-{i}",
                "messages": [{"content": f"{split} {shard} {i}", "role": "user"}, {"content": "Sure.", "role": "assistant"}]}
    files = {path: parquet([conversation(split, shard, i) for i in range(2)])
             for split, paths in ULTRACHAT_FILES.items() for shard, path in enumerate(paths)}
    add_repo(offline_cache, "HuggingFaceH4/ultrachat_200k", "dataset",
             files | {"README.md": ULTRACHAT_CARD.encode(), ".gitattributes": GITATTRIBUTES}, listed=True,
             fetched={"README.md", *ULTRACHAT_FILES["train_sft"]})
    chosen = hub.split_files("HuggingFaceH4/ultrachat_200k", None, "train_sft", None)
    assert [f"data/{f.name}" for f in chosen] == ULTRACHAT_FILES["train_sft"]
    rows = [row for f in chosen for row in pq.read_table(f).to_pylist()]
    assert [row["messages"] for row in rows] == [conversation("train_sft", s, i)["messages"] for s in range(3) for i in range(2)]
    with pytest.raises(DataError, match=r"\(configs and their splits: default: train_sft, test_sft, train_gen, test_gen\): "
                                        "config 'default' has no split 'train'"):
        hub.split_files("HuggingFaceH4/ultrachat_200k", None, "train", None)


def test_alpaca_and_metamath_by_the_naming_conventions(offline_cache):
    alpaca = [{"instruction": f"Do {i}.", "input": "", "output": f"Done {i}.", "text": f"### Instruction:\nDo {i}."} for i in range(5)]
    add_repo(offline_cache, "tatsu-lab/alpaca", "dataset", {"README.md": ALPACA_CARD.encode(), ".gitattributes": GITATTRIBUTES,
                                                              ALPACA_FILE: parquet(alpaca)}, listed=True)
    metamath = [{"query": f"What is {i}?", "response": f"It is {i}. The answer is: {i}", "type": "GSM_AnsAug",
                 "original_question": f"What is {i}?"} for i in range(5)]
    add_repo(offline_cache, "meta-math/MetaMathQA", "dataset", {"README.md": METAMATH_CARD.encode(), ".gitattributes": GITATTRIBUTES,
                                                                  "MetaMathQA-395K.json": json.dumps(metamath).encode()}, listed=True)
    train, val = load_records(make_cfg(path="tatsu-lab/alpaca", val_size=2), seed=0)
    assert sorted(ex.output for ex in train + val) == [r["output"] for r in alpaca] and len(val) == 2
    train, _ = load_records(make_cfg(path="meta-math/MetaMathQA", val_size=0), seed=0)
    assert sorted(ex.answer for ex in train) == [str(i) for i in range(5)]
    with pytest.raises(DataError, match=r"\(configs and their splits: default: train\): config 'default' has no split 'test'"):
        load_records(make_cfg(path="meta-math/MetaMathQA", split="test"), seed=0)


def test_a_revision_reads_that_revision(offline_cache):
    rows = [{"query": f"old {i}?", "response": f"The answer is: {i}"} for i in range(3)]
    old = add_repo(offline_cache, "org/math", "dataset", {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()}, ref="v1.0")
    add_repo(offline_cache, "org/math", "dataset", {"train.jsonl": json.dumps({"query": "new?", "response": "The answer is: 9"}).encode()})
    for revision in ("v1.0", old.name):  # a tag, and the commit itself
        train, _ = load_records(make_cfg(path="org/math", revision=revision, val_size=0), seed=0)
        assert sorted(ex.instruction for ex in train) == ["old 0?", "old 1?", "old 2?"]
    train, _ = load_records(make_cfg(path="org/math", val_size=0), seed=0)
    assert [ex.instruction for ex in train] == ["new?"]


def test_hub_keys_on_a_local_file_are_refused(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "i", "output": "o"}] * 3))
    for key in ("config", "revision", "validation_split"):
        with pytest.raises(DataError, match=f"data.{key} name a part of a hub dataset, but data.path '{path}' is a local file"):
            load_records(make_cfg(path=str(path), **{key: "x"}), seed=0)


def test_globs_follow_the_hub():
    """fsspec >= 2023.12 globs as Python's glob does: `*` stops at "/", a `**` part spans folders (zero too)."""
    assert hub.glob_match("main/train-*", "main/train-00000-of-00001.parquet")
    assert not hub.glob_match("main/train-*", "socratic/train-00000-of-00001.parquet")
    assert not hub.glob_match("*.json", "a/b.json") and hub.glob_match("**/*.json", "b.json")
    assert hub.glob_match("**/train[-._ 0-9]*", "a/b/train-1.json") and not hub.glob_match("**/train[-._ 0-9]*", "a/training.json")
    assert hub.convention_splits(["data/train.json", "data/test.json", "dev/x.json"]) == {
        "validation": [p.format(kw=kw) for kw in hub.SPLIT_KEYWORDS["validation"] for p in hub._IN_FOLDER]}


def test_wikitext_from_the_hub_is_the_data_dir_text(offline_cache, shared_data):
    """The whole WikiText-2 test text, as --data-dir holds it and as Salesforce/wikitext's rows hold it."""
    from milora_cli.evaluation import tasks

    text = (shared_data / "wikitext2/test.txt").read_text(encoding="utf-8")
    rows = wikitext_rows(text.splitlines(keepends=True))
    assert len(rows) == 4358 and sum(row["text"] == "" for row in rows) == 1467  # the card's num_examples for test
    add_repo(offline_cache, "Salesforce/wikitext", "dataset",
             {"README.md": WIKITEXT_CARD.encode(), "wikitext-2-v1/test-00000-of-00001.parquet": parquet(rows)})
    task = tasks.TASKS["wikitext"]
    assert tasks.load_text(task, None) == tasks.load_text(task, str(shared_data)) == text


def test_train_refuses_an_ambiguous_hub_dataset_in_one_line(tmp_path, tiny_model_dir):
    from helpers import milora

    add_repo(tmp_path, "openai/gsm8k", "dataset", gsm8k_files(), listed=True)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = milora("train", "recipes/quickstart.yaml", f"model.name_or_path={tiny_model_dir}", "data.builtin=null",
                    "data.path=openai/gsm8k", f"output.dir={tmp_path / 'run'}", env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "main: train, test; socratic: train, test" in lines[0] and "set data.config" in lines[0]
    assert not (tmp_path / "run").exists()


def test_configs_and_splits_without_card_configs():
    """datasets' conventions (data_files.py) for a card without configs, and a card's other data_files forms."""
    assert hub.convention_splits(["train/a.json", "train/b.json", "test/c.json"]) == {  # folders named for a split
        split: [p.format(kw=kw) for kw in hub.SPLIT_KEYWORDS[split] for p in hub._IN_FOLDER] for split in ("train", "test")}
    [default] = hub.convention_configs(["train/a.json", "test/c.json"])  # split folders are not configs
    assert default.name == "default" and hub.choose("org/x", ["train/a.json", "test/c.json"], None, None, "test") == ["test/c.json"]
    gsm8k = [f"{c}/{s}-00000-of-00001.parquet" for c in ("main", "socratic") for s in ("train", "test")]
    assert [c.name for c in hub.convention_configs(gsm8k)] == ["main", "socratic"]  # without its card: still never mixed
    assert hub.choose("openai/gsm8k", gsm8k, None, "socratic", "test") == ["socratic/test-00000-of-00001.parquet"]
    card = ("---\nconfigs:\n- config_name: all\n  data_files: [\"*.jsonl\"]\n- config_name: nested\n  data_dir: sub\n"
            "  default: true\n---\n")
    files = ["a.jsonl", "b.jsonl", "sub/train.json", "sub/validation.json"]
    configs = hub.card_configs(card, "org/x", files)
    assert hub.choose("org/x", files, configs, "all", "train") == ["a.jsonl", "b.jsonl"]
    assert hub.choose("org/x", files, configs, None, "validation") == ["sub/validation.json"]
    with pytest.raises(DataError, match="its card's `configs:` must be a list of mappings with a config_name"):
        hub.card_configs("---\nconfigs:\n- data_files: x\n---\n", "org/x", files)
