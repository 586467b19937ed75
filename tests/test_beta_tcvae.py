"""beta-TCVAE through the method registry: its MWS total-correlation estimator against exact
computations, its objective against the VAE's, and training, packing and the CLI end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from raven.cli import main
from raven.config import METHODS, TrainConfig
from raven.methods import METHODS as REGISTRY
from raven.methods.beta_tcvae import total_correlation_mws
from raven.pack import train_pack
from raven.train import build_model, method_loss, train


def _posteriors(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(n, d))
    logvar = rng.normal(scale=0.5, size=(n, d)) - 1.0
    z = mu + np.exp(0.5 * logvar) * rng.normal(size=(n, d))  # z_i ~ q(z|n_i)
    return z, mu, logvar


def _tc(z, mu, logvar, n_data):
    as_tensor = lambda a: torch.from_numpy(a)  # noqa: E731 - float64 throughout
    return total_correlation_mws(as_tensor(z), as_tensor(mu), as_tensor(logvar), n_data).numpy()


def test_mws_is_chen_et_al_formula_computed_by_a_plain_loop():
    m, d, n_data = 5, 3, 40
    z, mu, logvar = _posteriors(m, d, seed=0)
    sd = np.exp(0.5 * logvar)
    expected = []
    for i in range(m):
        joint = [sum(norm.logpdf(z[i, k], mu[j, k], sd[j, k]) for k in range(d)) for j in range(m)]
        log_qz = logsumexp(joint) - math.log(n_data * m)
        marginals = sum(logsumexp([norm.logpdf(z[i, k], mu[j, k], sd[j, k]) for j in range(m)]) - math.log(n_data * m)
                        for k in range(d))
        expected.append(log_qz - marginals)
    np.testing.assert_allclose(_tc(z, mu, logvar, n_data), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n,d", [(4, 2), (6, 3)])
def test_mws_over_the_whole_data_set_is_the_exact_total_correlation_plus_d_minus_1_log_n(n, d):
    """With the batch equal to the data set (M = N), every MWS log-density is the exact mixture density
    minus log N, so the estimate is the exact TC of the samples plus (d - 1) log N."""
    z, mu, logvar = _posteriors(n, d, seed=n + d)
    sd = np.exp(0.5 * logvar)
    exact = []
    for i in range(n):
        # q(z) = (1/N) sum_n prod_k N(z_k; mu_nk, sd_nk^2), and its marginals q_k.
        log_q = logsumexp([norm.logpdf(z[i], mu[j], sd[j]).sum() for j in range(n)]) - math.log(n)
        log_q_dims = sum(logsumexp([norm.logpdf(z[i, k], mu[j, k], sd[j, k]) for j in range(n)]) - math.log(n)
                         for k in range(d))
        exact.append(log_q - log_q_dims)
    np.testing.assert_allclose(_tc(z, mu, logvar, n), np.array(exact) + (d - 1) * math.log(n), rtol=0, atol=1e-10)


def test_identical_posteriors_factorise_so_only_the_offset_remains():
    """All N posteriors equal: q(z) is that one Gaussian, which factorises, so the true TC is 0."""
    _, mu, logvar = _posteriors(1, 4, seed=3)
    n = 7
    mu, logvar = np.repeat(mu, n, axis=0), np.repeat(logvar, n, axis=0)
    z = mu + np.random.default_rng(4).normal(size=mu.shape)
    np.testing.assert_allclose(_tc(z, mu, logvar, n), np.full(n, 3 * math.log(n)), rtol=0, atol=1e-10)


def test_with_tc_beta_one_the_objective_is_the_vae_bound(mnist_small):
    vae, tcvae = TrainConfig(method="vae"), TrainConfig(method="beta-tcvae", tc_beta=1.0)
    model, x = build_model(vae), mnist_small.train_x[:64]
    a = method_loss(model, vae, x, torch.Generator().manual_seed(0))
    b = method_loss(model, tcvae, x, torch.Generator().manual_seed(0), n_data=1000)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["kl"], b["kl"])
    c = method_loss(model, tcvae.replace(tc_beta=6.0), x, torch.Generator().manual_seed(0), n_data=1000)
    assert torch.allclose(c["loss"], a["loss"] + 5.0 * c["tc"], rtol=1e-5)


def test_it_is_a_registered_method_with_its_own_option():
    assert "beta-tcvae" in METHODS and REGISTRY["beta-tcvae"].partner == "none"
    assert TrainConfig(method="beta-tcvae").tc_beta == 5.0
    with pytest.raises(ValueError, match="tc_beta must be a finite number >= 0"):
        TrainConfig(method="beta-tcvae", tc_beta=-1.0)


def test_trains_and_packs_like_the_others(mnist_small):
    config = TrainConfig(method="beta-tcvae", epochs=2, limit=500, batch_size=100, tc_beta=4.0)
    before = build_model(config).state_dict()
    solo = train(config, splits=mnist_small, device="cpu")
    after = solo.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert solo.history[-1]["train_tc"] == pytest.approx(solo.history[-1]["train_tc"])  # finite and logged
    assert math.isfinite(solo.history[-1]["val_elbo"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise pack = solo holds at one thread (tests/test_pack.py)
    try:
        packed = train_pack([config, config.replace(seed=1, tc_beta=8.0)], splits=mnist_small, device="cpu")
        alone = [train(c, splits=mnist_small, device="cpu") for c in (config, config.replace(seed=1, tc_beta=8.0))]
    finally:
        torch.set_num_threads(threads)
    for p, s in zip(packed, alone):
        for name, tensor in s.model.state_dict().items():
            assert torch.allclose(p.model.state_dict()[name], tensor, rtol=0, atol=1e-6), name


def test_cli_trains_a_seed_pack_and_evaluates(tmp_path, data_dir):
    out = tmp_path / "tc"
    assert main(["train", "--method", "beta-tcvae", "--tc-beta", "3", "--seeds", "0-1", "--epochs", "1",
                 "--limit", "300", "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"]) == 0
    saved = json.loads((out / "seed-1" / "metrics.json").read_text())
    assert saved["config"]["method"] == "beta-tcvae" and saved["config"]["tc_beta"] == 3.0
    assert main(["evaluate", str(out / "seed-0"), "--limit", "100", "--probe-limit", "300", "--deltas", "0,0.1",
                 "--protocol", "paper", "--no-fid", "--no-tsne", "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    result = json.loads((out / "seed-0" / "robustness.json").read_text())
    assert 0.0 <= result["clean_accuracy"] <= 1.0
