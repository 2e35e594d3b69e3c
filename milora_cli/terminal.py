"""How milora writes to a terminal or a log: its one kind of console, and one progress style.

On a terminal rich wraps text at the window's width and animates spinners and bars. Off one (a file, a pipe,
a cluster job, CI) it would break every message at its default 80 columns, so that grep on a log misses what
it looks for: there each message stays one line. The libraries' tqdm bars are switched off (in a log each
becomes one long line of carriage returns); long steps show milora's own status instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

# Read when the libraries are imported: huggingface_hub's bars, transformers' (it follows huggingface_hub's
# switch: "Loading weights", "Writing model shards"), and tqdm's own default, for the bars libraries make
# with tqdm directly (transformers' "Converting and de-quantizing GGUF tensors").
_LIBRARY_BARS_OFF = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def console(stderr: bool = False, quiet: bool = False) -> Console:
    """A console that wraps text on a terminal and never off one (tables keep their layout either way)."""
    made = Console(stderr=stderr, quiet=quiet)
    made.soft_wrap = not made.is_terminal
    return made


def library_bars_off() -> None:
    """Switch off the tqdm bars of transformers, huggingface_hub and datasets; a variable the user set is kept.

    milora_cli/__init__.py calls it before anything imports them: they read these variables once, at import.
    """
    for name, value in _LIBRARY_BARS_OFF.items():
        os.environ.setdefault(name, value)


@contextmanager
def working(console: Console, what: str) -> Iterator[None]:
    """A step that takes long: a spinner saying `what` on a terminal; in a log the line `what ...` when it
    starts (a spinner there would show nothing)."""
    if console.is_terminal:
        with console.status(what):
            yield
    else:
        console.print(f"{what} ...", highlight=False)
        yield
