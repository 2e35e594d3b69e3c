"""A Hugging Face hub cache laid out exactly as huggingface_hub writes it, from local files, for offline tests.

    HF_HOME/hub/{models,datasets}--ORG--NAME/
        blobs/<sha256 of the file>              the bytes
        snapshots/<commit>/<path in repo>       relative symlinks to ../../blobs/<sha256>
        refs/main                               the commit
        trees/<commit>.json                     the repository's whole listing (huggingface_hub >= 2.4 writes it
                                                when it lists a repository online: _tree_cache.py), which may name
                                                more files than the snapshot holds
"""

import hashlib
import json
import os
from pathlib import Path


def add_repo(hf_home: Path, repo_id: str, repo_type: str, files: dict[str, Path | bytes], *, listed: bool = False,
             fetched: set[str] | None = None, ref: str = "main") -> Path:
    """Put `files` ({path in repo: a local file or bytes}) into the cache as repo_id's `ref` (a branch or
    tag); returns the snapshot.

    listed: also write the repository's listing (trees/<commit>.json) as huggingface_hub does online;
    fetched: the files the snapshot holds (default all), as after a download of only those.
    """
    root = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blobs, tree = {}, {}
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        digest = hashlib.sha256(data).hexdigest()
        tree[name] = _tree_entry(name, data, digest)
        if fetched is not None and name not in fetched:
            continue
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / digest).write_bytes(data)
        blobs[name] = digest
    commit = hashlib.sha1("".join(f"{n}:{e['blob_id']}" for n, e in sorted(tree.items())).encode()).hexdigest()
    if listed:
        (root / "trees").mkdir(parents=True, exist_ok=True)
        (root / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": dict(sorted(tree.items()))}))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, digest in blobs.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / digest, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return snapshot


def _tree_entry(name: str, data: bytes, sha256: str) -> dict:
    """A file's entry in huggingface_hub's tree listing (the hub's /tree fields): git blob id and size; parquet
    files are LFS on the hub, so theirs is the id of the LFS pointer, with the content's sha256 and size."""
    if name.endswith(".parquet"):
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        return {"size": len(data), "blob_id": _git_blob_id(pointer), "lfs_sha256": sha256, "lfs_size": len(data)}
    return {"size": len(data), "blob_id": _git_blob_id(data)}


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_folder(hf_home: Path, repo_id: str, repo_type: str, folder: Path) -> Path:
    """Every file of a local folder (a model folder) as a cached hub repository."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return add_repo(hf_home, repo_id, repo_type, files)
