"""Properties of milora_cli.data (records, tokens, builtin): layouts, loading, splitting, label masks, truncation and collation."""

import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from milora_cli.data import builtin, records, tokens
from milora_cli.data.records import Example, format_prompt, load_records, normalize_record, prompt_for_generation
from milora_cli.data.tokens import Collator, TokenizedExample, build_dataset, render_label_mask, tokenize_example
from milora_cli.errors import DataError, MiloraError

EXAMPLES = [
    Example("Is the sky blue?", "", "the correct answer is true", "true"),
    Example("Add the numbers.", "2 and 3", "2 + 3 = 5. The answer is: 5", "5"),
    Example("Translate to French: café crème", "", "Un café crème, s'il vous plaît. ☕", None),
]


def make_cfg(**overrides):
    """A stand-in for recipe.DataConfig: the attributes data.py reads, nothing more."""
    fields = dict(
        path=None, builtin=None, format="auto", config=None, split="train", revision=None, validation_split=None,
        validation_path=None,
        val_size=3, max_length=256, train_on_prompt=False, max_examples=None,
    )  # fmt: skip
    fields.update(overrides)
    return SimpleNamespace(**fields)


def write_records(tmp_path, n: int, suffix: str = ".json"):
    records = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(n)]
    path = tmp_path / f"records{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path, records


# ----------------------------------------------------------------------------------------- prompts


def test_prompt_template_matches_the_spec():
    assert format_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert format_prompt("Do X.", "with Y") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\nwith Y\n\n### Response:\n"
    )
    assert prompt_for_generation(EXAMPLES[1]) == format_prompt("Add the numbers.", "2 and 3")


# ------------------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("ex", EXAMPLES, ids=["no-input", "input", "unicode"])
def test_labels_cover_exactly_response_and_eos(smol_tokenizer, ex):
    tok = tokenize_example(ex, smol_tokenizer, max_length=512, train_on_prompt=False)
    prompt_ids = smol_tokenizer(prompt_for_generation(ex))["input_ids"]
    n_prompt = len(prompt_ids)
    # The prompt tokens are the very tokens evaluation conditions generation on.
    assert tok.input_ids[:n_prompt] == prompt_ids
    assert tok.labels[:n_prompt] == [tokens.IGNORE_INDEX] * n_prompt
    assert tok.labels[n_prompt:] == tok.input_ids[n_prompt:]
    assert tok.input_ids[-1] == smol_tokenizer.eos_token_id
    trained = [t for t in tok.labels if t != tokens.IGNORE_INDEX]
    assert smol_tokenizer.decode(trained) == ex.output + smol_tokenizer.eos_token
    assert not tok.truncated


def test_train_on_prompt_labels_everything(smol_tokenizer):
    tok = tokenize_example(EXAMPLES[1], smol_tokenizer, max_length=512, train_on_prompt=True)
    assert tok.labels == tok.input_ids


def test_truncation_keeps_the_start_and_drops_examples_without_labels(smol_tokenizer):
    ex = EXAMPLES[1]
    full = tokenize_example(ex, smol_tokenizer, max_length=512, train_on_prompt=False)
    n_prompt = len(smol_tokenizer(prompt_for_generation(ex))["input_ids"])
    cut = tokenize_example(ex, smol_tokenizer, max_length=n_prompt + 2, train_on_prompt=False)
    assert cut.truncated and len(cut.input_ids) == n_prompt + 2
    assert cut.input_ids == full.input_ids[: n_prompt + 2] and cut.labels == full.labels[: n_prompt + 2]
    assert tokenize_example(ex, smol_tokenizer, max_length=n_prompt, train_on_prompt=False) is None
    # With the prompt trained on, something always remains to learn.
    assert tokenize_example(ex, smol_tokenizer, max_length=n_prompt, train_on_prompt=True) is not None


def test_build_dataset_counts(smol_tokenizer):
    full = [tokenize_example(ex, smol_tokenizer, 512, False) for ex in EXAMPLES]
    prompt_lens = [len(smol_tokenizer(prompt_for_generation(ex))["input_ids"]) for ex in EXAMPLES]
    # Cut a little into the shortest example's response: examples whose prompt alone fills max_length lose
    # every label and are dropped; the others are kept, truncated if they were longer.
    max_length = min(prompt_lens) + 3
    dropped = [n >= max_length for n in prompt_lens]
    ds = build_dataset(EXAMPLES, smol_tokenizer, max_length, False)
    assert ds.n_dropped == sum(dropped) and len(ds) == len(EXAMPLES) - sum(dropped) >= 1
    kept_full = [t for t, gone in zip(full, dropped, strict=False) if not gone]
    assert ds.n_truncated == sum(len(t.input_ids) > max_length for t in kept_full) >= 1
    assert ds.n_tokens == sum(min(len(t.input_ids), max_length) for t in kept_full)
    assert ds.n_label_tokens == sum(sum(x != tokens.IGNORE_INDEX for x in t.labels) for t in ds.examples) > 0
    untouched = build_dataset(EXAMPLES, smol_tokenizer, 512, False)
    assert (untouched.n_dropped, untouched.n_truncated) == (0, 0)
    assert untouched.n_tokens == sum(len(t.input_ids) for t in full)
    response_lens = [len(smol_tokenizer(ex.output, add_special_tokens=False)["input_ids"]) for ex in EXAMPLES]
    assert untouched.n_label_tokens == sum(response_lens) + len(EXAMPLES)  # + one eos each


def test_collator_right_pads(smol_tokenizer):
    batch = [tokenize_example(ex, smol_tokenizer, 512, False) for ex in EXAMPLES]
    collate = pickle.loads(pickle.dumps(Collator(pad_token_id=smol_tokenizer.pad_token_id)))
    collated = collate(batch)
    out = {**collated.inputs, "labels": collated.labels}
    lengths = [len(t.input_ids) for t in batch]
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for key in out:
        assert out[key].dtype == torch.long and out[key].shape == (len(batch), max(lengths))
    assert collated.n_tokens == sum(lengths) and len(collated.targets) == sum(t.n_targets for t in batch)
    assert out["attention_mask"].sum(dim=1).tolist() == lengths
    for row, t in enumerate(batch):
        n = lengths[row]
        assert out["input_ids"][row, :n].tolist() == t.input_ids
        assert out["labels"][row, :n].tolist() == t.labels
        assert (out["input_ids"][row, n:] == smol_tokenizer.pad_token_id).all()
        assert (out["labels"][row, n:] == tokens.IGNORE_INDEX).all()
        assert (out["attention_mask"][row, n:] == 0).all()


def test_render_label_mask_styles_the_trained_part(smol_tokenizer):
    ex = EXAMPLES[2]
    text = render_label_mask(smol_tokenizer, tokenize_example(ex, smol_tokenizer, 512, False))
    trained = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "bold green")
    dim = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "dim")
    assert trained.startswith(ex.output + smol_tokenizer.eos_token)
    assert dim.startswith(prompt_for_generation(ex))
    assert "carry loss" in text.plain.splitlines()[-1]


# ---------------------------------------------------------------------------------------- layouts


def test_gsm8k_record_becomes_metamath_style():
    raw = {"question": "How many?", "answer": "He has 1000+234 = <<1000+234=1234>>1234 apples.\n#### 1,234"}
    ex = normalize_record(raw, "gsm8k")
    assert ex == Example("How many?", "", "He has 1000+234 = 1234 apples.\nThe answer is: 1234", "1234")


def test_metamath_answer_is_after_the_last_marker():
    raw = {"query": "Q?", "response": "Not The answer is: 1 yet. Then 2. The answer is: \\frac{1}{2}"}
    ex = normalize_record(raw, "metamath")
    assert ex.answer == "\\frac{1}{2}" and ex.output == raw["response"] and ex.instruction == "Q?"
    assert normalize_record(raw, "auto") == ex


def test_alpaca_input_may_be_missing_and_answer_becomes_text():
    assert normalize_record({"instruction": "I", "output": "O"}, "alpaca") == Example("I", "", "O", None)
    ex = normalize_record({"instruction": "I", "input": None, "output": "O", "answer": 4.0}, "llm_adapters")
    assert ex == Example("I", "", "O", "4.0")


def test_bad_keys_name_the_file_record_and_missing_key():
    missing_output = r"f\.json, record 7: missing key 'output'.*keys seen: \['instruction'"
    with pytest.raises(DataError, match=missing_output):
        normalize_record({"instruction": "I", "response": "O"}, "llm_adapters", source="f.json", index=7)
    with pytest.raises(DataError, match="cannot tell the record layout"):
        normalize_record({"prompt": "I", "completion": "O"}, "auto")
    with pytest.raises(DataError, match="'output' must be a string"):
        normalize_record({"instruction": "I", "output": ["O"]}, "llm_adapters")
    with pytest.raises(DataError, match="#### N"):
        normalize_record({"question": "Q", "answer": "no final line"}, "gsm8k")
    assert issubclass(DataError, MiloraError)


@pytest.mark.parametrize(
    "relpath, layout",
    [
        ("commonsense/boolq/train.json", "llm_adapters"),
        ("instruct/alpaca_5000.json", "llm_adapters"),
        ("math/llm_adapters_math_data.json", "llm_adapters"),
        ("math/gsm8k_train.jsonl", "gsm8k"),
    ],
)
def test_real_files_are_auto_detected(shared_data, relpath, layout):
    path = shared_data / relpath
    raw = records.Source(str(path)).read()
    assert records.detect_format(raw[0]) == layout
    train, val = load_records(make_cfg(path=str(path), val_size=10), seed=0)
    assert len(train) + len(val) == len(raw) and len(val) == 10
    for ex in train[:200] + val:
        assert ex.instruction and ex.output
        if layout == "gsm8k":
            assert ex.output.endswith(f"The answer is: {ex.answer}") and "####" not in ex.output
            assert "<<" not in ex.output and "," not in ex.answer
    if relpath.startswith("commonsense"):
        assert all(ex.output == f"the correct answer is {ex.answer}" for ex in train)


# ---------------------------------------------------------------------------------------- loading


def test_json_jsonl_parquet_give_the_same_examples(tmp_path):
    loaded = []
    for suffix in (".json", ".jsonl", ".parquet"):
        path, records = write_records(tmp_path, 8, suffix)
        loaded.append(load_records(make_cfg(path=str(path), val_size=2), seed=1))
    assert loaded[0] == loaded[1] == loaded[2]
    train, val = loaded[0]
    assert {ex.instruction for ex in train + val} == {r["instruction"] for r in records}


def test_split_is_seeded_and_disjoint(tmp_path):
    path, records = write_records(tmp_path, 50)
    cfg = make_cfg(path=str(path), val_size=10)
    train, val = load_records(cfg, seed=3)
    assert (train, val) == load_records(cfg, seed=3)
    assert val != load_records(cfg, seed=4)[1]
    assert len(val) == 10 and len(train) == 40
    assert not {ex.instruction for ex in train} & {ex.instruction for ex in val}
    capped, capped_val = load_records(make_cfg(path=str(path), val_size=10, max_examples=5), seed=3)
    assert capped == train[:5] and capped_val == val


def test_validation_path_replaces_the_holdout(tmp_path):
    path, records = write_records(tmp_path, 6, ".jsonl")
    val_path, _ = write_records(tmp_path, 4, ".json")
    train, val = load_records(make_cfg(path=str(path), validation_path=str(val_path), val_size=3), seed=0)
    assert len(train) == 6 and len(val) == 4


def test_loading_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*missing.json"):
        load_records(make_cfg(path=str(tmp_path / "missing.json")), seed=0)
    with pytest.raises(DataError, match="data file not found"):
        load_records(make_cfg(path="no_such_file.jsonl"), seed=0)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_records(make_cfg(path=str(tmp_path / "empty.json")), seed=0)
    (tmp_path / "obj.json").write_text('{"instruction": "I", "output": "O"}')
    with pytest.raises(DataError, match="list of records"):
        load_records(make_cfg(path=str(tmp_path / "obj.json")), seed=0)
    (tmp_path / "broken.jsonl").write_text('{"instruction": "I", "output": "O"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_records(make_cfg(path=str(tmp_path / "broken.jsonl")), seed=0)
    path, _ = write_records(tmp_path, 3)
    with pytest.raises(DataError, match="val_size=3 would leave none"):
        load_records(make_cfg(path=str(path), val_size=3), seed=0)


def test_hub_dataset_ids_are_read_from_the_hub_cache_by_split(tmp_path, monkeypatch):
    from hub_cache import add_repo

    from milora_cli.errors import HubError

    rows = [{"query": f"q{i}", "response": f"r. The answer is: {i}"} for i in range(6)]
    def line(part):
        return "".join(json.dumps(r) + "\n" for r in part).encode()
    add_repo(tmp_path, "org/math", "dataset", {"data/train-00000-of-00002.jsonl": line(rows[:3]),
                                                 "data/train-00001-of-00002.jsonl": line(rows[3:5]),
                                                 "data/test-00000-of-00001.jsonl": line(rows[5:])})
    add_repo(tmp_path, "org/one-file", "dataset", {"commonsense_170k.json": json.dumps(rows).encode()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    train, val = load_records(make_cfg(path="org/math", split="train", val_size=1), seed=0)
    assert sorted(ex.answer for ex in train + val) == ["0", "1", "2", "3", "4"]  # both train shards, not test
    train, _ = load_records(make_cfg(path="org/math", split="test", val_size=0), seed=0)
    assert [ex.answer for ex in train] == ["5"]
    train, val = load_records(make_cfg(path="org/one-file", val_size=2), seed=0)  # one file: the train split
    assert len(train) == 4 and len(val) == 2
    with pytest.raises(DataError, match=r"\(configs and their splits: default: train\): config 'default' has no split 'validation'"):
        load_records(make_cfg(path="org/one-file", split="validation"), seed=0)
    with pytest.raises(HubError, match="dataset 'org/missing' is not a local path and not in the local Hugging Face cache"):
        load_records(make_cfg(path="org/missing"), seed=0)


def test_builtin_registry(monkeypatch):
    def generate(seed):
        rows = [{"instruction": f"i{seed}-{k}", "input": "", "output": "o", "answer": None} for k in range(4)]
        return rows[:3], rows[3:]

    monkeypatch.setitem(builtin.BUILTINS, "toy", builtin.Builtin(generate, lambda generation, record: True, "llm_adapters"))
    train, val = load_records(make_cfg(builtin="toy", max_examples=2), seed=5)
    assert [ex.instruction for ex in train] == ["i5-0", "i5-1"] and [ex.instruction for ex in val] == ["i5-3"]
    with pytest.raises(DataError, match="unknown builtin dataset 'nope'"):
        load_records(make_cfg(builtin="nope"), seed=0)


def test_tokenized_example_is_a_plain_dataclass():
    t = TokenizedExample(input_ids=[1, 2], labels=[-100, 2], truncated=False)
    assert pickle.loads(pickle.dumps(t)) == t
