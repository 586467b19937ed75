"""The registry of methods: METHODS[name] is the method object (raven.methods.base.Method).

A method is one module here, whose classes carry @register, and one name on the import line
below (its place there is the method's place in tables and flags). Its options become
TrainConfig fields and `raven train` flags (raven.config).
"""

from __future__ import annotations

from raven.methods import vae, raven, smooth_encoder, beta_tcvae  # noqa: F401  # isort: skip - each import registers
from raven.methods.base import REGISTRY as METHODS
from raven.methods.base import Batch, Method, Terms
from raven.options import Option

# The five methods of the paper's tables: what the reproduction runs unless told otherwise.
PAPER_METHODS = ("vae", "vae-noise", "raven", "raven-gmm", "se")


def options() -> dict[str, Option]:
    """Every method's options by name, in registry order; a shared option is one object."""
    found: dict[str, Option] = {}
    for method in METHODS.values():
        for option in method.options:
            if found.setdefault(option.name, option) is not option:
                raise RuntimeError(f"two different options are named {option.name!r}")
    return found


__all__ = ["METHODS", "PAPER_METHODS", "Batch", "Method", "Terms", "options"]
