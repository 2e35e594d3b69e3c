"""`milora merge`: a trained adapter as merged weights or as a plain PEFT LoRA, against the ORIGINAL base.

A milora layer computes y = W x + s (B A - B0 A0) x (adapter.py), so the learned update is

    dW = s (B A - B0 A0) = s [B | -B0] [A ; A0]          s = lora_alpha / r

merged: W' = W + dW, computed in float32, cast to the output dtype; every other tensor copied (and cast).
peft:   a LoRA of rank 2r, A' = [A ; A0] (2r, in), B' = [B | -B0] (out, 2r), lora_alpha doubled so that the
        scaling alpha'/r' is unchanged. Plain LoRA runs (B0 = 0) stay rank r: A and B as they are.
A run on a quantized base (quantize.py) trained Q(W) x + s (B A - B0 A0) x: dW does not involve Q, so it goes
onto the original full-precision W like any other run's, and the merge says so.

The base is never built as a model: its tensors stream one at a time from its safetensors files into the
output's (shards.py), so the peak memory is about one tensor plus the adapter, whatever the shard sizes.
The output is written into a temporary folder beside it and renamed into place at the end.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import save_file

from milora_cli import adapter_folder, atomic, dtypes, models, outputs, runlock, serving, shards, terminal
from milora_cli.errors import ExportError, ModelError
from milora_cli.recipe import DEFAULT_SHARD_SIZE, Dtype, MergeFormat
from milora_cli.runlog import versions

PROVENANCE_FILE = "milora_export.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Weights (rewritten here), indexes of weights, READMEs and hidden files are not copied from the base.
_NOT_COPIED = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack|onnx)$|.*\.index\.json$|^README\.md$|^\.")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def merge(
    adapter_path: Path, output: Path, *, base: str | None = None, fmt: MergeFormat = "merged", dtype: Dtype | None = None,
    max_shard_size: str = DEFAULT_SHARD_SIZE, force: bool = False, console: Console | None = None, rank: int | None = None,
) -> Path:
    """Write the adapter at `adapter_path` merged into its base (or as a PEFT LoRA of it, of `rank` if given) to `output`."""
    if rank is not None and fmt != "peft":
        raise ExportError(f"--rank {rank} sets the rank of a PEFT LoRA; add --format peft (a merged folder has no rank)")
    with runlock.hold(output):  # one writer per output folder (runlock.py)
        return _merge(adapter_path, output, base=base, fmt=fmt, dtype=dtype, max_shard_size=max_shard_size, force=force, console=console,
                      rank=rank)


def _merge(adapter_path: Path, output: Path, *, base: str | None, fmt: MergeFormat, dtype: Dtype | None, max_shard_size: str,
           force: bool, console: Console | None, rank: int | None) -> Path:
    console = console or terminal.console(quiet=True)
    found = adapter_folder.open_adapter(adapter_path, "--adapter")
    folder, meta, layers, shapes = found.folder, found.meta, found.layers, found.shapes
    limit = parse_size(max_shard_size)
    outputs.claim(output, "merge", "--output", force, inputs=[folder])  # before a base is downloaded
    # merge copies the base's code files into the merged folder (it runs none of them)
    name, revision, base_folder = adapter_folder.locate_base(base, meta, download=fmt == "merged", code=True)
    outputs.refuse_inside(output, "--output", [base_folder])
    tensors = None
    if base_folder is None:
        console.print(f"[yellow]note:[/] base {name} is not on this machine: the adapter is not checked against its weights")
    else:
        console.print(f"base model: {name}" + ("" if str(base_folder) == name else f" ({base_folder})"))
        tensors = shards.read_index(base_folder)
        check_base(tensors, _trained_on(meta, base_folder), shapes, name)
        seen = adapter_folder.base_fingerprint(base_folder, tuple(layers), meta["base_dtype"])
        if seen != meta["base_fingerprint"]:
            console.print(
                f"[yellow]warning:[/] the weights of {name} differ from those the adapter was trained on (fingerprint "
                f"{seen}, trained on {meta['base_fingerprint']}): another revision or dtype of the architecture? "
                "The export is exact for this base, but the adapter was not trained on it"
            )
    quantized = _note_quantized(meta, name, console)
    source = base_folder / models.SOURCE_FILE if base_folder else None
    provenance = {
        "format": fmt, "adapter": str(folder.resolve()), "init": meta["init"], "r": meta["r"], "lora_alpha": meta["lora_alpha"],
        "step": meta.get("step"), "base_model": name, "revision": revision, "base_fingerprint": meta["base_fingerprint"],
        "trained_on_quantize": quantized,
        # A base converted by milora (the embedded GGUF model) is noted, not copied: the merge is not that file.
        "derived_from": json.loads(source.read_text()) if source and source.is_file() else None, "versions": versions(),
    }
    with atomic.atomic_folder(output) as tmp, terminal.working(console, f"writing {output}"):
        if fmt == "peft":
            provenance |= write_peft(tmp, found, name, revision, tensors, dtype, rank)
            what = f"PEFT LoRA adapter of {name}"
        else:
            n_shards, provenance["dtype"] = write_merged(tmp, base_folder, tensors, found, dtype, limit)
            what = f"{name} with the adapter merged ({n_shards} shard{'s' * (n_shards > 1)}, {provenance['dtype']})"
        provenance["chat_template"] = _write_template(tmp, found)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))
        (tmp / "README.md").write_text(_readme(provenance))
    console.print(f"{what} written to [bold]{output}[/]")
    for line in serving.describe(provenance, str(output)) if fmt == "peft" else []:
        console.print(line, markup=False, highlight=False, soft_wrap=True)  # a command to copy: never wrapped
    return output


def _note_quantized(meta: dict[str, Any], name: str, console: Console) -> str:
    """The quantization the run trained its base in; for a quantized one, say where the update goes."""
    quantized = meta.get("base_quantize", "none")
    if quantized != "none":
        console.print(f"the run trained on a {quantized} base; its update dW = s (B A - B0 A0) does not depend on the "
                      f"quantization and goes onto the original full-precision weights of {name}")
    return quantized


def _write_template(folder: Path, found: adapter_folder.Adapter) -> str | None:
    """The run's own chat template (its data.chat_template) as chat_template.jinja: in a merged folder it replaces the
    base's (AutoTokenizer reads that file before tokenizer_config.json); beside a PEFT export it is the file to pass to
    vLLM's --chat-template. Returns its name, or None for a run that kept the base's template."""
    if found.chat_template is None:
        return None
    (folder / adapter_folder.CHAT_TEMPLATE_FILE).write_text(found.chat_template, encoding="utf-8")
    return adapter_folder.CHAT_TEMPLATE_FILE


def parse_size(text: str) -> int:
    """Bytes of a size like 5GB (decimal units, as Hugging Face uses), 500MB or 2GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    size = int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()]) if match else 0
    if size <= 0:
        raise ExportError(f"--max-shard-size: '{text}' is not a positive size like 5GB, 500MB or 2GiB")
    return size


def check_base(
    base: dict[str, shards.TensorInfo], trained_on: dict[str, shards.TensorInfo] | None, shapes: dict[str, tuple[int, int]], label: str
) -> None:
    """Refuse a base whose tensor names or shapes differ from the model the adapter was trained on.

    `trained_on` is that model's index when its folder is still here; the adapted weights are always checked.
    """
    expected = {name: info.shape for name, info in (trained_on or {}).items()}
    expected.update({f"{layer}.weight": shape for layer, shape in shapes.items()})
    mismatch = f"base {label} is not the architecture the adapter was trained on:"
    for name, shape in expected.items():
        if name not in base:
            raise ExportError(f"{mismatch} it has no tensor '{name}' (expected shape {list(shape)})")
        if base[name].shape != shape:
            raise ExportError(f"{mismatch} tensor '{name}' has shape {list(base[name].shape)}, expected {list(shape)}")
    extra = next((name for name in base if name not in expected), None) if trained_on is not None else None
    if extra:
        raise ExportError(f"{mismatch} it has a tensor '{extra}' that the trained-on model has not")


def _trained_on(meta: dict[str, Any], base_folder: Path) -> dict[str, shards.TensorInfo] | None:
    recorded = Path(meta["base_model_path"])
    if not recorded.is_dir() or recorded.resolve() == base_folder.resolve():
        return None
    try:
        return shards.read_index(recorded)
    except ModelError:  # a recorded base that is no longer readable: check the adapted weights only
        return None


def write_merged(
    folder: Path, base_folder: Path, tensors: dict[str, shards.TensorInfo], found: adapter_folder.Adapter,
    dtype: str | None, max_shard_size: int,
) -> tuple[int, str]:
    """A Hugging Face folder of the base with W' = W + s (B A - B0 A0); returns (shards, dtype written)."""
    meta = found.meta
    layers, scaling = set(meta["target_modules"]), meta["scaling"]
    if dtype is None:  # the base's dtype (float64 bases are written as float32)
        base_dtype = tensors[f"{meta['target_modules'][0]}.weight"].dtype
        dtype = dtypes.user_name(base_dtype) or "fp32"
    out = dtypes.safetensors_name(dtypes.TORCH[dtype])
    entries = [(name, out if info.dtype in dtypes.FLOATING else info.dtype, info.shape) for name, info in tensors.items()]

    def merged() -> Iterator[torch.Tensor]:
        for name, weight in zip(tensors, shards.read_tensors(tensors, tensors), strict=False):
            layer = name.removesuffix(".weight")
            if layer in layers and name != layer:
                B, A = found.stacked(layer)  # (out, 2r), (2r, in)
                # B A = B_trained A_trained - B0 A0 in one float32 GEMM (float64 for a float64 run's factors), added
                # in place to a copy of W (the read tensor is a view of the file): no (out, in) temporaries besides W' itself.
                weight = weight.to(B.dtype, copy=True).addmm_(B, A, alpha=scaling)
            yield weight.to(dtypes.SAFETENSORS[out]) if weight.is_floating_point() else weight

    n_shards = shards.write_sharded(folder, entries, merged(), max_shard_size)
    _copy_model_files(base_folder, folder, dtype)
    return n_shards, dtype


def _copy_model_files(base_folder: Path, folder: Path, dtype: str) -> None:
    """Config, tokenizer, generation config and code of the base; config.json gets the written dtype.

    Only files inside the base folder (or its hub cache blobs) are copied: a link to elsewhere is refused.
    """
    for path in sorted(base_folder.iterdir()):
        if not _NOT_COPIED.match(path.name) and path.name != models.SOURCE_FILE and shards.model_file(base_folder, path.name).is_file():
            shutil.copyfile(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    name = str(dtypes.TORCH[dtype]).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:  # the key of transformers < 4.56
        config["torch_dtype"] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_peft(
    folder: Path, found: adapter_folder.Adapter, base: str, revision: str | None,
    tensors: dict[str, shards.TensorInfo] | None, dtype: str | None, rank: int | None = None,
) -> dict[str, Any]:
    """adapter_config.json + adapter_model.safetensors: a standard PEFT LoRA of the ORIGINAL base.

    Returns what milora_export.json adds: the rank written and, with `rank`, the compression's errors.
    """
    meta, layers = found.meta, found.layers
    # Plain LoRA and MiCA runs have B0 A0 = 0: the correction vanishes and the rank stays r.
    factor = 2 if found.has_correction else 1
    pairs: dict[str, serving.Factors] = {}
    for layer in layers:
        A, B, _, _ = found.factors(layer)
        pairs[layer] = found.stacked(layer) if factor == 2 else (B, A)  # (out, r'), (r', in)
    r, alpha = meta["r"] * factor, meta["lora_alpha"] * factor
    added: dict[str, Any] = {}
    if rank is not None:
        # a rank above the update's keeps every component: written at the update's rank, exactly
        pairs, compression = serving.compress(pairs, min(rank, r))
        r, alpha = compression.rank, meta["scaling"] * compression.rank  # the same scaling s = alpha / r
        added["compression"] = {"rank": r, "relative_error": compression.overall, "relative_error_per_layer": compression.errors}
    weights = {}
    for layer, (B, A) in pairs.items():
        for part, value in (("A", A), ("B", B)):
            weights["base_model.model." + adapter_folder.key(layer, part)] = value.to(dtypes.TORCH[dtype or "fp32"]).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "revision": revision,
        "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": meta["lora_dropout"], "target_modules": peft_targets(layers, tensors), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "inference_mode": True,
    }
    save_file(weights, folder / PEFT_WEIGHTS, metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return {"peft_r": r, **added}


def peft_targets(layers: list[str], tensors: dict[str, shards.TensorInfo] | None) -> list[str]:
    """The adapted layers' leaf names, or their full names when the leaves would also pick other layers.

    Always a list: SGLang accepts a list or "all"/"all-linear" only (sglang/srt/lora/utils.py,
    get_normalized_target_modules, which keeps each name's last part); PEFT adapts a module whose name
    equals a listed name or ends with "." + it, so full names pick exactly the adapted layers.
    """
    leaves = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
    if tensors is not None:
        modules = {name.removesuffix(".weight") for name in tensors if name.endswith(".weight")}
        if any(module.rsplit(".", 1)[-1] in leaves and module not in layers for module in modules):
            return list(layers)
    return leaves


def _readme(provenance: dict[str, Any]) -> str:
    kind = "weights with the adapter merged" if provenance["format"] == "merged" else "a PEFT LoRA adapter"
    lines = [
        f"# {kind.capitalize()}", "",
        f"Written by `milora merge` from the {provenance['init']} adapter (r={provenance['r']}, "
        f"lora_alpha={provenance['lora_alpha']}) at {provenance['adapter']}, against the original base "
        f"`{provenance['base_model']}`. Details: {PROVENANCE_FILE}.",
    ]
    if provenance["format"] == "peft":
        rank, allowed = provenance["peft_r"], serving.vllm_max_lora_rank(provenance["peft_r"])
        lines += ["", f"Rank {rank}. " + (
            f"Serve it with vLLM: `vllm serve {provenance['base_model']} --enable-lora --lora-modules NAME=THIS_FOLDER "
            f"--max-lora-rank {allowed}{serving.template_flag(provenance, 'THIS_FOLDER')}`." if allowed else
            f"vLLM serves ranks up to {serving.VLLM_MAX_LORA_RANKS[-1]}: export again with `milora merge --format peft --rank K`."
        )]
    if provenance["chat_template"]:
        lines += ["", f"{provenance['chat_template']} is the chat template the run trained with (its data.chat_template), not the base's."]
    if provenance["derived_from"]:
        source = provenance["derived_from"]
        lines += ["", f"The base derives from {source['gguf_file']}: {source['note']}."]
    return "\n".join(lines) + "\n"
