"""Shared fixtures: the offline data root and small real MNIST subsets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """RAVEN_DATA_DIR, else the read-only ../shared/data beside the checkout."""
    if os.environ.get("RAVEN_DATA_DIR"):
        return Path(os.environ["RAVEN_DATA_DIR"])
    return REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "MNIST" / "raw").is_dir():
        pytest.fail(f"test data missing: {path}/MNIST/raw (set RAVEN_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def mnist_small(data_dir):
    """2000 training images, the 5000-image validation split, the full test set."""
    from raven.data import load_splits

    return load_splits("mnist", data_dir, "cpu", validation_size=5000, limit=2000)


@pytest.fixture(autouse=True)
def _single_process_determinism():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    # Code under test may set torch's threads (run_pack, --threads); a later test comparing results bit for bit
    # with a subprocess (at torch's default threads) must not inherit it.
    torch.set_num_threads(threads)
