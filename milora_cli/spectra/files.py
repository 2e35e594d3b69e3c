"""What `milora svd-inspect` writes: JSON with all singular values, CSV with one row per matrix, a PNG of the spectra."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import textwrap
from dataclasses import asdict
from pathlib import Path

import torch

from milora_cli.atomic import write_bytes_atomic, write_text_atomic
from milora_cli.errors import InspectError
from milora_cli.spectra.analysis import Inspection, UpdateStats, by_module, spectrum_stats


def require_matplotlib() -> None:
    """Refuse --plot before the analysis, not after it, when matplotlib (the optional extra `plot`) is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise InspectError("--plot needs matplotlib: pip install 'milora[plot]' (or pip install matplotlib)")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no nan / inf


def write_json(found: Inspection, path: Path) -> None:
    """Per matrix its name, shape, statistics and ALL singular values (descending); per run its updates."""
    matrices = [
        {"name": s.name, "module": s.module, "layer": s.layer, "shape": list(s.shape),
         **{k: _finite(v) for k, v in spectrum_stats(s.S, found.rank).items()}, "singular_values": s.S.tolist()}
        for s in found.spectra
    ]
    runs = [
        {"run": run.label, "adapter": str(run.adapter.folder), "init": run.meta["init"], "r": run.meta["r"],
         "lora_alpha": run.meta["lora_alpha"], "step": run.meta.get("step"), "base_model": run.meta["base_model"],
         "matrices": [{"name": name, **{k: _finite(v) for k, v in asdict(stats).items()}} for name, stats in found.updates[run.label].items()]}
        for run in found.runs
    ]
    document = {"model": found.model, "model_path": str(found.folder), "note": found.note, "rank": found.rank, "matrices": matrices, "runs": runs}
    write_text_atomic(path, json.dumps(document, indent=1))


def write_csv(found: Inspection, path: Path) -> None:
    """One row per matrix: its statistics, then each run's update measures under `{run} {measure}` columns."""
    measures = list(UpdateStats.__dataclass_fields__)
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    stat_keys = list(spectrum_stats(found.spectra[0].S, found.rank))
    writer.writerow(["name", "module", "layer", "out", "in", *stat_keys, *(f"{run.label} {m}" for run in found.runs for m in measures)])
    for s in found.spectra:
        stats = spectrum_stats(s.S, found.rank)
        row = [s.name, s.module, s.layer, *s.shape, *(stats[k] for k in stat_keys)]
        for run in found.runs:
            update = found.updates[run.label].get(s.name)
            row += [getattr(update, m) for m in measures] if update else [""] * len(measures)
        writer.writerow(row)
    write_text_atomic(path, handle.getvalue())


def write_plot(found: Inspection, path: Path) -> None:
    """Normalised spectra s_i / s_1 per module type on a log scale, one line per layer, r-bands shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_module([s.name for s in found.spectra])
    by_name = {s.name: s for s in found.spectra}
    columns = min(4, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.6 * rows + 0.6), squeeze=False, sharey=True, layout="constrained")
    last_layer = max([s.layer or 0 for s in found.spectra] + [1])
    colours = plt.get_cmap("viridis")
    for ax, (module, names) in zip(axes.flat, groups.items(), strict=False):
        k = by_name[names[0]].S.numel()
        ax.axvspan(0.5, found.rank + 0.5, color="tab:blue", alpha=0.3, lw=0, label=f"principal r={found.rank} (PiSSA's init)")
        ax.axvspan(k - found.rank + 0.5, k + 0.5, color="tab:red", alpha=0.3, lw=0, label=f"minor r={found.rank} (MiLoRA's init)")
        for name in names:
            S = by_name[name].S
            ax.semilogy(torch.arange(1, S.numel() + 1), S / S[0], color=colours((by_name[name].layer or 0) / last_layer), lw=0.7)
        ax.set_title(f"{module} ({'x'.join(map(str, by_name[names[0]].shape))})", fontsize=10)
        ax.set_xlim(0.5, k + 0.5)
        ax.set_xlabel("index i", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("s_i / s_1", fontsize=8)
    spare = list(axes.flat)[len(groups):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()  # the legend goes into a spare panel if any
    (spare[0] if spare else axes.flat[0]).legend(handles, labels, fontsize=8 if spare else 7, loc="center" if spare else "lower left")
    fig.colorbar(plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(0, last_layer)), ax=axes, label="layer", shrink=0.8)
    title = f"{found.model}: normalised singular values per module type"
    fig.suptitle(title + (f"\n{textwrap.fill('note: ' + found.note, 110)}" if found.note else ""), fontsize=10)
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip(".").lower() or "png", dpi=90)
    plt.close(fig)
    write_bytes_atomic(path, image.getvalue())
