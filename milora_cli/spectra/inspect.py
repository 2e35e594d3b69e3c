"""`milora svd-inspect`: the analysis of a model or runs (spectra.py), shown as tables with sparklines.

MODEL is a model (folder, hub id, smollm2-135m): the spectra of its linear projections. Or a training run
(RUN, RUN/best, a checkpoint): the spectra of the base weights it adapted, and where its learned update
lies. Several runs (or --compare): their updates side by side, e.g. a milora and a pissa run.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from milora_cli import adapter_folder, locate, outputs, shards, terminal
from milora_cli.errors import InspectError
from milora_cli.merge import check_base
from milora_cli.models import EMBEDDED, quantisation_note
from milora_cli.spectra.analysis import (
    Inspection, Spectrum, by_module, device, limit_cpu_threads, model_spectra, open_run,
    projection_weights, run_updates, select, spectrum_stats,
)
from milora_cli.spectra.files import require_matplotlib, write_csv, write_json, write_plot

DEFAULT_RANK = 8  # the band width r for a model; a run's own r takes precedence
SPARK_WIDTH = 24
SPARK_MIN_CONSOLE = 120  # narrower terminals get the tables without their sparkline column
_BLOCKS = "▁▂▃▄▅▆▇█"


def inspect(
    targets: list[str], *, modules: str | None = None, layers: str | None = None, rank: int | None = None,
    compare: bool = False, json_path: Path | None = None, csv_path: Path | None = None, plot_path: Path | None = None,
    console: Console | None = None, base: str | None = None,
) -> Inspection:
    """Analyse, print, and write the files asked for; returns the analysis."""
    console = console or terminal.console(quiet=True)
    if plot_path:
        require_matplotlib()
    start = time.perf_counter()
    for flag, path in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path)):
        if path:
            outputs.refuse_file(path, flag)
    with terminal.working(console, f"singular values of {', '.join(targets)}"):
        found = analyse(targets, modules, layers, rank, compare, base)
    seconds = time.perf_counter() - start
    show(found, compare or len(found.runs) > 1, seconds, console)
    for path, write in ((json_path, write_json), (csv_path, write_csv), (plot_path, write_plot)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(found, path)
            console.print(f"wrote {path}")
    return found


def analyse(targets: list[str], modules: str | None, layers: str | None, rank: int | None, compare: bool,
            base: str | None = None) -> Inspection:
    """1. runs or a model  2. the chosen matrices  3. their spectra  4. the runs' updates against them."""
    for target in targets:
        if not Path(target).expanduser().exists() and target not in EMBEDDED and locate.is_local(target):
            raise InspectError(f"'{target}' does not exist (MODEL is a model folder, a run dir, a hub id or smollm2-135m)")
    folders = [adapter_folder.find_adapter(Path(target)) for target in targets]
    if (compare or len(targets) > 1) and None in folders:
        raise InspectError(
            f"'{targets[folders.index(None)]}' is not a training run (no adapter_meta.json in it or in its adapter/); "
            "--compare and several arguments take runs only"
        )
    if base is not None and None in folders:
        raise InspectError("--base is for runs; a model is inspected as it is")
    runs = [open_run(Path(target), base) for target, folder in zip(targets, folders, strict=False) if folder is not None]
    if len({run.base.resolve() for run in runs}) > 1:
        bases = ", ".join(sorted({run.meta["base_model"] for run in runs}))
        raise InspectError(f"the runs were trained on different base models ({bases}); compare runs of one base")
    if runs:
        model, folder = runs[0].meta["base_model"], runs[0].base
        index = shards.read_index(folder)
        for run in runs:  # a --base of another architecture is refused, naming the first tensor that differs
            check_base(index, None, run.adapter.shapes, model)
        layers_adapted = dict.fromkeys(layer for run in runs for layer in run.meta["target_modules"])
        weights = {layer: index[f"{layer}.weight"] for layer in layers_adapted}
    else:
        model, (_, _, folder) = targets[0], adapter_folder.locate_base(targets[0], {}, download=True, flag="MODEL")
        weights = projection_weights(folder)
    names = select(weights, modules, layers)
    if not names:
        raise InspectError(f"--modules {modules} with --layers {layers} selects no matrix")
    r = rank or (runs[0].meta["r"] if runs else DEFAULT_RANK)
    smallest = min(names, key=lambda name: min(weights[name].shape))
    if r > min(weights[smallest].shape):
        raise InspectError(f"--rank {r} exceeds the smaller side of {smallest} {list(weights[smallest].shape)}")
    limit_cpu_threads()
    spectra, cached = model_spectra(weights, names)
    return Inspection(model, folder, quantisation_note(str(folder)), r, spectra, cached, runs, run_updates(runs, names, rank))


# ------------------------------------------------------------------------------------------ terminal


def show(found: Inspection, compare: bool, seconds: float, console: Console) -> None:
    """The spectra (per matrix, per module type) unless comparing runs; then the runs' updates."""
    n = len(found.spectra)
    console.print(
        f"[bold]{found.model}[/]: {n} matrices, r={found.rank}, {found.cached} of {n} spectra from the cache, "
        f"{seconds:.1f} s on {device().type}"
    )
    if found.note:
        console.print(f"[yellow]note:[/] {found.note}", soft_wrap=True)
    floor = _spark_floor(found.spectra) if console.width >= SPARK_MIN_CONSOLE else None  # no room: numbers first
    if not compare:
        console.print(spectra_table(found.spectra, found.rank, floor))
        console.print(module_summary(found.spectra, found.rank, floor))
    if found.runs:
        console.print(runs_legend(found), highlight=False)
        console.print(updates_table(found))
        console.print(updates_summary(found))


def _sampled_logs(S: torch.Tensor) -> torch.Tensor:
    """log10(s_i / s_1) at SPARK_WIDTH evenly spaced indices, the first and the last included."""
    index = torch.linspace(0, S.numel() - 1, SPARK_WIDTH).round().long()
    return torch.log10((S[index] / S[0]).clamp(min=1e-12))  # (SPARK_WIDTH,)


def _spark_floor(spectra: list[Spectrum]) -> float:
    """One log10 scale for every sparkline, so that they compare: from the smallest s_k / s_1 seen up to 1."""
    return min([math.floor(_sampled_logs(s.S).min().item()) for s in spectra] + [-1])


def sparkline(logs: torch.Tensor, floor: float) -> str:
    levels = ((logs - floor) / -floor * (len(_BLOCKS) - 1)).round().clamp(0, len(_BLOCKS) - 1).long()
    return "".join(_BLOCKS[level] for level in levels.tolist())


def _num(x: float) -> str:
    return "–" if math.isnan(x) else "inf" if math.isinf(x) else f"{x:.3g}"


def _sci(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.1e}"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}%"


def _short_names(names: list[str]) -> tuple[str, list[str]]:
    """(the module path prefix all names share, e.g. 'model.layers.', the names without it)."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return prefix, [name.removeprefix(prefix) for name in names]


def _title(what: str, r: int, floor: float | None) -> str:
    spectrum = f"; spectrum: s_i/s_1 on a log scale from 1e{floor:.0f} to 1" if floor is not None else ""
    return f"{what} (minor E, princ. E: share of sum s_i^2 in the r={r} smallest / largest{spectrum})"


def _columns(table: Table, names: tuple[str, ...], floor: float | None) -> None:
    for column in names + ("minor E", "princ. E") + (("spectrum",) if floor is not None else ()):
        table.add_column(column, justify="left" if column in ("module", "spectrum") else "right", no_wrap=True)


def spectra_table(spectra: list[Spectrum], r: int, floor: float | None) -> Table:
    """One row per matrix; `floor` is the sparklines' log10 scale, None for none."""
    prefix, short = _short_names([s.name for s in spectra])
    table = Table(box=box.SIMPLE_HEAD, title=_title("Singular values per matrix", r, floor))
    table.add_column(f"{prefix}…" if prefix else "matrix", no_wrap=True)
    _columns(table, ("shape", "s_max", "s_min", "cond", "eff. rank"), floor)
    for s, name in zip(spectra, short, strict=False):
        stats = spectrum_stats(s.S, r)
        table.add_row(
            name, "x".join(map(str, s.shape)), _num(stats["largest"]), _num(stats["smallest"]), _num(stats["condition"]),
            f"{stats['effective_rank']:.0f}/{s.S.numel()}", _pct(stats["minor_energy"]), _pct(stats["principal_energy"]),
            *([sparkline(_sampled_logs(s.S), floor)] if floor is not None else []),
        )
    return table


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def module_summary(spectra: list[Spectrum], r: int, floor: float | None) -> Table:
    """One row per module type: means over its layers (the sparkline: of log s_i/s_1)."""
    table = Table(box=box.SIMPLE_HEAD, title=_title("Per module type, means over layers", r, floor))
    _columns(table, ("module", "matrices", "shape", "cond", "eff. rank"), floor)
    by_name = {s.name: s for s in spectra}
    for module, names in by_module([s.name for s in spectra]).items():
        group = [by_name[name] for name in names]
        stats = [spectrum_stats(s.S, r) for s in group]
        mean = {key: _mean([row[key] for row in stats]) for key in stats[0]}
        logs = torch.stack([_sampled_logs(s.S) for s in group]).mean(0)  # (SPARK_WIDTH,)
        table.add_row(
            module, str(len(group)), "x".join(map(str, group[0].shape)), _num(mean["condition"]),
            f"{mean['effective_rank']:.0f}/{group[0].S.numel()}", _pct(mean["minor_energy"]), _pct(mean["principal_energy"]),
            *([sparkline(logs, floor)] if floor is not None else []),
        )
    return table


def runs_legend(found: Inspection) -> str:
    return "\n".join(
        f"[{i}] {run.label}: {run.meta['init']}, r={run.meta['r']}, lora_alpha={run.meta['lora_alpha']:g}, step {run.meta.get('step')}"
        for i, run in enumerate(found.runs, 1)
    )


def updates_table(found: Inspection) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title="Where the learned update dW = s(BA - B0A0) lies in W's r principal / r minor singular subspaces")
    prefix, short = _short_names([s.name for s in found.spectra])
    table.add_column(f"{prefix}…" if prefix else "matrix", no_wrap=True)
    for i, _ in enumerate(found.runs, 1):
        for column in ("|dW|/|W|", "principal", "minor", "max angle"):
            table.add_column(f"[{i}]\n{column}", justify="right")
    for name, label in zip([s.name for s in found.spectra], short, strict=False):
        row = [label]
        for run in found.runs:
            stats = found.updates[run.label].get(name)
            if stats:
                row += [_sci(stats.relative_norm), _pct(stats.principal_share), _pct(stats.minor_share), f"{stats.max_angle:.2g}°"]
            else:
                row += ["", "", "", ""]
        table.add_row(*row)
    return table


def updates_summary(found: Inspection) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD,
        title="Per module type (means over layers): the share of dW in W's principal / minor subspaces, and the top-r rotation",
        caption="principal, minor: |U^T dW V|_F / |dW|_F for the r leading / trailing singular vectors of W; max angle, mean sin²: "
        "principal angles between the top-r left singular subspaces of W and W + dW",
    )
    table.add_column("module", no_wrap=True)
    for i, _ in enumerate(found.runs, 1):
        for column in ("principal", "minor", "max angle", "mean sin²"):
            table.add_column(f"[{i}]\n{column}", justify="right")
    groups = by_module([s.name for s in found.spectra])
    for module, names in [*groups.items(), ("all", [s.name for s in found.spectra])]:
        row = [module]
        for run in found.runs:
            stats = [found.updates[run.label][name] for name in names if name in found.updates[run.label]]
            row += [_pct(_mean([s.principal_share for s in stats])), _pct(_mean([s.minor_share for s in stats])),
                    f"{_mean([s.max_angle for s in stats]):.2g}°", _sci(_mean([s.mean_sin2 for s in stats]))]
        table.add_row(*row, end_section=module == list(groups)[-1])
    return table
