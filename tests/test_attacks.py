"""PGD attacks on the encoder: the budget, their strength against random noise, the KL direction,
restarts, per-iterate correctness, and an independent plain PGD that the batched attack must match or beat."""

from __future__ import annotations

import pytest
import torch

from raven.config import TrainConfig
from raven.eval.attacks import attack, dissimilarity, encoder_dissimilarity, frozen, random_perturbation, survives
from raven.eval.probe import encode_mean, train_linear_probe
from raven.gaussians import diag_gaussian_kl, diag_gaussian_log_prob, diag_gaussian_w2_squared
from raven.pgd import pgd_linf
from raven.train import train


@pytest.fixture(scope="module")
def vae(mnist_small):
    return train(TrainConfig(method="vae", epochs=2, limit=2000), splits=mnist_small, device="cpu").model


@pytest.fixture(scope="module")
def probe(vae, mnist_small):
    layer, _ = train_linear_probe(encode_mean(vae, mnist_small.train_x), mnist_small.train_y)
    return layer


@pytest.fixture(scope="module")
def images(mnist_small):
    return mnist_small.test_x[:200], mnist_small.test_y[:200]


@pytest.mark.parametrize("kind", ["kl", "w2", "ce", "rkl", "mean"])
def test_perturbations_stay_in_the_ball_and_the_pixel_range(kind, vae, probe, images):
    x, y = images
    delta = 0.1
    grads_before = [None if p.grad is None else p.grad.clone() for p in vae.parameters()]
    out = attack(vae, x, delta, kind, steps=10, restarts=2, batch_size=64, probe=probe, y=y,
                 generator=torch.Generator().manual_seed(0))
    assert out.x_adv.shape == x.shape and not out.x_adv.requires_grad
    assert (out.x_adv - x).abs().max() <= delta + 1e-6
    assert out.x_adv.min() >= 0.0 and out.x_adv.max() <= 1.0
    assert (out.x_adv != x).any()
    assert out.correct.dtype == torch.bool and out.correct.shape == (len(x),)
    # The model and probe leave the attack as they came: trainable, gradients untouched.
    for p, before in zip(vae.parameters(), grads_before):
        assert p.requires_grad and (p.grad is None if before is None else torch.equal(p.grad, before))
    assert all(p.requires_grad and p.grad is None for p in probe.parameters())


def test_delta_zero_is_the_clean_image(vae, probe, images):
    x, y = images
    out = attack(vae, x, 0.0, "kl", probe=probe, y=y)
    assert torch.equal(out.x_adv, x)
    assert torch.all(out.dissimilarity.abs() < 1e-6)
    clean = probe(encode_mean(vae, x)).argmax(dim=1) == y
    assert torch.equal(out.correct, clean)


@pytest.mark.parametrize("kind", ["kl", "w2"])
def test_attack_beats_random_noise_of_the_same_budget(kind, vae, images):
    x, _ = images
    delta = 0.1
    generator = torch.Generator().manual_seed(1)
    adversarial = attack(vae, x, delta, kind, generator=generator).dissimilarity
    uniform = encoder_dissimilarity(vae, x, random_perturbation(x, delta, "uniform", generator), kind)
    signs = encoder_dissimilarity(vae, x, random_perturbation(x, delta, "sign", generator), kind)
    if kind == "w2":  # compare W2^2, which like KL grows quadratically with a small displacement
        adversarial, uniform, signs = adversarial.pow(2), uniform.pow(2), signs.pow(2)
    assert adversarial.mean() > 5 * uniform.mean()
    assert adversarial.mean() > 5 * signs.mean()
    assert (adversarial > signs).float().mean() > 0.95


def test_kl_is_clean_posterior_first_and_w2_is_the_distance():
    """KL[q(.|x) || q(.|x+e)] = E_{z ~ q(.|x)} log q(z|x) - log q(z|x+e), checked by Monte Carlo."""
    generator = torch.Generator().manual_seed(0)
    mu, mu_adv = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    logvar, logvar_adv = torch.randn(3, 4, generator=generator) - 1.0, torch.randn(3, 4, generator=generator)
    z = mu + (0.5 * logvar).exp() * torch.randn(400_000, 3, 4, generator=generator)
    monte_carlo = (diag_gaussian_log_prob(z, mu, logvar) - diag_gaussian_log_prob(z, mu_adv, logvar_adv)).mean(0)
    kl = dissimilarity("kl", mu, logvar, mu_adv, logvar_adv)
    assert kl.dtype == torch.float64  # computed in double: posteriors with tiny variances give huge KLs
    torch.testing.assert_close(kl.float(), monte_carlo, rtol=0.02, atol=0.02)
    reverse = diag_gaussian_kl(mu_adv, logvar_adv, mu, logvar)
    assert (reverse - kl).abs().max() > 0.5  # the direction matters for these posteriors
    w2 = dissimilarity("w2", mu, logvar, mu_adv, logvar_adv)
    torch.testing.assert_close(w2.pow(2).float(), diag_gaussian_w2_squared(mu, logvar, mu_adv, logvar_adv))


def _plain_pgd_kl(model, x, delta, steps=50, seed=0):
    """An independent 50-step PGD written plainly: one image at a time, no helpers from raven.pgd."""
    generator = torch.Generator().manual_seed(seed)
    step = delta / 25
    results = []
    for i in range(len(x)):
        x0 = x[i:i + 1]
        with torch.no_grad():
            mu, logvar = model.encoder(x0)
        x_adv = (x0 + delta * (2 * torch.rand(x0.shape, generator=generator) - 1)).clamp(0, 1)
        best = -1.0
        for _ in range(steps + 1):
            x_adv = x_adv.detach().requires_grad_(True)
            mu_a, logvar_a = model.encoder(x_adv)
            value = diag_gaussian_kl(mu, logvar, mu_a, logvar_a).sum()
            best = max(best, value.item())
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = x_adv.detach() + step * grad.sign()
            x_adv = torch.max(torch.min(x_adv, x0 + delta), x0 - delta).clamp(0, 1)
        results.append(best)
    return torch.tensor(results)


def test_batched_attack_reaches_what_a_plain_pgd_reaches(vae, images):
    x = images[0][:12]
    delta = 0.1
    reference = _plain_pgd_kl(vae, x, delta)
    ours = attack(vae, x, delta, "kl", generator=torch.Generator().manual_seed(5)).dissimilarity
    # Same images, independent random starts: the batched attack must not be weaker. (On these
    # models both runs end at nearly the same corner of the ball, so the tolerance is tight.)
    assert ours.mean() >= 0.98 * reference.mean(), (ours, reference)
    assert torch.all(ours >= 0.95 * reference), (ours, reference)


def test_restarts_only_make_the_attack_stronger(vae, probe, images):
    x, y = images
    one = attack(vae, x, 0.05, "w2", steps=20, restarts=1, probe=probe, y=y, generator=torch.Generator().manual_seed(3))
    three = attack(vae, x, 0.05, "w2", steps=20, restarts=3, probe=probe, y=y,
                   generator=torch.Generator().manual_seed(3))
    # The first restart replays the single run (same stream), so the worst case can only grow.
    assert torch.all(three.dissimilarity >= one.dissimilarity - 1e-6)
    assert torch.all(one.correct | ~three.correct)  # robust after 3 restarts => robust after 1
    assert three.correct.sum() <= one.correct.sum()


def test_ce_attack_breaks_the_probe_at_least_as_well_as_noise(vae, probe, images):
    x, y = images
    clean = (probe(encode_mean(vae, x)).argmax(1) == y).float().mean()
    ce = attack(vae, x, 0.1, "ce", probe=probe, y=y, generator=torch.Generator().manual_seed(0))
    assert ce.correct.float().mean() < clean - 0.1
    with pytest.raises(ValueError, match="needs the linear probe"):
        attack(vae, x, 0.1, "ce")


def test_frozen_restores_flags_and_mode(vae):
    vae.train()
    with frozen(vae):
        assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert all(p.requires_grad for p in vae.parameters()) and vae.training
    vae.eval()


def test_reverse_kl_and_mean_attacks_measure_what_they_say():
    generator = torch.Generator().manual_seed(2)
    mu, mu_adv = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    logvar, logvar_adv = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    z = mu_adv + (0.5 * logvar_adv).exp() * torch.randn(400_000, 5, 4, generator=generator)
    monte_carlo = (diag_gaussian_log_prob(z, mu_adv, logvar_adv) - diag_gaussian_log_prob(z, mu, logvar)).mean(0)
    torch.testing.assert_close(dissimilarity("rkl", mu, logvar, mu_adv, logvar_adv).float(), monte_carlo,
                               rtol=0.03, atol=0.03)
    torch.testing.assert_close(dissimilarity("mean", mu, logvar, mu_adv, logvar_adv),
                               ((mu - mu_adv) ** 2).sum(1).double())


def test_pgd_reports_every_iterate_to_the_callback():
    x = torch.rand(6, 10, generator=torch.Generator().manual_seed(0))
    seen = []
    target = torch.randn(10, generator=torch.Generator().manual_seed(1))
    best = pgd_linf(lambda v: -(v - target).pow(2).sum(1), x, 0.1, steps=7, step_size=0.02,
                    generator=torch.Generator().manual_seed(2), on_iterate=lambda v: seen.append(v.clone()))
    assert len(seen) == 8  # the start and the point after each of the 7 steps
    for point in seen:
        assert (point - x).abs().max() <= 0.1 + 1e-6 and point.min() >= 0 and point.max() <= 1
    assert not torch.equal(seen[0], seen[-1])
    # the kept iterate is one of those the callback saw
    assert all(any(torch.equal(best[i], point[i]) for point in seen) for i in range(len(x)))


def _plain_per_iterate_kl(model, probe, x, y, delta, steps, seed):
    """An independent PGD on the KL, one restart, the whole batch every step: is the probe right at every iterate?"""
    with torch.no_grad():
        right = probe(encode_mean(model, x)).argmax(1) == y
    x, y = x[right], y[right]
    generator = torch.Generator().manual_seed(seed)
    low, high = (x - delta).clamp(min=0), (x + delta).clamp(max=1)
    x_adv = low + torch.rand(x.shape, generator=generator) * (high - low)
    with torch.no_grad():
        mu, logvar = model.encoder(x)
    ever_wrong = torch.zeros(len(x), dtype=torch.bool)
    for step in range(steps + 1):
        with torch.no_grad():
            ever_wrong |= probe(model.encoder(x_adv)[0]).argmax(1) != y
        if step == steps:
            break
        x_adv = x_adv.detach().requires_grad_(True)
        value = diag_gaussian_kl(mu, logvar, *model.encoder(x_adv)).sum()
        (grad,) = torch.autograd.grad(value, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + delta / 25 * grad.sign(), low), high)
    survived = right.clone()
    survived[right] = ~ever_wrong
    return survived


def test_survives_judges_every_iterate_like_an_independent_loop(vae, probe, images):
    x, y = images
    reference = _plain_per_iterate_kl(vae, probe, x, y, 0.1, steps=30, seed=4)
    # The same random start (one chunk, one restart): the same paths, cut into segments that drop fooled rows.
    ours = survives(vae, probe, x, y, 0.1, "kl", steps=30, restarts=1, batch_size=1000,
                    generator=torch.Generator().manual_seed(4))
    assert (ours == reference).float().mean() >= 0.98  # float rounding may flip a sign on a smaller batch
    kept = attack(vae, x, 0.1, "kl", steps=30, probe=probe, y=y, generator=torch.Generator().manual_seed(4))
    assert ours.sum() < kept.correct.sum()  # the KL's kept iterate hides misclassified ones
    more = survives(vae, probe, x, y, 0.1, "kl", steps=30, restarts=3, generator=torch.Generator().manual_seed(4))
    assert torch.all(ours | ~more)  # later restarts run on the survivors only: they can only remove
    with pytest.raises(ValueError, match="needs the linear probe"):
        survives(vae, None, x, y, 0.1, "kl", steps=3)
