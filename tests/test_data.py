"""Reading the raw files in place, the seeded split, the noisy pairs, and the offline error."""

from __future__ import annotations

import gzip
import hashlib
import urllib.error

import numpy as np
import pytest
import torch

from raven import data
from raven.data import DataError, bernoulli_target, fixed_noisy_copy, load_raw, load_splits, noisy_copy


def test_reads_read_only_gz_root_and_matches_published_checksums(data_dir):
    raw = load_raw("mnist", str(data_dir))
    images, labels = raw["train"]
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert raw["test"][0].shape == (10000, 28, 28)
    # The parsed bytes are the IDX payload whose SHA-256 the data folder publishes.
    sums = {line.split()[1]: line.split()[0] for line in (data_dir / "SHA256SUMS").read_text().splitlines() if line.strip()}
    with gzip.open(data_dir / "MNIST/raw/train-labels-idx1-ubyte.gz", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sums["MNIST/raw/train-labels-idx1-ubyte"]
    assert np.bincount(labels, minlength=10).sum() == 60000


def test_split_is_seeded_disjoint_and_limit_takes_first_images(data_dir):
    full = load_splits("mnist", data_dir, validation_size=5000)
    again = load_splits("mnist", data_dir, validation_size=5000, limit=100)
    assert full.train_x.shape == (55000, 784) and full.val_x.shape == (5000, 784)
    assert full.train_x.dtype == torch.float32 and 0.0 <= full.train_x.min() and full.train_x.max() <= 1.0
    assert torch.equal(full.val_x, again.val_x)
    assert torch.equal(full.train_x[:100], again.train_x)
    train_rows = {bytes(r) for r in (full.train_x[:2000] * 255).round().to(torch.uint8).numpy()}
    val_rows = [bytes(r) for r in (full.val_x * 255).round().to(torch.uint8).numpy()]
    # MNIST has a handful of duplicate images; a split that leaked would share thousands.
    assert sum(r in train_rows for r in val_rows) < 5


def test_fashion_mnist_loads(data_dir):
    fashion = load_splits("fashion-mnist", data_dir, limit=10)
    assert fashion.test_x.shape == (10000, 784) and set(fashion.test_y.tolist()) == set(range(10))


def test_noisy_copy_is_unclipped_and_the_bernoulli_target_is_its_clip():
    x = torch.full((2000, 784), 0.5)
    g = torch.Generator().manual_seed(0)
    noisy = noisy_copy(x, 0.05, g)
    assert abs(float((noisy - x).std()) - 0.05) < 1e-3 and abs(float((noisy - x).mean())) < 1e-4
    edge = noisy_copy(torch.ones(1000, 784), 0.05, g)
    # x~ + eps as the paper writes it: half the noise on a saturated pixel leaves [0, 1].
    assert 0.45 < float((edge > 1).float().mean()) < 0.55
    target = bernoulli_target(edge)
    assert float(target.max()) == 1.0 and torch.equal(target, edge.clamp(0, 1))
    inside = (edge >= 0) & (edge <= 1)
    assert torch.equal(target[inside], edge[inside])


def test_fixed_noisy_copy_is_one_draw_per_seed_whatever_the_training_generator():
    x = torch.rand(300, 784)
    first = fixed_noisy_copy(x, 0.05, seed=3)
    torch.randn(10)  # the global and training generators play no part
    assert torch.equal(first, fixed_noisy_copy(x, 0.05, seed=3))
    other = fixed_noisy_copy(x, 0.05, seed=4)
    assert not torch.allclose(first, other)
    assert abs(float((first - x).std()) - 0.05) < 1e-3 and first.device == x.device and first.dtype == x.dtype


def test_missing_data_offline_is_one_clear_line(tmp_path, monkeypatch):
    def offline(dataset, root):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(DataError) as info:
        load_raw("mnist", str(tmp_path / "empty"))
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("RAVEN_DATA_DIR", str(tmp_path / "env"))
    assert data.default_data_dir(tmp_path / "cli") == tmp_path / "cli"
    assert data.default_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("RAVEN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.default_data_dir(None) == tmp_path / "cache" / "raven" / "data"
