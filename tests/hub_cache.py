"""A Hugging Face hub cache laid out exactly as huggingface_hub writes it, from local files, for offline tests.

    HF_HOME/hub/{models,datasets}--ORG--NAME/
        blobs/<sha256 of the file>              the bytes
        snapshots/<commit>/<path in repo>       relative symlinks to ../../blobs/<sha256>
        refs/main                               the commit
"""

import hashlib
import os
from pathlib import Path


def add_repo(hf_home: Path, repo_id: str, repo_type: str, files: dict[str, Path | bytes]) -> Path:
    """Put `files` ({path in repo: a local file or bytes}) into the cache as repo_id's main; returns the snapshot."""
    root = hf_home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    blobs = {}
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        digest = hashlib.sha256(data).hexdigest()
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / digest).write_bytes(data)
        blobs[name] = digest
    commit = hashlib.sha1("".join(f"{n}:{d}" for n, d in sorted(blobs.items())).encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for name, digest in blobs.items():
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "blobs" / digest, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def add_folder(hf_home: Path, repo_id: str, repo_type: str, folder: Path) -> Path:
    """Every file of a local folder (a model folder) as a cached hub repository."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return add_repo(hf_home, repo_id, repo_type, files)
