"""One golden loss curve: the tiny seeded model trained six steps in float64, against numbers recorded once.

Every other test compares milora with itself or with a reference (PEFT, a float64 SVD), so a change that
shifts every path alike (the loss normalisation, the scaling s, the prompt template, the batch order,
the learning-rate schedule) would pass them all. This one pins the numbers. Recorded with torch 2.13 on
CPU (1 and 2 threads give the same digits), in float64 so that no CPU's rounding can move them: the bound is
float64's unit roundoff 2^-53 amplified by Adam, whose update lr m/(sqrt(v) + eps) changes by up to lr/eps =
5e6 times a near-zero gradient's absolute error (at most ~10^3 terms x 1.1e-16 x its terms' size, < 1e-1):
< 1e-7 in a factor, and so < 1e-7 relative in a loss of ~10. The curve moves by 0.01-0.1 a step (float32 moves
it by 2e-6), so a real change does not stay under that.
If a change is meant to move the curve, re-record the numbers and say why in the commit.
"""

import json

import pytest
from rich.console import Console

from milora_cli.recipe import validate
from milora_cli.training.train import train

# (step, training loss) per step, then the validation loss at steps 3 and 6
GOLDEN_LOSSES = [(1, 10.497253031759337), (2, 10.510033348209681), (3, 10.475146599096593), (4, 10.424287445391212),
                 (5, 10.410339292514955), (6, 10.514507927886578)]
GOLDEN_VAL = [(3, 10.460893276878636), (6, 10.495696038648132)]
GOLDEN_REL = 1e-7  # float64 rounding amplified by Adam, bounded above


def test_the_tiny_loss_curve_is_the_recorded_one(tiny_model_dir, tiny_data, tmp_path):
    raw = {
        "model": {"name_or_path": tiny_model_dir, "dtype": "fp64"},
        "adapter": {"init": "milora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": tiny_data, "val_size": 8, "max_length": 64},
        "train": {"max_steps": 6, "lr": 5e-2, "warmup_steps": 2, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
                  "scheduler": "cosine", "log_every": 1, "eval_every": 3},
        "eval": {"heldout": 0},
        "output": {"dir": str(tmp_path / "run")},
    }
    train(validate(raw), Console(quiet=True))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [step for step, _ in losses] == [step for step, _ in GOLDEN_LOSSES]
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in GOLDEN_LOSSES], rel=GOLDEN_REL)
    assert [loss for _, loss in val] == pytest.approx([loss for _, loss in GOLDEN_VAL], rel=GOLDEN_REL)
