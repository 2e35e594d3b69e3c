"""Hub datasets as the hub defines them: a config (subset) and a split, and only their files fetched.

1. List the repository's files and fetch its dataset card, README.md (locate.hub_files).
2. Its configs: the card's YAML `configs:` when present (config_name, data_files as a glob, a list of
   globs, or a list of {split, path}, data_dir, `default: true`; the hub's "datasets-manual-configuration").
   Without them, one config, "default", whose splits follow the file-naming conventions of `datasets`
   (datasets/data_files.py): `data/{split}-NNNNN-of-NNNNN*.*` shards, then folders named for a split
   (train/, validation/, test/ and their synonyms), then file names holding one, else every file is train.
   One rule is milora's own, so that a split never silently mixes configs: in a repository without card
   configs whose data files all lie in top-level folders, where a split would take files of several
   (main/train-* and socratic/train-*: the hub's own parquet export lays configs out as
   {config}/{split}-*.parquet), each folder is a config, resolved as above.
3. The config: data.config, else the card's default (the only config, the one named "default", or the
   one marked `default: true`); several and no default is an error listing them.
4. The split's files: its globs matched against the listing with the hub's rules (`*` stops at "/",
   `**` crosses folders; hidden files and README.md are not data), then fetched, and nothing else.
An unknown config or split is one line listing every config and its splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from milora_cli import atomic, locate
from milora_cli.errors import DataError

# datasets/data_files.py: the split names the conventions know, each with its synonyms, in this order.
SPLIT_KEYWORDS = {
    "train": ["train", "training"],
    "validation": ["validation", "valid", "dev", "val"],
    "test": ["test", "testing", "eval", "evaluation"],
}
_SEP = "[-._ 0-9]"  # NON_WORDS_CHARS: what may stand beside a split's name in a file or folder name
SHARDED = re.compile(r"data/(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}[^/]*\.[^/]*")  # SPLIT_PATTERN_SHARDED
_IN_FOLDER = ["**/{kw}/**", "**/{kw}" + _SEP + "*/**", "**/*" + _SEP + "{kw}/**", "**/*" + _SEP + "{kw}" + _SEP + "*/**"]
_IN_NAME = ["**/{kw}" + _SEP + "*", "**/*" + _SEP + "{kw}" + _SEP + "*"]
# Files `datasets` never takes as data (FILES_TO_IGNORE), and the text formats it reads (milora reads three).
_NOT_DATA = {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip", "dataset_dict.json"}
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow")


@dataclass(frozen=True)
class Config:
    """One config (subset) of a hub dataset: its splits as globs over the repository's paths."""

    name: str
    splits: dict[str, list[str]]
    default: bool


def split_files(repo_id: str, config: str | None, split: str, revision: str | None) -> list[Path]:
    """The local paths of a hub dataset's `split` of `config` (None: its default), fetching only those."""
    folder, listing = locate.hub_files(repo_id, "dataset", revision)
    card = folder / "README.md"
    files = data_files(listing)
    configs = card_configs(atomic.read_text(card, DataError), repo_id, files) if card.is_file() else None
    chosen = choose(repo_id, files, configs, config, split)
    folder = locate.hub_snapshot(repo_id, "dataset", folder.name, patterns=chosen)  # folder.name: the commit
    return [folder / path for path in chosen]


def choose(repo_id: str, files: list[str], configs: list[Config] | None, config: str | None, split: str) -> list[str]:
    """The data files (repository paths, sorted) of `split` of `config`: steps 2 to 4 of the module docstring."""
    configs = configs or convention_configs(files)
    found = "; ".join(f"{c.name}: {', '.join(c.splits) or 'no splits'}" for c in configs)
    where = f"hub dataset '{repo_id}' (configs and their splits: {found})"
    if config is None:
        defaults = [c for c in configs if c.default or c.name == "default" or len(configs) == 1]
        if len(defaults) != 1:
            raise DataError(f"{where} has several configs and no default: set data.config to one of them")
        chosen = defaults[0]
    else:
        chosen = next((c for c in configs if c.name == config), None)
        if chosen is None:
            raise DataError(f"{where} has no config '{config}'; set data.config to one of them")
    if split not in chosen.splits:
        raise DataError(f"{where}: config '{chosen.name}' has no split '{split}'; set data.split to one of its splits")
    matched = sorted(f for f in files if any(glob_match(pattern, f) for pattern in chosen.splits[split]))
    if not matched:
        raise DataError(f"{where}: split '{split}' of config '{chosen.name}' ({', '.join(chosen.splits[split])}) "
                        f"matches no data file of the repository")
    return matched


def card_configs(card: str, repo_id: str, files: list[str]) -> list[Config] | None:
    """The `configs:` of a dataset card's YAML front-matter; None when it has none."""
    front, sep, _ = card.removeprefix("---\n").partition("\n---") if card.startswith("---\n") else ("", "", "")
    try:
        meta = yaml.safe_load(front) if sep else None
    except yaml.YAMLError as error:
        raise DataError(f"hub dataset '{repo_id}': its card's YAML is not valid ({getattr(error, 'problem', error)})") from None
    entries = meta.get("configs") if isinstance(meta, dict) else None
    if not entries:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("config_name"), str) for e in entries):
        raise DataError(f"hub dataset '{repo_id}': its card's `configs:` must be a list of mappings with a config_name")
    return [Config(e["config_name"], _card_splits(e, repo_id, files), bool(e.get("default"))) for e in entries]


def _card_splits(entry: dict[str, Any], repo_id: str, listing: list[str]) -> dict[str, list[str]]:
    """A card config's data_files: one glob or a list of globs (all train), or a list of {split, path};
    without data_files, the naming conventions over the files under its data_dir (or all files)."""
    files, folder = entry.get("data_files"), entry.get("data_dir")
    prefix = f"{folder.strip('/')}/" if isinstance(folder, str) else ""
    if files is None:
        inside = [f.removeprefix(prefix) for f in listing if f.startswith(prefix)]
        return {split: [prefix + g for g in globs] for split, globs in convention_splits(inside).items()}
    if isinstance(files, str):
        files = [files]
    if all(isinstance(f, str) for f in files):
        return {"train": [prefix + f for f in files]}
    splits: dict[str, list[str]] = {}
    for item in files:
        if not (isinstance(item, dict) and isinstance(item.get("split"), str) and isinstance(item.get("path"), str | list)):
            raise DataError(f"hub dataset '{repo_id}': config '{entry['config_name']}' has a data_files entry that is "
                            f"not {{split, path}}: {item!r}")
        paths = [item["path"]] if isinstance(item["path"], str) else item["path"]
        splits.setdefault(item["split"], []).extend(prefix + p for p in paths)
    return splits


def convention_configs(files: list[str]) -> list[Config]:
    """Configs of a repository whose card names none: "default", or, where the data files all lie in
    top-level folders and a split of the conventions would take files of several, one per folder."""
    splits = convention_splits(files)
    folders = sorted({f.split("/", 1)[0] for f in files})
    mixed = any(len({f.split("/", 1)[0] for f in files if any(glob_match(g, f) for g in globs)}) > 1 for globs in splits.values())
    if not mixed or any("/" not in f for f in files):
        return [Config("default", splits, True)]
    return [Config(folder, {split: [f"{folder}/{p}" for p in patterns]
                            for split, patterns in convention_splits([f.split("/", 1)[1] for f in files if f.startswith(f"{folder}/")]).items()},
                   False) for folder in folders]


def convention_splits(files: list[str]) -> dict[str, list[str]]:
    """Splits of data files by datasets' naming conventions (_get_data_files_patterns): the first rule that
    finds any split decides them all."""
    sharded = [m["split"] for f in files if (m := SHARDED.fullmatch(f))]
    if sharded:
        order = [s for s in SPLIT_KEYWORDS if s in sharded] + sorted(set(sharded) - set(SPLIT_KEYWORDS))
        return {s: [f"data/{s}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"] for s in order}
    for rule in (_IN_FOLDER, _IN_NAME):
        patterns = {split: [p.format(kw=kw) for kw in keywords for p in rule] for split, keywords in SPLIT_KEYWORDS.items()}
        found = {split: globs for split, globs in patterns.items() if any(glob_match(g, f) for g in globs for f in files)}
        if found:
            return found
    return {"train": ["**"]} if files else {}


def data_files(listing: list[str]) -> list[str]:
    """The paths of a repository listing that `datasets` would take as data: not hidden, not the card."""
    return sorted(f for f in listing if f.endswith(_DATA_SUFFIXES) and f.rsplit("/", 1)[-1] not in _NOT_DATA
                  and not any(part.startswith((".", "__")) for part in f.split("/")))


def glob_match(pattern: str, path: str) -> bool:
    """`path` matches `pattern` as fsspec >= 2023.12 globs it (Python's glob): `*`, `?` and `[...]` stay
    within one path part, a `**` part spans zero or more parts."""
    return re.fullmatch(_glob_regex(pattern), path) is not None


def _glob_regex(pattern: str) -> str:
    parts = pattern.strip("/").split("/")
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        out.append(re.sub(r"\*\*?|\?|\[!?[^\]]*\]|[^*?\[]+", _glob_token, part) + ("" if last else "/"))
    return "".join(out)


def _glob_token(match: re.Match[str]) -> str:
    token = match.group(0)
    if token.startswith("*"):
        return "[^/]*"
    if token == "?":
        return "[^/]"
    if token.startswith("["):
        return "[^" + token[2:] if token.startswith("[!") else token
    return re.escape(token)
