"""Adversarial attacks on the encoder (Eq. 13) and on the linear probe, batched over many images.

An attack looks for a perturbation e with ||e||_inf <= delta (and x + e in [0, 1]) that
maximises a dissimilarity Delta between the posteriors q(.|x) and q(.|x + e):

* ``"kl"``: Delta = KL[q(.|x) || q(.|x + e)], the clean posterior first. Eq. (13) writes
  Delta[q(.|x), q(.|x + e)], and KL[P || Q] with P the first argument is the expectation
  under the clean posterior (the reference the attacker moves away from). It is the
  direction the Smooth Encoder's authors use for their KL attack, and it punishes a
  shrunken adversarial variance as hard as a moved mean.
* ``"w2"``: Delta = W2(q(.|x), q(.|x + e)) = sqrt(||mu - mu_e||^2 + ||sigma - sigma_e||^2)
  for diagonal Gaussians. PGD ascends W2^2: its gradient is W2's times 2 W2 > 0, so the
  sign steps, and the best iterate per image, are the same, without sqrt's infinite
  slope at 0.
* ``"rkl"`` (beyond the paper, strong protocol): KL[q(.|x + e) || q(.|x)], the other
  direction. "kl" can grow without bound by shrinking the adversarial variance, which the
  probe never reads; the reverse KL weighs a moved mean by the clean variance instead.
* ``"mean"`` (beyond the paper, strong protocol): ||mu(x + e) - mu(x)||^2, the movement of
  the representation the probe actually reads, with no variance term at all.
* ``"ce"`` (beyond the paper): end to end, the cross-entropy of the linear probe on
  mu(x + e) against the true label.

Each attack is the paper's PGD: `steps` (50) sign-gradient ascent steps of `step_size`
(delta/25), each followed by projection onto the L-inf ball and onto [0, 1]
(raven.pgd.pgd_linf), from a uniform random start in the ball (Delta and its gradient
vanish at e = 0, so a start at x never moves), keeping per image the iterate with the
highest objective seen.

Restarts: each restart is an independent PGD run from its own random start. The
returned adversarial image is, per image, the one with the highest Delta over restarts;
for accuracy an image counts as robust only when the probe classifies it correctly after
*every* restart (misclassified if any restart misclassifies). The accuracy reported is
thus at most that of any one of its restarts, each a plain 50-step PGD, so the evaluator
never reports more robustness than a correct PGD finds. `survives` (the strong protocol)
counts an image robust only if the probe is right at *every iterate* of every restart,
not only at the kept one: any point PGD visits lies in the ball, so a misclassified one
is an adversarial example whatever its Delta.

Images are attacked in chunks of `batch_size` rows at once, on the model's device, with
the model's parameters frozen (requires_grad False) for the duration: gradients are
taken with respect to the input alone.

precision "bf16" runs the search in bfloat16: the objective PGD ascends (its forward and
backward through the encoder and probe) under an autocast, so its values and gradient signs
carry bf16 rounding. Every verdict stays float32 on the exact (float32) image: whether the
probe is fooled, at the kept image (`attack`) or at every iterate (`survives`), and the
Delta reported. bf16 can only steer the search, never decide an outcome.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raven.config import PRECISIONS
from raven.options import one_of
from raven.gaussians import diag_gaussian_kl, diag_gaussian_w2_squared
from raven.pgd import pgd_linf
from raven.step import warn_if_bf16_is_slow

ATTACKS = ("kl", "w2", "ce", "rkl", "mean")
ENCODER_ATTACKS = ("kl", "w2", "rkl", "mean")
PAPER_ATTACKS = ("kl", "w2")
PAPER_STEPS = 50
PAPER_STEP_DIVISOR = 25.0  # step size delta / 25 (Section 4.1.1)
SEGMENT = 10  # survives(): steps between the host syncs that drop the rows already fooled


def default_step_size(delta: float) -> float:
    """The paper's step size, delta / 25."""
    return delta / PAPER_STEP_DIVISOR


def dissimilarity(kind: str, mu: torch.Tensor, logvar: torch.Tensor, mu_adv: torch.Tensor,
                  logvar_adv: torch.Tensor) -> torch.Tensor:
    """Delta between q(.|x) = N(mu, e^logvar) and q(.|x+e) = N(mu_adv, e^logvar_adv), one value per row.

    "kl": KL[q(.|x) || q(.|x + e)] in nats; "w2": the 2-Wasserstein distance (not squared);
    "rkl": KL[q(.|x + e) || q(.|x)] in nats; "mean": ||mu_adv - mu||^2. Computed in
    float64 (the (N, d) tensors are tiny): posteriors with variances ~1e-8, as RAVEN's
    with a small sigma_aug, give KLs of 1e7 nats and more, and exp(-logvar) must not
    overflow while an attack drives logvar down.
    """
    mu, logvar, mu_adv, logvar_adv = (t.double() for t in (mu, logvar, mu_adv, logvar_adv))
    if kind == "kl":
        return diag_gaussian_kl(mu, logvar, mu_adv, logvar_adv)
    if kind == "w2":
        return diag_gaussian_w2_squared(mu, logvar, mu_adv, logvar_adv).clamp_min(0.0).sqrt()
    if kind == "rkl":
        return diag_gaussian_kl(mu_adv, logvar_adv, mu, logvar)
    if kind == "mean":
        return (mu_adv - mu).pow(2).sum(dim=-1)
    raise ValueError(f"unknown encoder attack {kind!r}; choose one of {', '.join(ENCODER_ATTACKS)}")


def ascent_objective(kind: str, mu: torch.Tensor, logvar: torch.Tensor, mu_adv: torch.Tensor,
                     logvar_adv: torch.Tensor) -> torch.Tensor:
    """What PGD ascends: the same argmax and the same sign steps as `dissimilarity` (W2^2 for W2)."""
    if kind == "w2":
        return diag_gaussian_w2_squared(*(t.double() for t in (mu, logvar, mu_adv, logvar_adv)))
    return dissimilarity(kind, mu, logvar, mu_adv, logvar_adv)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters with requires_grad False and the module in eval mode; both restored on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    was_training = module.training
    for p, _ in flags:
        p.requires_grad_(False)
    module.eval()
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)


def _objective(kind: str, encoder: nn.Module, probe: nn.Module | None, x: torch.Tensor,
               y: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What PGD ascends for the rows x (labels y): the probe's cross-entropy for "ce", else Delta to q(.|x)."""
    if kind == "ce":
        return lambda x_adv: F.cross_entropy(probe(encoder(x_adv)[0]), y, reduction="none")
    with torch.no_grad():
        mu, logvar = encoder(x)

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        mu_adv, logvar_adv = encoder(x_adv)
        return ascent_objective(kind, mu, logvar, mu_adv, logvar_adv)

    return objective


def in_precision(objective: Callable[[torch.Tensor], torch.Tensor], precision: str,
                 device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`objective` computed under a bfloat16 autocast for precision "bf16" (values back in float32), else itself."""
    if precision == "fp32":
        return objective
    warn_if_bf16_is_slow(precision, device)

    def reduced(x_adv: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return objective(x_adv).float()

    return reduced


def _check(kind: str, delta: float, steps: int, restarts: int, batch_size: int, needs_probe: bool,
           probe: nn.Module | None, y: torch.Tensor | None, precision: str = "fp32") -> None:
    one_of("precision", precision, PRECISIONS)
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; choose one of {', '.join(ATTACKS)}")
    if needs_probe and (probe is None or y is None):
        raise ValueError(f"the {kind!r} attack needs the linear probe and the labels")
    if delta < 0:
        raise ValueError(f"delta must be >= 0, got {delta}")
    if restarts < 1 or steps < 1 or batch_size < 1:
        raise ValueError("steps, restarts and batch_size must be >= 1")


@dataclass
class AttackOutput:
    """x_adv: worst-case image per row (highest Delta, or highest CE for "ce", over restarts);
    dissimilarity: Delta at x_adv for encoder attacks (for "ce", the probe's cross-entropy);
    correct: per row, True when the probe is right after every restart (None without a probe)."""

    x_adv: torch.Tensor
    dissimilarity: torch.Tensor
    correct: torch.Tensor | None


def attack(
    model: nn.Module,
    x: torch.Tensor,
    delta: float,
    kind: str = "kl",
    *,
    steps: int = PAPER_STEPS,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    batch_size: int = 1000,
    probe: nn.Module | None = None,
    y: torch.Tensor | None = None,
    precision: str = "fp32",
) -> AttackOutput:
    """PGD in the L-inf ball of radius `delta` (intersected with [0, 1]) against `model`'s encoder.

    `model` is a RavenModel (its `.encoder` maps (N, 784) to (mu, logvar)); `x` (N, 784)
    in [0, 1]. With `probe` (a module on mu) and labels `y`, `correct` reports per image
    whether the probe survives every restart; kind "ce" needs both. delta = 0 returns x.
    Everything runs on x's device; move the model there first. precision: the search's
    (module docstring); `correct` and `dissimilarity` are float32 either way.
    """
    _check(kind, delta, steps, restarts, batch_size, kind == "ce", probe, y, precision)
    step = default_step_size(delta) if step_size is None else float(step_size)
    x = x.detach()
    outputs_x, outputs_value, outputs_correct = [], [], []
    encoder = model.encoder
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen(model))
        if probe is not None:
            stack.enter_context(frozen(probe))
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size]
            yb = y[start:start + batch_size] if y is not None else None
            with torch.no_grad():
                mu, logvar = encoder(xb)
            objective = in_precision(_objective(kind, encoder, probe, xb, yb), precision, xb.device)
            best_x = xb
            best_value = None
            correct = None
            for _ in range(restarts if delta > 0 else 1):
                x_adv = pgd_linf(objective, xb, delta, steps, step, random_start=random_start,
                                 generator=generator, keep_best=True)
                with torch.no_grad():
                    mu_adv, logvar_adv = encoder(x_adv)
                    if kind == "ce":
                        value = F.cross_entropy(probe(mu_adv), yb, reduction="none")
                    else:
                        value = dissimilarity(kind, mu, logvar, mu_adv, logvar_adv)
                    if best_value is None:
                        best_x, best_value = x_adv, value
                    else:
                        better = value > best_value
                        best_x = torch.where(better.unsqueeze(1), x_adv, best_x)
                        best_value = torch.where(better, value, best_value)
                    if probe is not None and yb is not None:
                        right = probe(mu_adv).argmax(dim=1) == yb
                        correct = right if correct is None else correct & right
            outputs_x.append(best_x)
            outputs_value.append(best_value)
            if correct is not None:
                outputs_correct.append(correct)
    return AttackOutput(
        x_adv=torch.cat(outputs_x),
        dissimilarity=torch.cat(outputs_value),
        correct=torch.cat(outputs_correct) if outputs_correct else None,
    )


def survives(
    model: nn.Module,
    probe: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    delta: float,
    kind: str,
    *,
    steps: int,
    step_size: float | None = None,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    batch_size: int = 1000,
    precision: str = "fp32",
) -> torch.Tensor:
    """Per image, True when the probe is right at every iterate of every restart of PGD `kind` (strong protocol).

    The same PGD as `attack` (random start, `steps` sign steps of `step_size`, default
    delta/25), judged at every point it visits: any of them lies in the ball, so a
    misclassified one is an adversarial example whatever its Delta. Work goes only where
    it can change the answer: every SEGMENT steps (one host sync) the rows already fooled
    leave the batch, each row's path staying what it would have been, and every restart
    runs on the rows no earlier restart fooled. precision: the search's; each iterate is judged in float32.
    """
    _check(kind, delta, steps, restarts, batch_size, True, probe, y, precision)
    step = default_step_size(delta) if step_size is None else float(step_size)
    x = x.detach()
    encoder = model.encoder
    with torch.no_grad(), frozen(probe):
        alive = probe(encoder(x)[0]).argmax(dim=1) == y
    if delta <= 0:
        return alive
    with frozen(model), frozen(probe):
        for _ in range(restarts):
            rows = alive.nonzero().squeeze(1)
            for chunk in rows.split(batch_size):
                x_adv = None
                for done in range(0, steps, SEGMENT):
                    xs, ys = x[chunk], y[chunk]
                    wrong = torch.zeros(len(chunk), dtype=torch.bool, device=x.device)

                    def record(x_it: torch.Tensor) -> None:
                        wrong.logical_or_(probe(encoder(x_it)[0]).argmax(dim=1) != ys)

                    objective = in_precision(_objective(kind, encoder, probe, xs, ys), precision, xs.device)
                    x_adv = pgd_linf(objective, xs, delta, min(SEGMENT, steps - done), step, generator=generator,
                                     keep_best=False, on_iterate=record, start=x_adv)
                    alive[chunk] &= ~wrong
                    kept = ~wrong
                    if not bool(kept.any()):
                        break
                    chunk, x_adv = chunk[kept], x_adv[kept]
    return alive


def random_perturbation(x: torch.Tensor, delta: float, mode: str = "uniform",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """A non-adversarial control with the same budget: uniform in the ball ("uniform") or
    delta times random signs ("sign"), then clipped to [0, 1]."""
    if mode == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    elif mode == "sign":
        noise = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'uniform' or 'sign'")
    return (x + delta * noise).clamp(0.0, 1.0)


@torch.no_grad()
def encoder_dissimilarity(model: nn.Module, x: torch.Tensor, x_other: torch.Tensor, kind: str,
                          batch_size: int = 5000) -> torch.Tensor:
    """Delta[q(.|x), q(.|x_other)] per row, in chunks."""
    values = []
    for start in range(0, len(x), batch_size):
        mu, logvar = model.encoder(x[start:start + batch_size])
        mu_o, logvar_o = model.encoder(x_other[start:start + batch_size])
        values.append(dissimilarity(kind, mu, logvar, mu_o, logvar_o))
    return torch.cat(values)

