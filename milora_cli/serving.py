"""What serving engines need of a PEFT export: a rank vLLM accepts, and dW compressed to a chosen rank.

vLLM loads a LoRA only if its r is at most `--max-lora-rank`, whose allowed values are VLLM_MAX_LORA_RANKS
(vllm/config/lora.py, `MaxLoRARanks`; default 16): vllm/lora/peft_helper.py `validate_legal` refuses
"LoRA rank {r} is greater than max_lora_rank {N}". milora's export of a MiLoRA or PiSSA run has rank 2r,

    dW = s (B A - B0 A0) = s [B | -B0] [A ; A0]          s = lora_alpha / r

so a run at r=32 needs `--max-lora-rank 64`, and one at r > 256 has no vLLM rank at all. `merge --rank K`
writes each layer's best rank-K approximation instead (svd.truncate_product, in float64),

    dW_K = s B_K A_K,      relative error ||dW - dW_K||_F / ||dW||_F = sqrt(sum_{i>K} S_i^2 / sum_i S_i^2)

with S the singular values of dW / s, keeping the scaling s (lora_alpha' = s K). K >= 2r keeps every
component: exact up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from milora_cli import svd

# vllm/config/lora.py: MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

Factors = tuple[torch.Tensor, torch.Tensor]  # (B (out, r), A (r, in)): the update is s B A


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM allows that serves a LoRA of `rank`; None when none does."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


@dataclass(frozen=True)
class Compression:
    """The relative Frobenius error of dW at the written rank, per layer and over all layers together."""

    rank: int
    errors: dict[str, float]
    overall: float


def compress(factors: dict[str, Factors], rank: int) -> tuple[dict[str, Factors], Compression]:
    """Each layer's B A at `rank` (float64 SVD, factors returned in float64), and the errors that cost."""
    compressed, errors = {}, {}
    dropped_total, energy_total = 0.0, 0.0
    for layer, (B, A) in factors.items():
        B_k, A_k, S = svd.truncate_product(B.to(torch.float64), A.to(torch.float64), rank)
        energy = float(S.square().sum())
        dropped = float(S[rank:].square().sum())
        errors[layer] = math.sqrt(dropped / energy) if energy > 0 else 0.0
        dropped_total, energy_total = dropped_total + dropped, energy_total + energy
        compressed[layer] = (B_k, A_k)
    overall = math.sqrt(dropped_total / energy_total) if energy_total > 0 else 0.0
    return compressed, Compression(rank, errors, overall)


def describe(export: dict[str, Any], output: str) -> list[str]:
    """What `merge --format peft` tells the user, from its milora_export.json: the compression's error, how to serve."""
    rank, lines = export["peft_r"], []
    if "compression" in export:
        errors = export["compression"]["relative_error_per_layer"]
        worst = max(errors, key=errors.__getitem__)
        lines.append(
            f"dW compressed to rank {rank} by SVD: relative error ||dW - dW_{rank}||_F / ||dW||_F "
            f"{_percent(export['compression']['relative_error'])} over all layers, worst {_percent(errors[worst])} ({worst})"
        )
    allowed = vllm_max_lora_rank(rank)
    if allowed is None:
        lines.append(
            f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): vLLM cannot serve this "
            f"export; write one with --rank {VLLM_MAX_LORA_RANKS[-1]} or less (the error is printed)"
        )
    else:
        lines.append(
            f"rank {rank}: serve with vLLM as `vllm serve {export['base_model']} --enable-lora --lora-modules NAME={output} "
            f"--max-lora-rank {allowed}{template_flag(export, output)}`"
        )
    return lines


def template_flag(export: dict[str, Any], output: str) -> str:
    """vLLM's --chat-template (a file path) for an export that carries the run's own template; "" otherwise. The
    export's milora_export.json of an older milora has no such key."""
    template = export.get("chat_template")
    return f" --chat-template {output}/{template}" if template else ""


def _percent(error: float) -> str:
    return f"{100 * error:.3g}%"
