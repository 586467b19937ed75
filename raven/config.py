"""Typed, validated configuration of a training run.

Bad values are rejected here, once, with a message naming the field and the allowed
range, before any data is read or any model is built. The fields written out below are
shared by every method; each method declares the rest as options (raven.methods), which
TrainConfig gains as fields, so adding a method never edits this file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from raven.data import DATASETS
from raven.methods import METHODS as REGISTRY
from raven.methods import options
from raven.methods.base import PAIR_NOISE  # noqa: F401 - re-exported
from raven.methods.raven import PAPER_SIGMA_AUG  # noqa: F401 - re-exported
from raven.methods.smooth_encoder import DEFAULT_ETA, PAPER_ETA, PAPER_SE_ETA_GRID  # noqa: F401 - re-exported
from raven.options import ConfigError, at_least, flag_field, non_negative, one_of, positive

METHODS = tuple(REGISTRY)
# The precision of training's matrix products: float32, or bfloat16 with float32 weights, optimiser and objective.
PRECISIONS = ("fp32", "bf16")
# Methods whose objective sees a (clean, noisy) pair per image.
PAIRED_METHODS = tuple(name for name, method in REGISTRY.items() if method.paired)


@dataclass(frozen=True)
class _SharedFields:
    """The fields every method reads (the device is chosen separately).

    beta weighs the KL/prior term (beta = 1 is the bound of the paper).
    patience stops training once val_elbo has not improved for that many epochs
    (None trains all `epochs`); with it, the model kept is that of the best val_elbo
    epoch.
    precision "bf16" runs the encoder's and decoder's matrix products in bfloat16 (torch.autocast)
    while the weights (the master copy), the objective, the gradients and RAdam stay float32;
    validation is always float32.
    grad_clip_norm caps the global gradient norm. RAdam takes plain momentum-SGD steps
    for its first few iterations (until its variance estimate is trusted), and with
    sigma_aug = 0.01 the initial KL gradient is ~1e4 times larger than the
    reconstruction's, so those unadapted steps blow the weights up; the cap only binds
    then. None disables it.
    """

    method: str = "raven"  # raven train's --method is required: written by hand there
    dataset: str = flag_field("mnist", "data set", choices=DATASETS)
    beta: float = flag_field(1.0, "weight of the KL/prior term")
    latent_dim: int = flag_field(10, "latent dimensions d")
    epochs: int = flag_field(20, "epochs at most")
    patience: int | None = flag_field(None, "stop when val_elbo has not improved for this many epochs "
                                            "(default: train all epochs)")
    batch_size: int = flag_field(128, "images per step")
    lr: float = flag_field(1e-3, "RAdam's learning rate")
    grad_clip_norm: float | None = flag_field(100.0, "cap on the global gradient norm", off=(
        "--no-grad-clip", "do not cap the global gradient norm (the paper has no cap)"))
    seed: int = flag_field(0, "seed of the weights, the batch order and every draw")
    limit: int | None = flag_field(None, "train on the first N training images")
    validation_size: int = flag_field(5000, "training images held out for validation")
    precision: str = flag_field("fp32", "matrix products of training: fp32, or bf16 (weights, objective and "
                                        "optimiser stay float32)", choices=PRECISIONS)


def _check(self: Any) -> None:
    if self.method not in REGISTRY:
        raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(REGISTRY)}")
    if self.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
    at_least("latent_dim", self.latent_dim, 1)
    non_negative("beta", self.beta)
    at_least("epochs", self.epochs, 1)
    if self.patience is not None:
        at_least("patience", self.patience, 1)
    at_least("batch_size", self.batch_size, 1)
    positive("lr", self.lr)
    if self.grad_clip_norm is not None:
        positive("grad_clip_norm", self.grad_clip_norm)
    at_least("seed", self.seed, 0)
    if self.limit is not None:
        at_least("limit", self.limit, 1)
    at_least("validation_size", self.validation_size, 1)
    one_of("precision", self.precision, PRECISIONS)
    values = dataclasses.asdict(self)
    method = REGISTRY[self.method]
    for option in options().values():
        values[option.name] = option.check(values[option.name], values, method)
        object.__setattr__(self, option.name, values[option.name])


def _paired(self: Any) -> bool:
    """The method trains on (clean, noisy) pairs."""
    return REGISTRY[self.method].paired


def _to_dict(self: Any) -> dict[str, Any]:
    return dataclasses.asdict(self)


@classmethod
def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    return cls(**values)


def _replace(self: Any, **changes: Any) -> Any:
    return dataclasses.replace(self, **changes)


# The shared fields, then every method's options (metadata: the option, for flags).
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(o.name, Any, dataclasses.field(default=o.default, metadata={"option": o})) for o in options().values()],
    bases=(_SharedFields,), frozen=True,
    namespace={"__post_init__": _check, "paired": property(_paired), "to_dict": _to_dict, "from_dict": _from_dict,
               "replace": _replace, "__module__": __name__,
               "__doc__": "Everything that defines a training run: the shared fields (see _SharedFields) and "
                          "every method's options (raven.methods), each validated on construction."},
)
