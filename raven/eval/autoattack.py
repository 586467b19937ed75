"""AutoAttack's standard set (Croce & Hein, ICML 2020) on the composite classifier x -> probe(mu(x)).

The four attacks are the reference implementation's own classes (fra31/auto-attack, packaged
on PyPI as pyautoattack 0.2.0, a core dependency: it declares no requirements, so it installs
cleanly beside mlflow, where torchattacks 3.5.1's pin requests~=2.25.1 could not). They are
built with the arguments of the reference's `AutoAttack(version="standard")` and run in its
order, each only on the images the previous ones left correctly classified, as its
`run_standard_evaluation` does:

* APGD-CE: `APGDAttack(loss="ce")`, `steps` iterations, rho 0.75;
* APGD-T: `APGDAttack_targeted`, the targeted DLR loss against each of the 9 other classes;
* FAB-T: `FABAttack_PT(targeted=True)`, the minimum-norm attack against the 9 other classes;
* Square: `SquareAttack`, the score-based random search (no gradients, so gradient masking
  cannot hide a weakness from it), `square_queries` queries, p_init 0.8, no rescaled schedule.

Choice: the cascade is run here rather than through `AutoAttack.run_standard_evaluation`, so
that the caller chooses the images (`correct`), counts the survivors after each part, and
takes the verdict itself (below). The budgets default to the standard version's (100
iterations, 1 restart, 9 target classes, 5,000 Square queries).

The threat model is the evaluator's: L-inf ball of radius delta around x in [0, 1]
pixels, intersected with [0, 1]. Every image an attack returns is projected onto that set
again and classified here in fp32, so an image counts as broken only if a point of the set
fools the probe.

The reference seeds torch's global generators in every attack; the caller's random state
is saved and restored around each call (torch.random.fork_rng).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raven.eval.attacks import frozen

STANDARD_STEPS = 100
STANDARD_SQUARE_QUERIES = 5000
_SIDE = 28
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
INSTALL_HINT = "pip install pyautoattack==0.2.0"


class ProbeOnMean(nn.Module):
    """The composite classifier: images (N, 1, 28, 28) or (N, 784) in [0, 1] -> probe logits on mu(x)."""

    def __init__(self, encoder: nn.Module, probe: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.probe = probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(self.encoder(x.flatten(1))[0])


def autoattack_available() -> tuple[bool, str]:
    """(True, "") when the reference AutoAttack (pyautoattack) imports; else (False, a one-line reason)."""
    try:
        import pyautoattack  # noqa: F401
    except ImportError as error:
        return False, f"the strong protocol needs AutoAttack ({error}); install it with {INSTALL_HINT}"
    return True, ""


def _build(name: str, classifier: nn.Module, delta: float, steps: int, square_queries: int, restarts: int,
           seed: int, n_classes: int) -> Any:
    """One part of the standard set, with the reference's standard arguments and our budget."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
    from pyautoattack.fab_pt import FABAttack_PT
    from pyautoattack.square import SquareAttack

    targets = n_classes - 1
    if name == "apgd-ce":
        return APGDAttack(classifier, n_iter=steps, norm="Linf", n_restarts=restarts, eps=delta, seed=seed,
                          loss="ce", eot_iter=1, rho=0.75)
    if name == "apgd-t":
        return APGDAttack_targeted(classifier, n_iter=steps, norm="Linf", n_restarts=restarts, eps=delta,
                                   seed=seed, eot_iter=1, rho=0.75, n_target_classes=targets)
    if name == "fab-t":
        return FABAttack_PT(classifier, norm="Linf", n_restarts=restarts, n_iter=steps, eps=delta, seed=seed,
                            targeted=True, n_target_classes=targets)
    if name == "square":
        return SquareAttack(classifier, norm="Linf", n_queries=square_queries, eps=delta, p_init=0.8,
                            n_restarts=restarts, seed=seed, resc_schedule=False)
    raise ValueError(f"unknown AutoAttack component {name!r}; choose from {', '.join(COMPONENTS)}")


def autoattack(classifier: ProbeOnMean, x: torch.Tensor, y: torch.Tensor, delta: float, *,
               correct: torch.Tensor | None = None, steps: int = STANDARD_STEPS,
               square_queries: int = STANDARD_SQUARE_QUERIES, restarts: int = 1, seed: int = 0,
               batch_size: int = 10000, components: tuple[str, ...] = COMPONENTS
               ) -> tuple[torch.Tensor, dict[str, int]]:
    """Per image, True when the probe survives every attack; and the images left standing after each.

    `x` (N, 784) in [0, 1] and labels `y` on the classifier's device. `correct` (bool, N)
    restricts the attacks to those images (default: the ones the probe gets right on x;
    the others count as broken). `components` picks a part of the standard set, in its
    order (("apgd-ce",) for the cheap selection objective). Images are attacked in chunks
    of `batch_size`.
    """
    n_classes = classifier.probe.out_features
    low = (x - delta).clamp(min=0.0)
    high = (x + delta).clamp(max=1.0)
    images = x.reshape(-1, 1, _SIDE, _SIDE)
    with torch.no_grad():
        if correct is None:
            correct = torch.cat([classifier(images[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                                 for i in range(0, len(x), batch_size)])
    alive = correct.clone()
    survivors: dict[str, int] = {}
    if delta <= 0:
        return alive, {name: int(alive.sum()) for name in components}
    devices = [x.device] if x.device.type == "cuda" else []
    with frozen(classifier):
        for name in components:
            todo = alive.nonzero().squeeze(1)  # one host sync per attack, not per step
            for start in range(0, len(todo), batch_size):
                rows = todo[start:start + batch_size]
                with torch.random.fork_rng(devices=devices):
                    adversary = _build(name, classifier, delta, steps, square_queries, restarts,
                                       seed + COMPONENTS.index(name), n_classes)
                    adv = adversary.perturb(images[rows], y[rows]).reshape(len(rows), -1)
                with torch.no_grad():
                    adv = torch.minimum(torch.maximum(adv, low[rows]), high[rows])
                    alive[rows] = classifier(adv).argmax(1) == y[rows]
            survivors[name] = int(alive.sum())
    return alive, survivors
