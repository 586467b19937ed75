"""Certified bounds (raven.eval.certify): sound against an exact mixed-integer program, never looser
than IBP, sound against sampled points and the strong attacks on a trained model, exact at delta = 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from raven.config import TrainConfig
from raven.eval.autoattack import ProbeOnMean, autoattack
from raven.eval.certify import MeanHead, certify, input_box, latent_shift_bound, margin_lower_bounds
from raven.eval.probe import encode_mean, train_linear_probe
from raven.train import train


class TinyEncoder(nn.Module):
    """The encoder's shape (affine, PReLU, affine, PReLU, affine to 2d) at a few units per layer."""

    def __init__(self, sizes: tuple[int, int, int, int], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        n0, n1, n2, d = sizes
        self.body = nn.Sequential(nn.Linear(n0, n1), nn.PReLU(n1), nn.Linear(n1, n2), nn.PReLU(n2),
                                  nn.Linear(n2, 2 * d))
        with torch.no_grad():  # slopes of every kind: negative, in [0, 1], above 1
            self.body[1].weight.uniform_(-0.5, 1.5)
            self.body[3].weight.uniform_(-0.5, 1.5)


def exact_min_margins(head: MeanHead, probe: nn.Linear, x: np.ndarray, label: int, delta: float) -> np.ndarray:
    """min over the box of logit_label - logit_j for every j, by a MILP (PReLU as two signed parts
    p - q with a binary choosing the side, big-M from interval bounds), solved by HiGHS."""
    w = [t.numpy() for t in head.weights]
    b = [t.numpy() for t in head.biases]
    a = [t.numpy() for t in head.slopes]
    lo0, hi0 = np.clip(x - delta, 0, 1), np.clip(x + delta, 0, 1)
    # Interval bounds of each pre-activation (sound, for big-M).
    z_bounds, lo, hi = [], lo0, hi0
    for k in range(2):
        c, r = (hi + lo) / 2, (hi - lo) / 2
        zl, zu = w[k] @ c + b[k] - np.abs(w[k]) @ r, w[k] @ c + b[k] + np.abs(w[k]) @ r
        z_bounds.append((zl, zu))
        f = lambda z, s=a[k]: np.where(z >= 0, z, s * z)  # noqa: E731
        lo = np.where((zl < 0) & (zu > 0), np.minimum(np.minimum(f(zl), f(zu)), 0), np.minimum(f(zl), f(zu)))
        hi = np.maximum(f(zl), f(zu))
    n0, n1, n2 = len(x), len(b[0]), len(b[1])
    # variables: x | p1 q1 s1 | p2 q2 s2
    off = [0, n0, n0 + 3 * n1, n0 + 3 * n1 + 3 * n2]
    nv = off[3]
    lower, upper = np.zeros(nv), np.full(nv, np.inf)
    lower[:n0], upper[:n0] = lo0, hi0
    integrality = np.zeros(nv)
    rows, lows, highs = [], [], []
    for k, n in ((0, n1), (1, n2)):
        base = off[k + 1]
        p, q, s = base, base + n, base + 2 * n
        integrality[s:s + n] = 1
        upper[s:s + n] = 1
        zl, zu = z_bounds[k]
        for i in range(n):
            # p_i - q_i - (W h_prev)_i = b_i
            row = np.zeros(nv)
            row[p + i], row[q + i] = 1, -1
            if k == 0:
                row[:n0] -= w[0][i]
            else:
                pp, qq = off[1], off[1] + n1
                row[pp:pp + n1] -= w[1][i]
                row[qq:qq + n1] += w[1][i] * a[0]
            rows.append(row), lows.append(b[k][i]), highs.append(b[k][i])
            row = np.zeros(nv)  # p_i <= max(zu, 0) s_i
            row[p + i], row[s + i] = 1, -max(zu[i], 0.0)
            rows.append(row), lows.append(-np.inf), highs.append(0.0)
            row = np.zeros(nv)  # q_i <= max(-zl, 0) (1 - s_i)
            row[q + i], row[s + i] = 1, max(-zl[i], 0.0)
            rows.append(row), lows.append(-np.inf), highs.append(max(-zl[i], 0.0))
    constraint = LinearConstraint(np.array(rows), lows, highs)
    w_probe, b_probe = probe.weight.detach().double().numpy(), probe.bias.detach().double().numpy()
    out = []
    for j in range(len(b_probe)):
        if j == label:
            out.append(np.inf)
            continue
        spec = (w_probe[label] - w_probe[j]) @ w[2]  # on h2
        const = (w_probe[label] - w_probe[j]) @ b[2] + b_probe[label] - b_probe[j]
        cost = np.zeros(nv)
        p2, q2 = off[2], off[2] + n2
        cost[p2:p2 + n2] = spec
        cost[q2:q2 + n2] = -spec * a[1]
        result = milp(cost, constraints=constraint, integrality=integrality, bounds=Bounds(lower, upper),
                      options={"mip_rel_gap": 0.0})
        assert result.success, result.message
        out.append(result.fun + const)
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bounds_are_sound_against_the_exact_milp_and_crown_is_never_looser_than_ibp(seed):
    encoder = TinyEncoder((5, 7, 6, 3), seed)
    probe = nn.Linear(3, 4).double()
    head = MeanHead.of(encoder)
    x = torch.rand(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = probe(head.forward(x)).argmax(1)
    for delta in (0.02, 0.1, 0.3):
        crown = margin_lower_bounds(head, probe, x, y, delta, "crown").numpy()
        ibp = margin_lower_bounds(head, probe, x, y, delta, "ibp").numpy()
        exact = np.stack([exact_min_margins(head, probe, x[i].numpy(), int(y[i]), delta) for i in range(len(x))])
        finite = np.isfinite(exact)
        assert np.all(crown[finite] <= exact[finite] + 1e-7), (delta, (crown - exact)[finite].max())
        assert np.all(crown[finite] >= ibp[finite] - 1e-12)
        # CROWN does tighten: on these encoders it beats IBP somewhere at every delta.
        assert np.any(crown[finite] > ibp[finite] + 1e-6)


def test_the_latent_shift_bound_holds_on_sampled_points():
    encoder = TinyEncoder((5, 7, 6, 3), 4)
    head = MeanHead.of(encoder)
    x = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    bound = latent_shift_bound(head, x, 0.1)
    lo, hi = input_box(x, 0.1)
    points = lo + (hi - lo) * torch.rand(2000, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    shift = (head.forward(points.reshape(-1, 5)).reshape(2000, 4, -1) - head.forward(x)).pow(2).sum(-1)
    assert torch.all(shift.max(0).values <= bound + 1e-9)


@pytest.fixture(scope="module")
def trained(mnist_small):
    model = train(TrainConfig(method="raven", epochs=2, limit=2000, sigma_aug=0.2), splits=mnist_small,
                  device="cpu").model.eval()
    probe, _ = train_linear_probe(encode_mean(model, mnist_small.train_x), mnist_small.train_y)
    return ProbeOnMean(model.encoder, probe), mnist_small.test_x[:100], mnist_small.test_y[:100]


def test_at_delta_zero_certified_is_clean_accuracy(trained):
    classifier, x, y = trained
    certified, shift = certify(classifier, x, y, 0.0)
    with torch.no_grad():
        clean = classifier(x).argmax(1) == y
    assert torch.equal(certified, clean)
    assert float(shift.max()) < 1e-12


def test_no_certified_image_is_broken_by_the_strong_attacks_or_by_sampled_points(trained):
    classifier, x, y = trained
    for delta in (0.005, 0.02):
        certified, _ = certify(classifier, x, y, delta)
        alive, _ = autoattack(classifier, x, y, delta, steps=10, square_queries=100, batch_size=100)
        assert not torch.any(certified & ~alive), delta
        assert float(certified.double().mean()) <= float(alive.double().mean())
        lo, hi = input_box(x, delta)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _ in range(20):
                point = lo + (hi - lo) * torch.rand(x.shape, generator=g)
                assert not torch.any(certified & (classifier(point).argmax(1) != y))
    # A small radius certifies a real part of the images (the bound says something).
    assert float(certify(classifier, x, y, 0.005)[0].double().mean()) > 0.2
