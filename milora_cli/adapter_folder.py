"""Adapter folders on disk: the one format train writes and merge, eval and svd-inspect read. Safetensors and JSON only.

An adapter folder holds everything needed to rebuild the adapted model without the run around it:

    adapter_model.safetensors   trained factors   {layer}.lora_A.weight (r, in), {layer}.lora_B.weight (out, r)
    adapter_init.safetensors    frozen initial factors A0, B0 under the same keys (merge/export need both)
    adapter_meta.json           init, r, lora_alpha, target layers, base model and its fingerprint, versions,
                                and the sha256 of each tensor file, checked on every read
    recipe.yaml                 the resolved recipe of the run
    chat_template.jinja         the run's data.chat_template, when it named one (the base's own applies otherwise):
                                eval --prompt chat renders with it, merge copies it into what it writes

The learned update of a layer, and its stacked rank-2r form (merge, PEFT export):

    dW = s (B A - B0 A0) = s [B | -B0] [A ; A0]          s = lora_alpha / r

A training checkpoint (training/checkpoints.py) is an adapter folder plus what an exact resume needs.
Everything read here is validated (present, checksum, header, shapes against adapter_meta.json, finite
values); any failure is an AdapterError naming the file.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from milora_cli import atomic, dtypes, models, shards
from milora_cli.errors import AdapterError

ADAPTER_FILE = "adapter_model.safetensors"
INIT_FILE = "adapter_init.safetensors"
META_FILE = "adapter_meta.json"
RECIPE_FILE = "recipe.yaml"
# transformers' own name for a tokenizer's template file (transformers/utils/hub.py CHAT_TEMPLATE_FILE); its
# tokenizer_config.json loader reads it in preference to a "chat_template" entry (tokenization_utils_base.py,
# from_pretrained: "independent chat template file(s) ... take priority"), so a merged folder holding it loads it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
FORMAT = "milora-adapter/1"
_META_KEYS = ("init", "r", "lora_alpha", "scaling", "target_modules", "base_model", "base_model_path", "base_dtype", "base_fingerprint")


def key(layer: str, part: str) -> str:
    """The tensor name of factor `part` ("A" or "B") of `layer`, in both tensor files (PEFT's naming)."""
    return f"{layer}.lora_{part}.weight"


def delta(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor, scaling: float) -> torch.Tensor:
    """dW = s (B A - B0 A0), in the factors' dtype; (out, in)."""
    return scaling * (B @ A - B0 @ A0)


def stacked(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') = ([B | -B0], [A ; A0]): B' A' = B A - B0 A0 as one rank-2r product."""
    return torch.cat([B, -B0], dim=1), torch.cat([A, A0], dim=0)  # (out, 2r), (2r, in)


@dataclass(frozen=True)
class Adapter:
    """A validated adapter folder: trained and initial factors, and its metadata."""

    folder: Path
    trained: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]
    meta: dict[str, Any]
    chat_template: str | None = None  # the run's data.chat_template; None: the base's own template applies

    @property
    def layers(self) -> list[str]:
        return list(self.meta["target_modules"])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """layer -> (out, in) of the base weight each factor pair was trained against."""
        return {layer: (self.trained[key(layer, "B")].shape[0], self.trained[key(layer, "A")].shape[1]) for layer in self.layers}

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, A0, B0) of one layer, float32."""
        return (self.trained[key(layer, "A")], self.trained[key(layer, "B")],
                self.initial[key(layer, "A")], self.initial[key(layer, "B")])

    def delta(self, layer: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dW of one layer in `dtype` (float64 for analysis: the difference of two close products needs it)."""
        return delta(*(factor.to(dtype) for factor in self.factors(layer)), self.meta["scaling"])

    def stacked(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') of one layer, the rank-2r form of dW / s."""
        return stacked(*self.factors(layer))

    @property
    def has_correction(self) -> bool:
        """False for plain LoRA (B0 = 0) and MiCA (A0 = 0): B0 A0 = 0 everywhere, the update is s B A, rank r."""
        return any(self.initial[key(layer, "B")].any() and self.initial[key(layer, "A")].any() for layer in self.layers)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_adapter(folder: Path, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], meta: dict[str, Any], recipe_yaml: str,
                  chat_template: str | None = None) -> None:
    """Write the adapter files into an (already temporary) folder, with the checksum of each tensor file; with
    `chat_template` (the run's data.chat_template), its text as chat_template.jinja, named in the metadata."""
    checksums = {}
    for name, tensors in ((ADAPTER_FILE, trained), (INIT_FILE, initial)):
        data = save(tensors, metadata={"format": FORMAT})
        (folder / name).write_bytes(data)
        checksums[name] = sha256(data)
    if chat_template is not None:
        data = chat_template.encode("utf-8")
        (folder / CHAT_TEMPLATE_FILE).write_bytes(data)
        checksums[CHAT_TEMPLATE_FILE] = sha256(data)
    template = {"chat_template": CHAT_TEMPLATE_FILE if chat_template is not None else None}
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, **meta, **template, "checksums": checksums}, indent=2))
    (folder / RECIPE_FILE).write_text(recipe_yaml)


def read_tensors(path: Path, checksum: str | None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, refused if its bytes differ from the checksum written with it."""
    data = _read_checked(path, checksum)
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterError(f"{path} is damaged: not a readable safetensors file ({error})") from None


def find_adapter(path: Path) -> Path | None:
    """The adapter folder at `path`: RUN -> RUN/adapter, an adapter folder (RUN/best, a checkpoint) as it is; else None."""
    return next((folder for folder in (path, path / "adapter") if (folder / META_FILE).is_file()), None)


def open_adapter(path: Path, flag: str) -> Adapter:
    """The validated adapter of RUN (its adapter/), RUN/best or a checkpoint, given by the user as `flag`."""
    folder = find_adapter(path)
    if folder is not None:
        return read_adapter(folder)
    if not path.exists():
        raise AdapterError(f"{flag} {path} does not exist")
    raise AdapterError(f"{flag} {path} is neither a run folder with adapter/ nor an adapter folder (no {META_FILE})")


def locate_base(base: str | None, meta: dict[str, Any], download: bool, flag: str = "--base",
                code: bool = False) -> tuple[str, str | None, Path | None]:
    """(name for from_pretrained, revision, local folder): `base` (given as `flag`), else the base the run trained on.

    A hub id is downloaded (weights included) only when `download`, its Python files only when `code`; a PEFT
    export needs just its name. The recorded base_model_path is a hint from a file that may come from anyone:
    it is used only when its weights have the recorded fingerprint, so a downloaded adapter cannot point
    a command at another local model.
    """
    revision = None
    hinted = base is None and Path(meta["base_model_path"]).is_dir()
    if base is None:
        recorded = Path(meta["base_model_path"])
        name = meta["base_model"]  # a hub id records itself as its path; a local folder its absolute path
        local = name not in models.EMBEDDED and (meta["base_model_path"] != name or name.startswith((".", "/", "~")))
        if local and not recorded.is_dir():
            raise AdapterError(f"the base model the adapter was trained on, {recorded}, is no longer there; pass --base with its new location")
        base, revision = (str(recorded), None) if recorded.is_dir() else (meta["base_model"], meta["revision"])
    elif not Path(base).expanduser().exists() and base.startswith((".", "/", "~")):
        raise AdapterError(f"{flag} {base} does not exist")
    elif Path(base).expanduser().is_file():
        raise AdapterError(f"{flag} {base} is a file; give a model folder, a hub id or smollm2-135m")
    on_hub = models.is_hub(base)
    if on_hub and not download:
        return base, revision, None
    folder = Path(models.resolve(base, revision, code=code))  # a hub id: fetched, or found in the offline cache (locate.py)
    if hinted and base_fingerprint(folder, tuple(meta["target_modules"]), meta["base_dtype"]) != meta["base_fingerprint"]:
        raise AdapterError(
            f"{META_FILE} names the base model folder {folder}, but its weights are not those the adapter was trained on "
            f"(their fingerprint differs from the recorded {meta['base_fingerprint']}); pass --base with the model it was trained on"
        )
    return (base, revision, folder) if on_hub else (str(folder.resolve()), None, folder)


@functools.lru_cache(maxsize=4)
def base_fingerprint(folder: Path, layers: tuple[str, ...], dtype: str) -> str | None:
    """models.weights_fingerprint of a model folder's weights of `layers` in `dtype` (as training recorded it), read
    tensor by tensor; None when the folder lacks one of them. Cached: merge checks the same base again."""
    tensors = shards.read_index(folder)
    if any(f"{layer}.weight" not in tensors for layer in layers):
        return None
    return models.weights_fingerprint(shards.LazyWeights(tensors, list(layers), dtypes.TORCH[dtype]))


def read_adapter(folder: Path) -> Adapter:
    """The adapter in `folder`, every file checked against adapter_meta.json."""
    meta = atomic.read_json(folder / META_FILE, f"the adapter folder {folder}", AdapterError)
    missing = [name for name in _META_KEYS if name not in meta]
    if missing:
        raise AdapterError(f"{folder / META_FILE} is damaged: it lacks {', '.join(missing)}")
    checksums = meta.get("checksums") or {}
    trained = read_tensors(folder / ADAPTER_FILE, checksums.get(ADAPTER_FILE))
    initial = read_tensors(folder / INIT_FILE, checksums.get(INIT_FILE))
    found = Adapter(folder, trained, initial, meta, _read_template(folder, meta, checksums.get(CHAT_TEMPLATE_FILE)))
    _check(found)
    return found


def _read_checked(path: Path, checksum: str | None, missing: str = "") -> bytes:
    """The bytes of `path`, refused (AdapterError) if it is missing (`missing` says more) or differs from its checksum."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterError(f"{path} is missing{missing}") from None
    if checksum is not None and sha256(data) != checksum:
        raise AdapterError(f"{path} is damaged: its bytes differ from those written (sha256 mismatch)")
    return data


def _read_template(folder: Path, meta: dict[str, Any], checksum: str | None) -> str | None:
    """The chat template the adapter's metadata names (always chat_template.jinja), checked; None when it names none."""
    if meta.get("chat_template") is None:  # adapters written before templates were kept name none
        return None
    if meta["chat_template"] != CHAT_TEMPLATE_FILE:
        raise AdapterError(f"{folder / META_FILE} is damaged: chat_template is {meta['chat_template']!r}, not {CHAT_TEMPLATE_FILE!r}")
    path = folder / CHAT_TEMPLATE_FILE
    data = _read_checked(path, checksum, f"; {META_FILE} says the run trained with it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AdapterError(f"{path} is damaged: not UTF-8 text") from None


def _check(found: Adapter) -> None:
    """Keys, shapes and r as adapter_meta.json says; finite values."""
    meta, r = found.meta, found.meta["r"]
    numbers = all(isinstance(meta[name], (int, float)) for name in ("lora_alpha", "scaling"))
    if (not isinstance(r, int) or r < 1 or not numbers or meta["base_dtype"] not in dtypes.TORCH
            or not isinstance(meta["target_modules"], list) or not all(isinstance(layer, str) for layer in meta["target_modules"])):
        raise AdapterError(
            f"{found.folder / META_FILE} is damaged: a value of r, lora_alpha, scaling, base_dtype or target_modules is not one milora writes"
        )
    expected = {key(layer, part) for layer in found.layers for part in "AB"}
    for name, tensors in ((ADAPTER_FILE, found.trained), (INIT_FILE, found.initial)):
        path = found.folder / name
        if set(tensors) != expected:
            first = sorted(expected - set(tensors))[:1] or sorted(set(tensors) - expected)[:1]
            raise AdapterError(f"{path} does not hold the layers of {META_FILE} (first difference: {first[0]})")
        for layer in found.layers:
            A, B = tensors[key(layer, "A")], tensors[key(layer, "B")]
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
                raise AdapterError(
                    f"{path}: {layer} has factors of shape {list(A.shape)} and {list(B.shape)}, "
                    f"but {META_FILE} says r={r}; the files come from different runs"
                )
        bad = next((name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()), None)
        if bad:
            raise AdapterError(f"{path} is damaged: {bad} holds NaN or infinite values")
    shapes = [(found.trained[key(layer, "A")].shape[1], found.trained[key(layer, "B")].shape[0]) for layer in found.layers]
    if shapes != [(found.initial[key(layer, "A")].shape[1], found.initial[key(layer, "B")].shape[0]) for layer in found.layers]:
        raise AdapterError(f"{found.folder}: {ADAPTER_FILE} and {INIT_FILE} have different layer shapes; they come from different runs")
    if abs(meta["scaling"] - meta["lora_alpha"] / r) > 1e-9 * abs(meta["scaling"]):
        raise AdapterError(f"{found.folder / META_FILE}: scaling {meta['scaling']} is not lora_alpha / r = {meta['lora_alpha']} / {r}; it was edited")
