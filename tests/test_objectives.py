"""Closed forms against exact Gaussian algebra and Monte Carlo estimates."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from raven.gaussians import (
    diag_gaussian_entropic_w2,
    diag_gaussian_kl,
    diag_gaussian_w2_squared,
    entropic_coupling_correlation,
    standard_normal_kl,
)
from raven.objectives import (
    mixture_component_log_prob,
    raven_gmm_kl,
    raven_kl,
    smooth_encoder_kl,
    smooth_encoder_loss,
)

DT = torch.float64


def _posteriors(batch: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(batch, d, generator=g, dtype=DT)
    logvar = 0.6 * torch.randn(batch, d, generator=g, dtype=DT) - 0.5
    mu_pair = mu + 0.3 * torch.randn(batch, d, generator=g, dtype=DT)
    logvar_pair = 0.6 * torch.randn(batch, d, generator=g, dtype=DT) - 0.5
    return mu, logvar, mu_pair, logvar_pair


def _joint_posterior(mu, logvar, mu_pair, logvar_pair) -> MultivariateNormal:
    return MultivariateNormal(torch.cat([mu, mu_pair], -1), torch.diag_embed(torch.cat([logvar, logvar_pair], -1).exp()))


def _paired_prior_joint(mean: torch.Tensor, cov: torch.Tensor, var_aug: torch.Tensor) -> MultivariateNormal:
    """p(z, z') of Definition 1 written directly as a 2d-dim Gaussian: z = z~ + a, z' = z~ + a'."""
    aug = torch.diag(var_aug)
    joint_cov = torch.cat([torch.cat([cov + aug, cov], 1), torch.cat([cov, cov + aug], 1)], 0)
    return MultivariateNormal(torch.cat([mean, mean]), joint_cov)


@pytest.mark.parametrize("sigma_aug", [0.01, 0.3, 1.0, "per-dimension"])
def test_raven_kl_matches_exact_gaussian_kl(sigma_aug):
    d = 5
    mu, logvar, mu_pair, logvar_pair = _posteriors(64, d, seed=1)
    sigma = torch.linspace(0.05, 1.5, d, dtype=DT) if sigma_aug == "per-dimension" else torch.full((d,), sigma_aug, dtype=DT)
    prior = _paired_prior_joint(torch.zeros(d, dtype=DT), torch.eye(d, dtype=DT), sigma.pow(2))
    exact = kl_divergence(_joint_posterior(mu, logvar, mu_pair, logvar_pair), prior)
    closed = raven_kl(mu, logvar, mu_pair, logvar_pair, sigma if sigma_aug == "per-dimension" else sigma_aug)
    assert closed.shape == (64,)
    torch.testing.assert_close(closed, exact, rtol=1e-10, atol=1e-8)


def test_raven_kl_matches_monte_carlo():
    d, n = 4, 400_000
    mu, logvar, mu_pair, logvar_pair = _posteriors(3, d, seed=2)
    sigma = 0.5
    q = _joint_posterior(mu, logvar, mu_pair, logvar_pair)
    prior = _paired_prior_joint(torch.zeros(d, dtype=DT), torch.eye(d, dtype=DT), torch.full((d,), sigma**2, dtype=DT))
    samples = q.sample((n,))
    log_ratio = q.log_prob(samples) - prior.log_prob(samples)
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    closed = raven_kl(mu, logvar, mu_pair, logvar_pair, sigma)
    assert torch.all((closed - estimate).abs() < 4 * stderr + 1e-3), (closed, estimate, stderr)
    # The constant printed in Eq. (7), 2d(1 - log 2) instead of 2d, would be off by d log 2 nats.
    assert torch.all((closed - 0.5 * 2 * d * math.log(2) - estimate).abs() > 20 * stderr)


def test_remark1_reduces_to_standard_vae_kl():
    """mu' = 0, Sigma' = I, Sigma_aug = (sqrt5 - 1)/2 I: the KL equals the VAE's up to a constant."""
    d = 10
    mu, logvar, _, _ = _posteriors(256, d, seed=3)
    sigma = math.sqrt((math.sqrt(5.0) - 1.0) / 2.0)
    gap = raven_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar), sigma) - standard_normal_kl(mu, logvar)
    assert gap.std() < 1e-10
    # Any other Sigma_aug leaves a gap that depends on the input.
    other = raven_kl(mu, logvar, torch.zeros_like(mu), torch.zeros_like(logvar), 0.5) - standard_normal_kl(mu, logvar)
    assert other.std() > 1e-2


def test_standard_and_diagonal_kl_match_torch_distributions():
    mu, logvar, mu_p, logvar_p = _posteriors(32, 6, seed=4)
    q = Normal(mu, (0.5 * logvar).exp())
    p = Normal(mu_p, (0.5 * logvar_p).exp())
    torch.testing.assert_close(diag_gaussian_kl(mu, logvar, mu_p, logvar_p), kl_divergence(q, p).sum(-1))
    std = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(standard_normal_kl(mu, logvar), kl_divergence(q, std).sum(-1))


def test_w2_matches_quantile_coupling():
    """In 1-D the optimal coupling pairs quantiles: W2^2 = E[(F_a^-1(U) - F_b^-1(U))^2]."""
    mu, logvar, mu_b, logvar_b = _posteriors(8, 3, seed=5)
    u = torch.linspace(0.5 / 200_000, 1 - 0.5 / 200_000, 200_000, dtype=DT)
    quant_a = Normal(mu.unsqueeze(-1), (0.5 * logvar).exp().unsqueeze(-1)).icdf(u)
    quant_b = Normal(mu_b.unsqueeze(-1), (0.5 * logvar_b).exp().unsqueeze(-1)).icdf(u)
    brute = (quant_a - quant_b).pow(2).mean(-1).sum(-1)
    torch.testing.assert_close(diag_gaussian_w2_squared(mu, logvar, mu_b, logvar_b), brute, rtol=2e-3, atol=1e-4)


def _mixture(d: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, generator=g, dtype=DT)
    means = 2.0 * torch.randn(c, d, generator=g, dtype=DT)
    logvars = 0.5 * torch.randn(c, d, generator=g, dtype=DT) - 0.5
    return logits, means, logvars


def _mixture_joint_log_prob(zz: torch.Tensor, logits, means, logvars, var_aug) -> torch.Tensor:
    """log p(z, z') under Definition 1 with a mixture p(z~), from 2d-dim Gaussians per component."""
    parts = [
        torch.log_softmax(logits, 0)[k] + _paired_prior_joint(means[k], torch.diag(logvars[k].exp()), var_aug).log_prob(zz)
        for k in range(len(logits))
    ]
    return torch.logsumexp(torch.stack(parts, -1), -1)


def test_mixture_prior_eq15_matches_integral_over_z_tilde():
    """Eq. (15) against a Monte Carlo integral of a(z|z~) a(z'|z~) over z~ ~ p_psi."""
    d, c, sigma = 3, 4, 0.7
    logits, means, logvars = _mixture(d, c, seed=6)
    var_aug = torch.full((d,), sigma**2, dtype=DT)
    g = torch.Generator().manual_seed(7)
    z, z_pair = torch.randn(5, d, generator=g, dtype=DT), torch.randn(5, d, generator=g, dtype=DT)
    eq15 = (Normal(0.0, (2 * var_aug).sqrt()).log_prob(z - z_pair).sum(-1)
            + torch.logsumexp(mixture_component_log_prob(0.5 * (z + z_pair), logits, means, logvars, 0.5 * var_aug), -1))
    n = 400_000
    component = torch.multinomial(torch.softmax(logits, 0), n, replacement=True, generator=g)
    z_tilde = means[component] + (0.5 * logvars[component]).exp() * torch.randn(n, d, generator=g, dtype=DT)
    a = Normal(z_tilde.unsqueeze(1), sigma)
    log_integrand = a.log_prob(z.unsqueeze(0)).sum(-1) + a.log_prob(z_pair.unsqueeze(0)).sum(-1)
    integral = torch.logsumexp(log_integrand, 0) - math.log(n)
    torch.testing.assert_close(eq15, integral, rtol=0, atol=0.05)  # 5% relative MC error
    torch.testing.assert_close(eq15, _mixture_joint_log_prob(torch.cat([z, z_pair], -1), logits, means, logvars, var_aug))


def test_raven_gmm_kl_estimator_is_unbiased():
    """Theorem 2: closed-form parts + one-sample mixture term, averaged, equals E_q[log q - log p]."""
    d, c, sigma, n = 3, 4, 0.4, 200_000
    logits, means, logvars = _mixture(d, c, seed=8)
    mu, logvar, mu_pair, logvar_pair = _posteriors(2, d, seed=9)
    var_aug = torch.full((d,), sigma**2, dtype=DT)
    q = _joint_posterior(mu, logvar, mu_pair, logvar_pair)
    samples = q.sample((n,))                                   # (n, 2, 2d)
    z, z_pair = samples[..., :d], samples[..., d:]
    rep = lambda t: t.expand(n, *t.shape)                       # noqa: E731
    estimator = raven_gmm_kl(rep(mu).reshape(-1, d), rep(logvar).reshape(-1, d), rep(mu_pair).reshape(-1, d),
                             rep(logvar_pair).reshape(-1, d), z.reshape(-1, d), z_pair.reshape(-1, d),
                             logits, means, logvars, sigma).reshape(n, 2)
    reference = q.log_prob(samples) - _mixture_joint_log_prob(samples, logits, means, logvars, var_aug)
    for values in (estimator, reference):
        assert torch.isfinite(values).all()
    diff = estimator.mean(0) - reference.mean(0)
    stderr = (estimator.std(0) + reference.std(0)) / math.sqrt(n)
    assert torch.all(diff.abs() < 4 * stderr + 1e-3), (diff, stderr)
    assert torch.all(estimator.mean(0) > 0)


# ----------------------------------------------------------------------------- Smooth Encoder

# (mu_a, sigma_a, mu_b, sigma_b, gamma): k = gamma sigma_a sigma_b from 0.09 to 5.
SE_CASES = [(0.3, 0.7, -0.2, 0.45, 4.0), (0.0, 1.0, 0.5, 1.3, 0.07), (1.0, 0.5, 0.8, 0.5, 20.0)]


def _one_dim(mu_a, sigma_a, mu_b, sigma_b):
    t = lambda v: torch.tensor([[v]], dtype=DT)  # noqa: E731
    return t(mu_a), t(math.log(sigma_a**2)), t(mu_b), t(math.log(sigma_b**2))


def _gaussian_coupling_objective(r, mu_a, sigma_a, mu_b, sigma_b, gamma):
    """(gamma/2) E||z_a - z_b||^2 + I(z_a; z_b) for the Gaussian coupling with correlation r."""
    cost = (mu_a - mu_b) ** 2 + sigma_a**2 + sigma_b**2 - 2 * r * sigma_a * sigma_b
    return 0.5 * gamma * cost - 0.5 * torch.log1p(-r * r)


@pytest.mark.parametrize("case", SE_CASES)
def test_entropic_w2_is_the_minimum_over_gaussian_couplings(case):
    r = torch.linspace(-1 + 1e-7, 1 - 1e-7, 2_000_001, dtype=DT)
    values = _gaussian_coupling_objective(r, *case)
    closed = diag_gaussian_entropic_w2(*_one_dim(*case[:4]), case[4])
    torch.testing.assert_close(closed, values.min().reshape(1), rtol=1e-9, atol=1e-10)
    r_star = entropic_coupling_correlation(torch.tensor(case[1], dtype=DT), torch.tensor(case[3], dtype=DT), case[4])
    assert abs(float(r_star) - float(r[values.argmin()])) < 1e-5


def _sinkhorn_entropic_ot(mu_a, sigma_a, mu_b, sigma_b, gamma, n=400, iterations=5000):
    """min_P <P, C> + KL(P || a b^T) over couplings of the discretised marginals, log-domain Sinkhorn."""
    xa = torch.linspace(mu_a - 7 * sigma_a, mu_a + 7 * sigma_a, n, dtype=DT)
    xb = torch.linspace(mu_b - 7 * sigma_b, mu_b + 7 * sigma_b, n, dtype=DT)
    log_a = torch.log_softmax(Normal(mu_a, sigma_a).log_prob(xa), 0)
    log_b = torch.log_softmax(Normal(mu_b, sigma_b).log_prob(xb), 0)
    cost = 0.5 * gamma * (xa[:, None] - xb[None, :]) ** 2
    f, g = torch.zeros(n, dtype=DT), torch.zeros(n, dtype=DT)
    for _ in range(iterations):
        f = -torch.logsumexp(log_b[None, :] + g[None, :] - cost, 1)
        g = -torch.logsumexp(log_a[:, None] + f[:, None] - cost, 0)
        log_plan = log_a[:, None] + log_b[None, :] + f[:, None] + g[None, :] - cost
        if (torch.logsumexp(log_plan, 1).exp() - log_a.exp()).abs().sum() < 1e-10:
            break
    else:
        raise AssertionError("Sinkhorn did not converge")
    plan = log_plan.exp()
    return float((plan * (cost + log_plan - log_a[:, None] - log_b[None, :])).sum())


@pytest.mark.parametrize("case", SE_CASES)
def test_entropic_w2_matches_discrete_optimal_transport_over_all_couplings(case):
    """Sinkhorn searches every coupling, not only Gaussian ones: the closed form is the optimum."""
    closed = float(diag_gaussian_entropic_w2(*_one_dim(*case[:4]), case[4]))
    assert closed == pytest.approx(_sinkhorn_entropic_ot(*case), rel=2e-4, abs=1e-6)


def test_entropic_w2_matches_monte_carlo_of_its_coupling():
    """E_pi[(gamma/2)(z_a - z_b)^2 + log pi/(q_a q_b)] under the optimal Gaussian coupling, sampled."""
    n = 400_000
    g = torch.Generator().manual_seed(11)
    u, v = torch.randn(n, generator=g, dtype=DT), torch.randn(n, generator=g, dtype=DT)
    for mu_a, sigma_a, mu_b, sigma_b, gamma in SE_CASES:
        closed = float(diag_gaussian_entropic_w2(*_one_dim(mu_a, sigma_a, mu_b, sigma_b), gamma))
        r_star = float(entropic_coupling_correlation(torch.tensor(sigma_a, dtype=DT), torch.tensor(sigma_b, dtype=DT),
                                                     gamma))
        for r, should_match in ((r_star, True), (0.0, False), (-r_star, False)):
            za = mu_a + sigma_a * u
            zb = mu_b + sigma_b * (r * u + math.sqrt(1 - r * r) * v)
            joint = MultivariateNormal(torch.tensor([mu_a, mu_b], dtype=DT), torch.tensor(
                [[sigma_a**2, r * sigma_a * sigma_b], [r * sigma_a * sigma_b, sigma_b**2]], dtype=DT))
            log_ratio = (joint.log_prob(torch.stack([za, zb], -1)) - Normal(mu_a, sigma_a).log_prob(za)
                         - Normal(mu_b, sigma_b).log_prob(zb))
            values = 0.5 * gamma * (za - zb) ** 2 + log_ratio
            estimate, stderr = float(values.mean()), float(values.std()) / math.sqrt(n)
            if should_match:
                assert abs(estimate - closed) < 4 * stderr, (estimate, closed, stderr)
            else:  # a worse coupling costs measurably more: the estimate can tell them apart
                assert estimate - closed > 4 * stderr, (r, estimate, closed, stderr)


def test_entropic_w2_limits():
    mu, logvar, mu_b, logvar_b = _posteriors(16, 4, seed=12)
    independent = 0.5 * 1e-9 * ((mu - mu_b).pow(2) + logvar.exp() + logvar_b.exp()).sum(-1)
    torch.testing.assert_close(diag_gaussian_entropic_w2(mu, logvar, mu_b, logvar_b, 1e-9), independent,
                               rtol=1e-6, atol=1e-15)
    gamma = 1e6  # k = gamma sigma_a sigma_b >> 1: (gamma/2) W2^2 + 1/2 log k + 1/2 per dimension
    sigma_product = (0.5 * (logvar + logvar_b)).exp()
    asymptote = (0.5 * gamma * diag_gaussian_w2_squared(mu, logvar, mu_b, logvar_b)
                 + (0.5 * torch.log(gamma * sigma_product) + 0.5).sum(-1))
    torch.testing.assert_close(diag_gaussian_entropic_w2(mu, logvar, mu_b, logvar_b, gamma), asymptote,
                               rtol=1e-9, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5, 30.0, 2500.0])
def test_smooth_encoder_kl_is_the_exact_kl_to_the_coupled_prior(eta):
    """Optimal coupling pi* as a 2d-dim Gaussian; p_eta with precision [[(1+eta) I, -eta I], [-eta I, (1+eta) I]]."""
    d = 4
    mu, logvar, mu_b, logvar_b = _posteriors(8, d, seed=13)
    sigma, sigma_b = (0.5 * logvar).exp(), (0.5 * logvar_b).exp()
    r = entropic_coupling_correlation(sigma, sigma_b, eta)
    cross = torch.diag_embed(r * sigma * sigma_b)
    cov = torch.cat([torch.cat([torch.diag_embed(sigma**2), cross], -1),
                     torch.cat([cross, torch.diag_embed(sigma_b**2)], -1)], -2)
    coupling = MultivariateNormal(torch.cat([mu, mu_b], -1), cov)
    eye = torch.eye(d, dtype=DT)
    precision = torch.cat([torch.cat([(1 + eta) * eye, -eta * eye], 1), torch.cat([-eta * eye, (1 + eta) * eye], 1)], 0)
    prior = MultivariateNormal(torch.zeros(2 * d, dtype=DT), precision_matrix=precision)
    exact = kl_divergence(coupling, prior)
    torch.testing.assert_close(smooth_encoder_kl(mu, logvar, mu_b, logvar_b, eta), exact, rtol=1e-9, atol=1e-8)
    assert torch.all(exact >= 0)


def test_entropic_w2_gradients_are_exact_and_smooth_encoder_gradients_reach_both_posteriors():
    mu, logvar, mu_b, logvar_b = (t[:3].clone().requires_grad_(True) for t in _posteriors(3, 2, seed=14))
    for gamma in (1e-3, 3.0, 1e4):
        assert torch.autograd.gradcheck(lambda *t: diag_gaussian_entropic_w2(*t, gamma), (mu, logvar, mu_b, logvar_b))
    x = torch.rand(3, 6, dtype=DT)
    logits = torch.randn(3, 6, dtype=DT, requires_grad=True)
    terms = smooth_encoder_loss(x, logits, mu, logvar, mu_b, logvar_b, eta=50.0)
    terms["loss"].backward()
    for name, tensor in (("logits", logits), ("mu_a", mu), ("logvar_a", logvar), ("mu_b", mu_b), ("logvar_b", logvar_b)):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0, name
