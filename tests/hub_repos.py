"""The real hub repositories the tests copy: their dataset cards' YAML front-matter (prose cut), file names and
the way their rows are laid out, each with where it was seen. Rows themselves are made by each test."""

import pyarrow as pa
import pyarrow.parquet as pq

# openai/gsm8k's card, front-matter as on the hub (huggingface.co/datasets/openai/gsm8k README.md, as stored in
# the public index; its dataset_info and prose cut); its files main/ and socratic/ {train,test}-00000-of-00001.parquet
# (issue 19; main/train-00000-of-00001.parquet at revision 740312add88f781978c0658806c59bc2815b9866 in users' fetch lists).
GSM8K_CARD = """---
pretty_name: Grade School Math 8K
tags:
- math-word-problems
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---

# Dataset Card for GSM8K
"""
WIKITEXT_CONFIGS = ["wikitext-103-raw-v1", "wikitext-103-v1", "wikitext-2-raw-v1", "wikitext-2-v1"]
# Salesforce/wikitext's card: one config per folder, each with test/train/validation globs (its README.md as stored
# in the public index); files {config}/test-00000-of-00001.parquet, validation-00000-of-00001.parquet and train, two
# shards for wikitext-103 (train-00000-of-00002.parquet, train-00001-of-00002.parquet) at revision b08601e0 (users'
# fetch lists and a datasets download_checksums record).
WIKITEXT_CARD = "---\npretty_name: WikiText\nconfigs:\n" + "".join(
    f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {c}/{s}-*\n" for s in ("test", "train", "validation"))
    for c in WIKITEXT_CONFIGS) + "---\n\n# Dataset Card for \"wikitext\"\n"
# HuggingFaceH4/ultrachat_200k's card (huggingface.co/datasets/HuggingFaceH4/ultrachat_200k/blob/main/README.md,
# commit f8e46c0) and its data files at revision 8049631c (file names as listed by users of that revision).
ULTRACHAT_CARD = """---
language:
- en
license: mit
pretty_name: UltraChat 200k
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train_sft-*
  - split: test_sft
    path: data/test_sft-*
  - split: train_gen
    path: data/train_gen-*
  - split: test_gen
    path: data/test_gen-*
---

# Dataset Card for UltraChat 200k
"""
ULTRACHAT_FILES = {
    "train_sft": ["data/train_sft-00000-of-00003-a3ecf92756993583.parquet", "data/train_sft-00001-of-00003-0a1804bcb6ae68c6.parquet",
                  "data/train_sft-00002-of-00003-ee46ed25cfae92c6.parquet"],
    "test_sft": ["data/test_sft-00000-of-00001-f7dfac4afe5b93f4.parquet"],
    "train_gen": ["data/train_gen-00000-of-00003-a6c9fb894be3e50b.parquet", "data/train_gen-00001-of-00003-d6a0402e417f35ca.parquet",
                  "data/train_gen-00002-of-00003-c0db75b92a2f48fd.parquet"],
    "test_gen": ["data/test_gen-00000-of-00001-3d4cd8309148a71f.parquet"],
}
# tatsu-lab/alpaca's card has no configs (huggingface.co/datasets/tatsu-lab/alpaca/blob/79f611d/README.md): its one
# file, data/train-00000-of-00001-a09b74b3ef9c3b56.parquet, is the train split by the sharded-name convention.
ALPACA_CARD = ("---\nlicense: cc-by-4.0\nlanguage:\n- en\ntags:\n- instruction-finetuning\npretty_name: Alpaca\n"
               "task_categories:\n- text-generation\n---\n# Dataset Card for Alpaca\n")
ALPACA_FILE = "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"
# meta-math/MetaMathQA's card has no configs either (its README.md front-matter: tags, license); its one data
# file, MetaMathQA-395K.json (a JSON list of query/response/type/original_question), is the train split.
METAMATH_CARD = "---\ntags:\n- math\n- math-qa\nlicense: mit\n---\n\nView the project page:\nhttps://meta-math.github.io/\n"
GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"


def parquet(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


def wikitext_rows(lines: list[str]) -> list[dict]:
    """The rows of Salesforce/wikitext's parquet files: the lines of the text, a blank one as "" (the wikitext
    loading script they were made by: `yield idx, {"text": row} if row.strip() else {"text": ""}`)."""
    return [{"text": line if line.strip() else ""} for line in lines]
