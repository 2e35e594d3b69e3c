"""One rule for where a named model or dataset lives: a local path, or a repository on the Hugging Face hub.

A name is LOCAL when it exists on disk, starts like a path (/, ./, ../, ~), ends in a data-file suffix, or
cannot be a hub id; otherwise it is a HUB id ("name" or "org/name"). Embedded models (models.EMBEDDED) are
checked by models.resolve before this rule. Hub repositories are fetched with huggingface_hub's
`snapshot_download` into its cache (HF_HOME) and read from there as local folders, so the rest of milora
only ever opens local files: with HF_HUB_OFFLINE=1 the cache alone is used, and a repository that is
neither cached nor reachable is one line naming it and how to fetch it, within seconds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from milora_cli.errors import HubError, first_line

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
# What a model needs from its repository: config, tokenizer, safetensors weights (never pickles); its Python code
# only when asked (models.resolve: --trust-remote-code, or merge copying it).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
CODE_FILES = ["*.py"]
ETAG_TIMEOUT_S = 5  # per request to the hub; an unreachable hub fails fast instead of retrying for a minute
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# A hub revision: a commit hash, or a branch or tag name as git allows it ("/"-separated parts, as in refs/pr/1),
# so that huggingface_hub's cache path refs/<revision> stays inside the repository's folder.
_REVISION = re.compile(r"[A-Za-z0-9_][\w+-]*(\.[\w+-]+)*(/[A-Za-z0-9_][\w+-]*(\.[\w+-]+)*)*")
REVISION_RULE = "a branch, tag or commit: letters, digits, _ + - ., parts joined by /, no part starting with . and no .."
RepoType = Literal["model", "dataset"]


def is_local(name: str) -> bool:
    """True when `name` means a path on this machine, false when it is a hub id (see the module docstring)."""
    if name.startswith(("/", "./", "../", "~", ".")) or name.endswith(DATA_SUFFIXES):
        return True
    return Path(name).expanduser().exists() or _HUB_ID.fullmatch(name) is None


def check_revision(revision: str | None) -> str | None:
    """`revision` when it can name a hub branch, tag or commit; a ValueError saying why not otherwise."""
    if revision is not None and _REVISION.fullmatch(revision) is None:
        raise ValueError(f"'{revision}' is not a hub revision ({REVISION_RULE})")
    return revision


def fetch_command(repo_id: str, repo_type: RepoType) -> str:
    return f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")


def hub_snapshot(repo_id: str, repo_type: RepoType, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """The local snapshot folder of a hub repository: downloaded (only `patterns`) or, offline, from the cache."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        check_revision(revision)  # also a revision read from a file (adapter_meta.json)
    except ValueError as error:
        raise HubError(f"{repo_type} '{repo_id}': {error}") from None
    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns,
                                   etag_timeout=ETAG_TIMEOUT_S)
    except LocalEntryNotFoundError:  # offline (or unreachable) and not in the cache
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise HubError(
            f"{repo_type} '{repo_id}'{_at(revision)} is not a local path and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {offline}: fetch it once online with `{fetch_command(repo_id, repo_type)}` "
            f"(or `huggingface-cli download`), or pass a local path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:  # unknown repo, gated, bad revision
        raise HubError(f"cannot fetch hub {repo_type} '{repo_id}'{_at(revision)}: {first_line(error)}") from None
    return Path(folder)


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""
