"""Shared test fixtures. Tests run on the CPU with tiny inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see mmtag.process.configure_process


# The smallest model that trains on the demo data in seconds on a CPU: every module starts from
# it and adds what its tests are about ([*TINY, "optim.epochs=1", ...]; a later setting wins)
TINY = ["data.image_size=32", "data.num_workers=0", "model.pretrained=false",
        "model.image_encoder=efficientnet_lite0", "model.lstm_hidden=8", "model.hidden=16",
        "optim.batch_size=8", "data.len_quantile=1.0"]


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


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The demo data the tests share, made once per test process (40 training rows, 8 test
    rows). Read it, never write into it: a test that edits data copies it first."""
    from mmtag.data.demo import make_demo_data

    d = tmp_path_factory.mktemp("demo")
    make_demo_data(d, n=40, seed=2, n_test=8)
    return d
