"""Every Accelerate launch config in configs/ is one that `accelerate launch` reads without guessing."""

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
REQUIRED = {"compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank", "mixed_precision", "use_cpu"}


def test_there_are_configs():
    assert {path.name for path in CONFIGS} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_parses_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw.keys() >= REQUIRED, f"missing {sorted(REQUIRED - raw.keys())}"
    config = load_config_from_file(str(path))  # raises on an unknown top-level key
    assert config.distributed_type in set(DistributedType) and config.num_processes >= 2
    # Nested sections become `accelerate launch` arguments (fsdp_config.x -> --fsdp_x): each must be one.
    arguments = {action.dest for action in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in raw.get("fsdp_config", {})] + list(raw.get("deepspeed_config", {}))
    assert not [key for key in nested if key not in arguments]
    section = {"FSDP": "fsdp_config", "DEEPSPEED": "deepspeed_config"}.get(raw["distributed_type"])
    assert section is None or raw.get(section), f"{raw['distributed_type']} needs its {section} section"
