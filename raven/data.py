"""MNIST and Fashion-MNIST as in-memory tensors, the seeded validation split, and the noisy pairs.

Images become float32 tensors in [0, 1] of shape (N, 784), made once and kept on the
training device, so an epoch is a permutation and a slice per batch rather than a
per-image PIL decode.

The data root is `--data-dir`, else `RAVEN_DATA_DIR`, else `~/.cache/raven/data`
(`$XDG_CACHE_HOME/raven/data`). A root holding torchvision's raw files
(`MNIST/raw/train-images-idx3-ubyte.gz`, ...), gzipped or not, is read in place and never
written to, so a read-only folder works offline. Otherwise torchvision downloads the
files into the root.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


IMAGE_SIZE = 28 * 28
# Fixed, independent of the training seed, so every run and every trial of a sweep
# selects on the same validation images.
SPLIT_SEED = 0

DATASETS = ("mnist", "fashion-mnist")
_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(RuntimeError):
    """The data set cannot be found or read; the message says where and what is expected."""


def default_data_dir(cli_value: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else `RAVEN_DATA_DIR`, else the user cache folder."""
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get("RAVEN_DATA_DIR"):
        return Path(os.environ["RAVEN_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "raven" / "data"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte, the only type MNIST-format files use
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {array.size}")
    return array.reshape(dims)


def _raw_path(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(dataset: str, root: Path) -> None:
    from torchvision import datasets

    cls = datasets.MNIST if dataset == "mnist" else datasets.FashionMNIST
    for train in (True, False):
        cls(str(root), train=train, download=True)


@functools.lru_cache(maxsize=4)
def load_raw(dataset: str, root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 (N, 28, 28), labels), 'test': (...)} read from `root`.

    Downloads through torchvision when the files are absent; fails with a one-line
    DataError naming the folder and files when that is impossible (offline).
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    root_path = Path(root)
    raw_dir = root_path / _FOLDERS[dataset] / "raw"
    stems = [stem for pair in _FILES.values() for stem in pair]
    if any(_raw_path(raw_dir, stem) is None for stem in stems):
        try:
            _download(dataset, root_path)
        except Exception as exc:  # noqa: BLE001 - any download failure becomes one clear message
            expected = ", ".join(f"{s}.gz" for s in stems)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(
                f"{dataset} not found in {raw_dir} (expected {expected}) and the download failed "
                f"({reason}); point --data-dir or RAVEN_DATA_DIR at a folder holding "
                f"{_FOLDERS[dataset]}/raw/"
            ) from None
    out = {}
    for split, (images_stem, labels_stem) in _FILES.items():
        images = _read_idx(_raw_path(raw_dir, images_stem))
        labels = _read_idx(_raw_path(raw_dir, labels_stem))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise DataError(f"{raw_dir}: unexpected shapes {images.shape} and {labels.shape} for {split}")
        out[split] = (images, labels)
    return out


def raw_files(dataset: str, data_dir: str | os.PathLike | None = None) -> dict[str, tuple[Path, Path]]:
    """{'train': (images file, labels file), 'test': (...)}: the raw files `load_raw` reads (for provenance)."""
    raw_dir = default_data_dir(data_dir) / _FOLDERS[dataset] / "raw"
    found = {split: tuple(_raw_path(raw_dir, stem) for stem in stems) for split, stems in _FILES.items()}
    if any(path is None for pair in found.values() for path in pair):
        raise DataError(f"{dataset} raw files missing in {raw_dir}")
    return found


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1], the same scaling as ToTensor."""
    flat = torch.from_numpy(np.array(images, copy=True)).reshape(len(images), IMAGE_SIZE)
    return flat.to(device=device, dtype=torch.float32).div_(255.0)


@dataclass(frozen=True)
class DataSplits:
    """Images (N, 784) float32 in [0, 1] and int64 labels, all on one device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    def to(self, device: torch.device | str) -> "DataSplits":
        return DataSplits(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def load_splits(
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    validation_size: int = 5000,
    limit: int | None = None,
) -> DataSplits:
    """The seeded train/validation split of the training set, and the test set.

    Validation is `validation_size` images drawn with the fixed SPLIT_SEED; training is
    the rest in their original order, cut to the first `limit` images when given.
    """
    raw = load_raw(dataset, str(default_data_dir(data_dir)))
    images, labels = raw["train"]
    if validation_size >= len(images):
        raise DataError(f"validation_size {validation_size} leaves no training images out of {len(images)}")
    permutation = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    val_index = np.sort(permutation[:validation_size])
    train_mask = np.ones(len(images), dtype=bool)
    train_mask[val_index] = False
    train_index = np.flatnonzero(train_mask)
    if limit is not None:
        train_index = train_index[:limit]
    test_images, test_labels = raw["test"]
    labels_of = lambda a: torch.from_numpy(a.astype(np.int64)).to(device)  # noqa: E731
    return DataSplits(
        train_x=to_tensor(images[train_index], device),
        train_y=labels_of(labels[train_index]),
        val_x=to_tensor(images[val_index], device),
        val_y=labels_of(labels[val_index]),
        test_x=to_tensor(test_images, device),
        test_y=labels_of(test_labels),
    )


def noisy_copy(x: torch.Tensor, noise_std: float, generator: torch.Generator | None = None,
               eps: torch.Tensor | None = None) -> torch.Tensor:
    """The noisy partner as the paper writes it, x = x~ + eps, eps ~ N(0, noise_std^2 I), unclipped.

    Sections 1 and 4.2 (and Appendix C.1) add Gaussian noise and say nothing of a clip, so this
    is what the encoder sees, in training and in Table 1. Only a Bernoulli reconstruction
    target must lie in [0, 1]: see `bernoulli_target`. `eps` passes the standard normal draw
    (shaped like x) instead of drawing it from `generator` (raven.pack draws it per member).
    """
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + noise_std * eps


def bernoulli_target(x: torch.Tensor) -> torch.Tensor:
    """clip(x, 0, 1): the target the Bernoulli likelihood reconstructs for a noisy image x.

    Binary cross-entropy against a target t outside [0, 1] is unbounded below (for t > 1 it
    falls without limit as the logit grows), which a decoder would exploit, so x~ + eps cannot
    be the target as it stands. Its clip is the closest valid Bernoulli mean (the Euclidean
    projection onto [0, 1]^D) and still the noisy image, so Eq. (8)'s second term keeps
    reconstructing x', not x~; only pixels pushed out of range lose the overshoot.
    """
    return x.clamp(0.0, 1.0)


# Seeds the one noisy copy of the training set apart from the training generator, so the copy
# is the same whatever the batch order or the device, and is drawn again identically on resume.
FIXED_NOISE_SEED_OFFSET = 7_919


def fixed_noisy_copy(x: torch.Tensor, noise_std: float, seed: int) -> torch.Tensor:
    """One noisy copy x~_i + eps_i of every row of x, drawn once from `seed` (Appendix C.1).

    The paper's noise-augmented VAE (B) trains on {x~_i} U {x_i} with x_i = x~_i + eps_i: one
    fixed noisy copy of the training set. Drawn on the CPU from its own generator (seed +
    FIXED_NOISE_SEED_OFFSET), so the copy does not depend on the device, and returned on x's
    device.
    """
    generator = torch.Generator().manual_seed(seed + FIXED_NOISE_SEED_OFFSET)
    return noisy_copy(x.detach().to("cpu", torch.float32), noise_std, generator).to(device=x.device, dtype=x.dtype)
