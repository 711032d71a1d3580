"""Shared test fixtures. Tests run on the CPU with tiny inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mmtag.process.configure_process


def comp5329_dir() -> Path:
    """The real data folder: $MMTAG_COMP5329_DIR, else ../shared/data/comp5329 beside the repo."""
    env = os.environ.get("MMTAG_COMP5329_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "comp5329"


@pytest.fixture
def real_data() -> Path:
    d = comp5329_dir()
    if not (d / "train.csv").exists():
        pytest.skip(f"real COMP5329 data not found at {d} (set MMTAG_COMP5329_DIR)")
    return d
