"""Where a run's code and data came from: the git commit, and a digest of each data split it read.

Plain values only (no MLflow), so that a process without MLflow (raven.reproduce.offline on a
lent GPU box) records the same provenance; raven.record.tracking logs them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

from raven.data import SPLIT_SEED, raw_files


def git_version(path: str | os.PathLike | None = None) -> str:
    """`<commit>` of the checkout holding `path` (this package by default), `+dirty` when modified."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=16)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_inputs(dataset: str, data_dir: str | os.PathLike | None, images: Mapping[str, int],
                   validation_size: int = 5000) -> list[dict[str, Any]]:
    """What a run read, one entry per split ("train", "validation", "test") with the images it used.

    Each entry names the split `<dataset>-<split>`, the raw files' folder, and a digest: sha256
    of the raw files' bytes and of the split's definition (validation size, split seed, images
    used), so equal digests mean equal data. The validation split is drawn from the training
    files with the fixed SPLIT_SEED; "train" is the rest, cut to its first `images`.
    """
    files = raw_files(dataset, data_dir)
    out = []
    for split, count in images.items():
        paths = files["test" if split == "test" else "train"]
        definition = {"images": int(count), "split_seed": SPLIT_SEED,
                      "validation_size": None if split == "test" else int(validation_size)}
        digest = hashlib.sha256(json.dumps(
            [[_file_digest(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths], definition]).encode())
        out.append({"name": f"{dataset}-{split}", "split": split, "digest": digest.hexdigest()[:16],
                    "source": str(paths[0].parent), "profile": {**definition, "files": [p.name for p in paths]}})
    return out
