"""The checkpoint folder of a run: DIR/checkpoint.pt (everything resume needs) and DIR/metrics.json.

Written after every epoch by the loop (raven.train), read back by resume (`resume_state`,
`resume_weights`) and by `raven.load_checkpoint`. A pack writes each member's folder in this same
format. `model` holds the weights readers load: the last epoch's, or, once a run with early
stopping has finished, those of its best val_elbo epoch (`best_epoch`). Resume needs both the
last epoch's weights and the best epoch's, so whichever of the two `model` does not hold is
stored beside it (`last_model` or `best_model`) when they differ.
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


def best_epoch_of(history: list[dict[str, float]]) -> int | None:
    """The epoch (from 1) of the highest val_elbo, the earliest of equals; None before the first epoch."""
    values = [h["val_elbo"] for h in history]
    return max(range(len(values)), key=values.__getitem__) + 1 if values else None


def resume_weights(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The last epoch's weights (training continues from them) and the best epoch's; None for the best
    when a checkpoint written before they were kept holds only the last, and the best was earlier."""
    if "last_model" in state:
        return state["last_model"], state["model"]
    if "best_model" in state:
        return state["model"], state["best_model"]
    return state["model"], state["model"] if best_epoch_of(state["history"]) == state["epoch"] else None


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
                     device: torch.device, train_images: int, best_state: dict[str, torch.Tensor] | None = None,
                     last_state: dict[str, torch.Tensor] | None = None) -> None:
    """DIR/checkpoint.pt (everything resume needs) and DIR/metrics.json after epoch len(history).

    model_state: the weights readers load, the last epoch's unless `last_state` is given; then they
    are the best epoch's, restored by early stopping, and last_state the last epoch's. best_state:
    the best epoch's weights (None: unknown), stored when the best epoch is not the last.
    """
    best = best_epoch_of(history)
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "model": model_state,
        "optimizer": optimizer_state,
        "generator": generator.get_state(),
        "epoch": len(history),
        "best_epoch": best,
        "history": history,
        "torch_version": torch.__version__,
    }
    if last_state is not None:
        state["last_model"] = last_state
    elif best != len(history) and best_state is not None:
        state["best_model"] = best_state
    _atomic_torch_save(state, out_path / CHECKPOINT_NAME)
    # "final": the metrics of the epoch whose weights `model` holds.
    final = history[best - 1] if last_state is not None else history[-1]
    _write_json({"config": config.to_dict(), "device": str(device), "train_images": train_images,
                 "history": history, "best_epoch": best, "final": final}, out_path / METRICS_NAME)
