"""Every Accelerate launch config in configs/ is one that `accelerate launch` reads without guessing."""

from pathlib import Path

import pytest
import yaml

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
REQUIRED = {"compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank", "mixed_precision", "use_cpu"}


def test_there_are_configs():
    # Only what runs: DDP. The FSDP1 and DeepSpeed configs were removed (issue #9): neither trained milora.
    assert {path.name for path in CONFIGS} == {"ddp.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_parses_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw.keys() >= REQUIRED, f"missing {sorted(REQUIRED - raw.keys())}"
    config = load_config_from_file(str(path))  # raises on an unknown top-level key
    assert config.distributed_type in set(DistributedType) and config.num_processes >= 2
