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
from typing import Any, Literal

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
    except LocalEntryNotFoundError:  # offline (or unreachable) and not in the cache, or only part of it
        if _snapshot_cached(repo_id, repo_type, revision, constants):
            raise HubError(
                f"{repo_type} '{repo_id}'{_at(revision)} is only partly in the local Hugging Face cache ({constants.HF_HUB_CACHE}): "
                f"it lacks some of {', '.join(patterns or ['its files'])}, and {_why_offline(constants)}: fetch them once online "
                f"with `{fetch_command(repo_id, repo_type)}{''.join(f' --include {p}' for p in patterns or [])}`"
            ) from None
        raise HubError(
            f"{repo_type} '{repo_id}'{_at(revision)} is not a local path and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and {_why_offline(constants)}: fetch it once online with `{fetch_command(repo_id, repo_type)}` "
            f"(or `huggingface-cli download`), or pass a local path"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:  # unknown repo, gated, bad revision
        raise HubError(f"cannot fetch hub {repo_type} '{repo_id}'{_at(revision)}: {first_line(error)}") from None
    return Path(folder)


def hub_files(repo_id: str, repo_type: RepoType, revision: str | None = None) -> tuple[Path, list[str]]:
    """(snapshot folder, every file of the repository) at `revision`, fetching no file but README.md.

    The listing is the one huggingface_hub keeps beside its cache (trees/<commit>.json, written when it
    lists a repository online), so offline it is the repository's whole listing too; a cache written
    without one (older huggingface_hub) is listed by what its snapshot holds.
    """
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    folder = hub_snapshot(repo_id, repo_type, revision, patterns=["README.md"])
    try:  # the snapshot folder is named by its commit, which keys the listing
        return folder, [file.path for file in get_cached_repo_tree(repo_id, repo_type=repo_type, revision=folder.name)]
    except CachedRepoTreeNotFoundError:
        return folder, sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _snapshot_cached(repo_id: str, repo_type: RepoType, revision: str | None, constants: Any) -> bool:
    """Whether the cache holds a snapshot of the repository at `revision` (a commit, or a ref it recorded)."""
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    ref = storage / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision
    return commit is not None and (storage / "snapshots" / commit).is_dir()


def _why_offline(constants: Any) -> str:
    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"


def _at(revision: str | None) -> str:
    return f" (revision {revision})" if revision else ""
