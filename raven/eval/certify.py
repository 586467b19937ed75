"""Certified lower bounds on the probe's robust accuracy: interval bounds (IBP) and CROWN.

The classifier attacked by the strong protocol is x -> probe(mu(x)): the encoder's mean head,
784-500-250-d with PReLU (raven.models), then the linear probe. For an image x with label y the
input set is the L-inf ball of radius delta around x intersected with [0, 1], a box [lo, hi].
The image is *certified* at delta when a sound lower bound of every margin
m_j(x') = logit_y(x') - logit_j(x'), j != y, is positive over the whole box: no attack can then
break it, so certified accuracy is a lower bound on the true robust accuracy, as the strong
protocol's is an upper one.

* IBP propagates the box through each layer as intervals (Gowal et al., 2018), with the last
  encoder layer and the probe folded into the margins.
* CROWN (Zhang et al., NeurIPS 2018) bounds each PReLU on its pre-activation interval [l, u] by
  two lines, and back-substitutes the margins to the input, where the box is exact. A PReLU
  with slope a is convex for a <= 1 (the chord through (l, a l) and (u, u) bounds it from above,
  lambda z with lambda in [a, 1] from below) and concave for a > 1 (the roles swap). lambda is
  chosen per neuron as CROWN's adaptive rule: the slope of the longer side (1 when u >= -l,
  else a). Pre-activation bounds of the second layer come from CROWN too, intersected with IBP's.

Choices: the bound reported is the larger of CROWN's and the interval one on the same (tightened)
pre-activation bounds, both sound, so it is never looser than IBP (CROWN alone can be, rarely). Bounds are computed in float64 by default: a bound that decides a
verdict must not be lost to rounding (and never in bf16). Batched over images, on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from raven.eval.autoattack import ProbeOnMean

_EPS = 0.0  # margins must be > 0 to certify


@dataclass(frozen=True)
class MeanHead:
    """The encoder's mean head as plain tensors: two affine+PReLU layers, then an affine map to mu."""

    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    slopes: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, encoder: nn.Module, dtype: torch.dtype = torch.float64) -> "MeanHead":
        """From raven.models.Encoder (body: Linear, PReLU, Linear, PReLU, Linear to 2d; mu is the first d)."""
        linear1, act1, linear2, act2, linear3 = encoder.body
        d = linear3.out_features // 2
        cast = lambda t: t.detach().to(dtype)  # noqa: E731
        return cls((cast(linear1.weight), cast(linear2.weight), cast(linear3.weight[:d])),
                   (cast(linear1.bias), cast(linear2.bias), cast(linear3.bias[:d])),
                   (cast(act1.weight), cast(act2.weight)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """mu(x) in this head's dtype (the exact function whose bounds are computed)."""
        h = x.to(self.weights[0].dtype)
        for k in range(2):
            z = h @ self.weights[k].T + self.biases[k]
            h = torch.where(z >= 0, z, self.slopes[k] * z)
        return h @ self.weights[2].T + self.biases[2]


def input_box(x: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The L-inf ball of radius delta around x, intersected with [0, 1]."""
    return (x - delta).clamp(min=0.0), (x + delta).clamp(max=1.0)


def _affine_interval(lo: torch.Tensor, hi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    mid = center @ weight.T + bias
    spread = radius @ weight.abs().T
    return mid - spread, mid + spread


def _prelu_interval(lo: torch.Tensor, hi: torch.Tensor, slope: torch.Tensor):
    """The image of [lo, hi] under PReLU, for any slope (monotone for slope >= 0, not otherwise)."""
    f = lambda z: torch.where(z >= 0, z, slope * z)  # noqa: E731
    a, b = f(lo), f(hi)
    low = torch.minimum(a, b)
    # With a negative slope the minimum over an interval containing 0 is at 0.
    low = torch.where((lo < 0) & (hi > 0), torch.minimum(low, torch.zeros_like(low)), low)
    return low, torch.maximum(a, b)


def _relaxation(lo: torch.Tensor, hi: torch.Tensor, slope: torch.Tensor):
    """Lines (alpha_l, beta_l), (alpha_u, beta_u) with alpha_l z + beta_l <= PReLU(z) <= alpha_u z + beta_u on [lo, hi]."""
    slope = slope.expand_as(lo)
    one = torch.ones_like(lo)
    active, inactive = lo >= 0, hi <= 0
    unstable = ~(active | inactive)
    width = torch.where(unstable, hi - lo, one)
    chord = (hi - slope * lo) / width  # slope of the chord through (lo, a lo) and (hi, hi)
    chord_b = slope * lo - chord * lo
    adaptive = torch.where(hi >= -lo, one, slope)  # CROWN's choice of the tangent-side slope
    convex = slope <= 1
    alpha_l = torch.where(unstable, torch.where(convex, adaptive, chord), torch.where(active, one, slope))
    beta_l = torch.where(unstable & ~convex, chord_b, torch.zeros_like(lo))
    alpha_u = torch.where(unstable, torch.where(convex, chord, adaptive), torch.where(active, one, slope))
    beta_u = torch.where(unstable & convex, chord_b, torch.zeros_like(lo))
    return alpha_l, beta_l, alpha_u, beta_u


def _back_substitute(spec: torch.Tensor, const: torch.Tensor, head: MeanHead, depth: int,
                     pre: list[tuple[torch.Tensor, torch.Tensor]], lo0: torch.Tensor, hi0: torch.Tensor
                     ) -> torch.Tensor:
    """Lower bound of spec @ h_depth + const over the box, h_depth the output of PReLU layer `depth`
    (depth 0: the input itself); spec (N, S, width), const (N, S). pre[k]: bounds of z_{k+1}."""
    for k in range(depth - 1, -1, -1):
        lo, hi = pre[k]
        alpha_l, beta_l, alpha_u, beta_u = _relaxation(lo, hi, head.slopes[k])
        positive, negative = spec.clamp(min=0), spec.clamp(max=0)
        const = const + (positive * beta_l.unsqueeze(1)).sum(-1) + (negative * beta_u.unsqueeze(1)).sum(-1)
        spec = positive * alpha_l.unsqueeze(1) + negative * alpha_u.unsqueeze(1)  # coefficients on z_{k+1}
        const = const + spec @ head.biases[k]
        spec = spec @ head.weights[k]  # coefficients on h_k
    center, radius = (hi0 + lo0) / 2, (hi0 - lo0) / 2
    return (spec @ center.unsqueeze(-1)).squeeze(-1) - (spec.abs() @ radius.unsqueeze(-1)).squeeze(-1) + const


def _bounds(head: MeanHead, lo0: torch.Tensor, hi0: torch.Tensor, crown: bool):
    """Pre-activation bounds [(l1, u1), (l2, u2)] by IBP, or by CROWN intersected with IBP."""
    l1, u1 = _affine_interval(lo0, hi0, head.weights[0], head.biases[0])  # exact for an affine map of a box
    pre = [(l1, u1)]
    h_lo, h_hi = _prelu_interval(l1, u1, head.slopes[0])
    l2, u2 = _affine_interval(h_lo, h_hi, head.weights[1], head.biases[1])
    if crown:
        n = lo0.shape[0]
        spec = head.weights[1].expand(n, *head.weights[1].shape)
        const = head.biases[1].expand(n, -1)
        l2 = torch.maximum(l2, _back_substitute(spec, const, head, 1, pre, lo0, hi0))
        u2 = torch.minimum(u2, -_back_substitute(-spec, -const, head, 1, pre, lo0, hi0))
    pre.append((l2, u2))
    return pre


def _margin_spec(head: MeanHead, probe: nn.Linear, y: torch.Tensor):
    """Margins logit_y - logit_j as (N, C, 250) coefficients on h_2 and (N, C) constants (0 at j = y)."""
    w = probe.weight.detach().to(head.weights[0].dtype)
    b = probe.bias.detach().to(head.weights[0].dtype)
    diff_w = w[y].unsqueeze(1) - w.unsqueeze(0)  # (N, C, d)
    diff_b = b[y].unsqueeze(1) - b.unsqueeze(0)  # (N, C)
    return diff_w @ head.weights[2], diff_w @ head.biases[2] + diff_b


Box = tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]


def box_bounds(head: MeanHead, x: torch.Tensor, delta: float, method: str = "crown") -> Box:
    """The input box around each x and the pre-activation bounds inside it, by IBP or CROWN (with IBP):
    the expensive part, which the margins and the latent shift share."""
    if method not in ("ibp", "crown"):
        raise ValueError(f"unknown bound {method!r}; choose ibp or crown")
    lo0, hi0 = input_box(x.to(head.weights[0].dtype), delta)
    return lo0, hi0, _bounds(head, lo0, hi0, crown=method == "crown")


def _linear_bounds(head: MeanHead, spec: torch.Tensor, const: torch.Tensor, box: Box,
                   crown: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of spec @ h_2 + const: intervals on h_2, tightened by CROWN when asked."""
    lo0, hi0, pre = box
    h_lo, h_hi = _prelu_interval(*pre[1], head.slopes[1])
    positive, negative = spec.clamp(min=0), spec.clamp(max=0)
    low = const + (positive @ h_lo.unsqueeze(-1) + negative @ h_hi.unsqueeze(-1)).squeeze(-1)
    high = const + (positive @ h_hi.unsqueeze(-1) + negative @ h_lo.unsqueeze(-1)).squeeze(-1)
    if crown:
        low = torch.maximum(low, _back_substitute(spec, const, head, 2, pre, lo0, hi0))
        high = torch.minimum(high, -_back_substitute(-spec, -const, head, 2, pre, lo0, hi0))
    return low, high


def margin_lower_bounds(head: MeanHead, probe: nn.Linear, x: torch.Tensor, y: torch.Tensor, delta: float,
                        method: str = "crown", box: Box | None = None) -> torch.Tensor:
    """(N, C) lower bounds of logit_y - logit_j over the box around each x (+inf at j = y).

    method: "ibp" or "crown" (max of CROWN and IBP, see the module docstring); box: `box_bounds`
    of the same images, delta and method, when already computed.
    """
    box = box or box_bounds(head, x, delta, method)
    spec, const = _margin_spec(head, probe, y)
    bound, _ = _linear_bounds(head, spec, const, box, crown=method == "crown")
    own = torch.nn.functional.one_hot(y, bound.shape[1]).bool()
    return bound.masked_fill(own, float("inf"))


def latent_shift_bound(head: MeanHead, x: torch.Tensor, delta: float, method: str = "crown",
                       box: Box | None = None) -> torch.Tensor:
    """Per image, an upper bound of ||mu(x') - mu(x)||^2 over the box around x (the certified
    counterpart of Table 1's distance)."""
    box = box or box_bounds(head, x, delta, method)
    mu = head.forward(x)
    n, d = mu.shape
    spec = head.weights[2].expand(n, d, -1)
    low, high = _linear_bounds(head, spec, head.biases[2].expand(n, -1) - mu, box, crown=method == "crown")
    return torch.maximum(low.pow(2), high.pow(2)).sum(-1)


def certify(classifier: ProbeOnMean, x: torch.Tensor, y: torch.Tensor, delta: float, *, method: str = "crown",
            batch_size: int = 250, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified per image, bound on ||mu(x') - mu(x)||^2 per image) at delta, in chunks of batch_size."""
    head = MeanHead.of(classifier.encoder, dtype)  # on the encoder's device, where x is
    certified, shift = [], []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            rows = slice(start, start + batch_size)
            box = box_bounds(head, x[rows], delta, method)
            bound = margin_lower_bounds(head, classifier.probe, x[rows], y[rows], delta, method, box)
            certified.append(bound.min(dim=1).values > _EPS)
            shift.append(latent_shift_bound(head, x[rows], delta, method, box))
    return torch.cat(certified), torch.cat(shift)
