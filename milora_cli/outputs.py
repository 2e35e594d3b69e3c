"""Output folders: what a folder already holds, and whether a command may write there.

Nothing a command did not create is overwritten: a folder that holds another kind of result (a run, an
adapter or checkpoint, an eval, a merge, a model) is refused unless --force says replace, and an output
inside a folder the command reads, or inside an adapter or checkpoint folder (which a later save or
checkpoint pruning replaces whole), is refused even then.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from milora_cli import atomic
from milora_cli.errors import OutputError

# The file that marks each kind of result, in the order they are recognised (an adapter folder has a recipe.yaml too).
MARKERS = {
    "adapter or checkpoint": "adapter_meta.json",
    "merge": "milora_export.json",
    "training run": "recipe.yaml",
    "eval": "settings.json",
    "model": "config.json",
}
KINDS = {"run": "training run", "eval": "eval", "merge": "merge"}


def kind_of(folder: Path) -> str | None:
    """What `folder` holds: one of MARKERS' kinds, or None (absent, empty or unknown)."""
    return next((kind for kind, marker in MARKERS.items() if (folder / marker).is_file()), None)


def refuse_file(path: Path, flag: str) -> None:
    """Refuse an output file that is a folder, or that would replace a file of a run, eval, merge or model."""
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name")
    holder = kind_of(path.parent)
    if path.exists() and holder is not None:
        raise OutputError(f"{flag} {path} would replace a file of {_a(holder)} ({path.parent}); choose another file name")


def refuse_inside(output: Path, flag: str, inputs: Iterable[Path | None]) -> None:
    """Refuse an output that is, or lies inside, one of the folders the command reads."""
    place = output.expanduser().resolve()
    for source in inputs:
        if source is not None and (place == source.resolve() or source.resolve() in place.parents):
            raise OutputError(f"{flag} {output} lies inside {source}, which this command reads; choose another folder")


def claim(output: Path, kind: str, flag: str, force: bool = False, inputs: Iterable[Path | None] = ()) -> None:
    """Refuse an output `flag` that cannot hold a `kind` result; with `force`, remove another kind of result first.

    A symbolic link is refused as the output, and inside a run or eval folder that the command writes into:
    --force would delete what it points to, and a write would go to the file it names.
    """
    atomic.refuse_link(output.expanduser())
    place = output.expanduser().resolve()
    blocker = next((parent for parent in [place, *place.parents] if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"{flag} {output}: {blocker} is a file, not a folder")
    refuse_inside(output, flag, inputs)
    holder = next((parent for parent in place.parents if kind_of(parent) == "adapter or checkpoint"), None)
    if holder is not None:
        raise OutputError(f"{flag} {output} lies inside the adapter folder {holder}, which training replaces or prunes; choose another folder")
    if kind != "merge":  # a merge replaces its output whole, with no write into what it held
        refuse_links(output.expanduser())
    found = kind_of(place)
    wanted = KINDS[kind]
    if found == wanted and kind != "merge":  # the same kind of result: the command resumes it or refuses it itself
        return
    if found is None and not (kind == "merge" and place.exists()):
        return
    if not force:
        what = f"exists and holds {_a(found)}" + ("" if found == wanted else f", not {_a(wanted)}") if found else "exists"
        hint = "choose another output.dir" if kind == "run" else "choose another folder or add --force to replace it"
        raise OutputError(f"{flag} {output} {what}; {hint}")
    if kind != "merge":  # a merge replaces its output in one rename once the new one is complete
        shutil.rmtree(place)


# Folders of a run that another program writes, links of its own included (wandb's `latest-run`): milora writes
# nothing inside them, and rmtree removes a link inside without following it, so only the folder itself is checked.
FOREIGN_FOLDERS = ("wandb",)


def refuse_links(folder: Path) -> None:
    """Refuse a folder that holds a symbolic link anywhere inside it (a downloaded run or eval folder may)."""
    for parent, names, files in os.walk(folder):  # does not follow links to folders: they are listed in names
        for name in [*names, *files]:
            atomic.refuse_link(Path(parent) / name)
        if Path(parent) == folder:
            names[:] = [name for name in names if name not in FOREIGN_FOLDERS]  # checked above, not descended into


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
