"""The checkpoint folder of a run: DIR/checkpoint.pt (everything resume needs) and DIR/metrics.json.

Written after every epoch by the loop (raven.train), read back by resume (`resume_state`) and by
`raven.load_checkpoint`. A pack writes each member's folder in this same format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from raven.config import ConfigError, TrainConfig
from raven.models import RavenModel
from raven.step import build_model

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
CHECKPOINT_FORMAT = 1


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint folder or file -> the checkpoint file, with a clear error when absent."""
    path = Path(path)
    file = path / CHECKPOINT_NAME if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no raven checkpoint at {path} (expected {CHECKPOINT_NAME} written by `raven train`)")
    return file


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    file = checkpoint_file(path)
    try:
        state = torch.load(file, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{file} is not a readable raven checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{file}: not a raven checkpoint of format {CHECKPOINT_FORMAT} (found {found!r})")
    return state


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> RavenModel:
    """The trained model from a checkpoint folder or file, in eval mode.

    The model carries `.config` (TrainConfig) and `.history` (per-epoch metrics).
    """
    state = load_state(path, map_location)
    config = TrainConfig.from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.to(map_location).eval()
    model.config = config
    model.history = state["history"]
    return model


def resume_state(checkpoint_path: Path, config: TrainConfig, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint to resume `config` from, None when there is none; epochs and patience may change."""
    if not checkpoint_path.is_file():
        return None
    state = load_state(checkpoint_path, device)
    saved = TrainConfig.from_dict(state["config"])
    if saved.replace(epochs=config.epochs, patience=config.patience) != config:
        raise ConfigError(f"{checkpoint_path} was trained with a different config; "
                          "use another --out, or --fresh to start over")
    return state


def write_checkpoint(out_path: Path, config: TrainConfig, model_state: dict[str, torch.Tensor],
                     optimizer_state: dict[str, Any], generator: torch.Generator, history: list[dict[str, float]],
                     device: torch.device, train_images: int) -> None:
    """DIR/checkpoint.pt (everything resume needs) and DIR/metrics.json after epoch len(history)."""
    _atomic_torch_save({
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": model_state,
        "optimizer": optimizer_state,
        "generator": generator.get_state(),
        "epoch": len(history),
        "history": history,
        "torch_version": torch.__version__,
    }, out_path / CHECKPOINT_NAME)
    _write_json({"config": config.to_dict(), "device": str(device), "train_images": train_images,
                 "history": history, "final": history[-1]}, out_path / METRICS_NAME)
