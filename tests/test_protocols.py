"""The strong protocol: never weaker than an independent PGD on the probe, monotone in delta, at chance at
delta = 0.5, beyond random noise; its checks can fail; the reference AutoAttack (pyautoattack); the cheap objective."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from raven.config import ConfigError, TrainConfig
from raven.eval.autoattack import COMPONENTS, ProbeOnMean, autoattack
from raven.eval.probe import encode_mean, train_linear_probe
from raven.eval import protocols
from raven.eval.certify import certify
from raven.eval.protocols import (
    CertifiedObjectiveSettings,
    StrongConfig,
    StrongObjectiveSettings,
    bite_checks,
    certified_validation_objective,
    check_digest,
    flat_grey_survivors,
    format_checks,
    strong_protocol,
    strong_validation_objective,
)
from raven.sweep.selection import ObjectiveSettings, validation_objective
from raven.train import train

DELTAS = (0.0, 0.03, 0.1, 0.5)
# A small but complete strong protocol: every attack, AutoAttack's four parts, both reruns of the check.
SMALL = StrongConfig(steps=10, restarts=2, autoattack_steps=5, square_queries=50, check_images=60)
N_IMAGES = 100


@pytest.fixture(scope="module")
def vae(mnist_small):
    return train(TrainConfig(method="vae", epochs=2, limit=2000), splits=mnist_small, device="cpu").model.eval()


@pytest.fixture(scope="module")
def probe(vae, mnist_small):
    return train_linear_probe(encode_mean(vae, mnist_small.train_x), mnist_small.train_y)[0]


@pytest.fixture(scope="module")
def images(mnist_small):
    return mnist_small.test_x[:N_IMAGES], mnist_small.test_y[:N_IMAGES]


@pytest.fixture(scope="module")
def strong(vae, probe, images):
    x, y = images
    lines: list[str] = []
    out = strong_protocol(vae, probe, x, y, DELTAS, SMALL, seed=0, batch_size=64, log=lines.append)
    return {**out, "log": lines}


def plain_pgd_on_the_probe(model, probe, x, y, delta, steps=40, seed=0):
    """An independent end-to-end PGD: cross-entropy of the probe on mu, step delta/8, the last iterate judged."""
    generator = torch.Generator().manual_seed(seed)
    x_adv = (x + delta * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(probe(model.encoder(x_adv)[0]), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + delta / 8 * grad.sign(), x - delta), x + delta).clamp(0, 1)
    with torch.no_grad():
        return float((probe(model.encoder(x_adv)[0]).argmax(1) == y).double().mean())


def test_strong_is_never_weaker_than_an_independent_plain_pgd_on_the_probe(strong, vae, probe, images):
    x, y = images
    with torch.no_grad():
        clean = float((probe(encode_mean(vae, x)).argmax(1) == y).double().mean())
    assert strong["robust_accuracy"]["0"] == pytest.approx(clean)
    for delta in (0.03, 0.1):
        reference = plain_pgd_on_the_probe(vae, probe, x, y, delta)
        assert strong["robust_accuracy"][f"{delta:g}"] <= reference, (delta, strong["robust_accuracy"], reference)
    assert strong["robust_accuracy"]["0.03"] < clean - 0.2  # it bites hard, not just a little
    for kind, by_delta in strong["robust_accuracy_by_attack"].items():
        assert all(strong["robust_accuracy"][k] <= v + 1e-12 for k, v in by_delta.items()), kind


def test_strong_accuracy_is_monotone_in_delta_and_at_chance_at_one_half(strong, images):
    _, y = images
    values = [strong["robust_accuracy"][k] for k in ("0", "0.03", "0.1", "0.5")]
    assert values == sorted(values, reverse=True)
    largest_share = float(torch.bincount(y).max()) / len(y)
    assert strong["robust_accuracy"]["0.5"] <= largest_share
    checks = strong["checks"]
    assert checks["monotone"]["ok"] and checks["flat_grey"]["ok"] and checks["flat_grey"]["delta"] == "0.5"
    assert checks["flat_grey"]["largest_class_share"] == pytest.approx(largest_share)
    assert set(strong["robust_accuracy_by_attack"]) == {"kl", "rkl", "w2", "mean", "ce", "autoattack"}
    assert list(strong["autoattack_survivors"]["0.03"]) == list(COMPONENTS)


def test_the_log_bounds_the_time_left_by_the_last_delta_and_gives_the_checks_in_one_line(strong):
    lines = strong["log"]
    budgets = [line for line in lines if line.startswith("  strong delta=")]
    assert len(budgets) == len(DELTAS)
    elapsed = [float(re.search(r"\[(\d+) s", line).group(1)) for line in budgets]
    for i, line in enumerate(budgets[1:-1], start=1):  # every nonzero delta but the last says what is left
        left = sum(1 for d in DELTAS[i + 1:] if d > 0)
        said = float(re.search(r"at most about (\d+) s left before the checks", line).group(1))
        assert said == pytest.approx((elapsed[i] - elapsed[i - 1]) * left, abs=left + 1)  # seconds print rounded
    assert "left" not in budgets[0] and "left" not in budgets[-1]
    assert lines[-1].startswith(f"  {check_digest(strong['checks'])} [")
    assert check_digest(strong["checks"]) == ("checks: monotone ok, flat grey ok, noise ok, convergence "
                                              + ("ok" if strong["checks"]["convergence"]["ok"] else "FAILED"))
    assert not any(line.lstrip().startswith("check ") for line in lines)  # the full lines are the summary's


def test_random_signs_of_the_same_budget_hurt_less(strong):
    noise, robust = strong["checks"]["noise"]["accuracy"], strong["robust_accuracy"]
    assert strong["checks"]["noise"]["ok"]
    assert all(noise[k] >= robust[k] for k in robust)
    assert noise["0.1"] > robust["0.1"] + 0.2


def test_convergence_check_says_when_the_attack_has_not_converged(vae, probe, images):
    x, y = images
    weak = StrongConfig(attacks=("ce",), steps=1, restarts=1, autoattack=False, check_images=100)
    out = strong_protocol(vae, probe, x, y, (0.0, 0.1), weak, seed=0, batch_size=64)
    convergence = out["checks"]["convergence"]
    assert not convergence["ok"] and not out["checks"]["ok"]
    assert convergence["largest_drop"] >= 0.01
    assert max(convergence["steps_x2"]["0.1"], convergence["restarts_x2"]["0.1"]) == convergence["largest_drop"]
    (line,) = [line for line in format_checks(out["checks"]) if line.startswith("check convergence")]
    assert "has not converged" in line and "delta=0.1" in line


def test_the_flat_grey_check_runs_autoattack_only_on_what_pgd_leaves_above_the_class_share(vae, probe, images,
                                                                                          monkeypatch):
    x, y = images
    share = float(torch.bincount(y).max()) / len(y)
    attacked = []
    real = protocols.autoattack
    monkeypatch.setattr(protocols, "autoattack",
                        lambda *a, **k: attacked.append(int(k["correct"].sum())) or real(*a, **k))
    survivors, attacks = flat_grey_survivors(vae, probe, x, y, SMALL, share, seed=0, batch_size=64)
    assert attacks == "pgd" and attacked == [] and float(survivors.double().mean()) <= share
    # Against a share of 0 (every image must fall), AutoAttack runs on what one weak PGD step leaves, and only there.
    weak = dataclasses.replace(SMALL, attacks=("mean",), steps=1, restarts=1)
    pgd_only, _, _ = protocols.worst_case(vae, probe, x, y, 0.5, dataclasses.replace(weak, autoattack=False), seed=0,
                                          batch_size=64)
    assert int(pgd_only.sum()) > 0
    survivors, attacks = flat_grey_survivors(vae, probe, x, y, weak, 0.0, seed=0, batch_size=64)
    assert attacks == "pgd+autoattack" and attacked == [int(pgd_only.sum())]
    assert not torch.any(survivors & ~pgd_only)
    checks = bite_checks(vae, probe, x, y, (0.0, 0.1), dataclasses.replace(SMALL, convergence=False),
                         {"0": 0.9, "0.1": 0.5}, {}, {"0": 0.9, "0.1": 0.5}, {}, seed=0, batch_size=64)
    assert checks["flat_grey"]["ok"] and checks["flat_grey"]["attacks"] == "pgd"
    assert checks["flat_grey"]["images"] == SMALL.check_images and "by pgd;" in format_checks(checks)[1]


def test_autoattack_parts_only_remove_survivors_inside_the_ball(vae, probe, images):
    x, y = images
    classifier = ProbeOnMean(vae.encoder, probe)
    with torch.no_grad():
        clean = classifier(x).argmax(1) == y
    state = torch.random.get_rng_state()
    alive, survivors = autoattack(classifier, x, y, 0.03, steps=10, square_queries=100, batch_size=64)
    assert torch.equal(torch.random.get_rng_state(), state)  # the reference's reseeding is undone
    counts = [int(clean.sum())] + [survivors[name] for name in COMPONENTS]
    assert counts == sorted(counts, reverse=True) and counts[-1] == int(alive.sum()) < counts[0]
    assert torch.all(clean | ~alive)
    alone, _ = autoattack(classifier, x, y, 0.03, steps=10, square_queries=100, batch_size=64,
                          components=("apgd-ce",))
    assert torch.all(alone | ~alive)  # the full set breaks at least what its first part breaks


@pytest.mark.parametrize("changes, message", [
    ({"attacks": ("kl", "pgd")}, "unknown strong attack 'pgd'"),
    ({"attacks": (), "autoattack": False}, "at least one PGD attack or AutoAttack"),
    ({"steps": 0}, "strong.steps must be an integer >= 1"),
    ({"square_queries": 1.5}, "strong.square_queries"),
    ({"check_images": 0}, "strong.check_images"),
])
def test_strong_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        StrongConfig(**changes)
    with pytest.raises(ConfigError, match="unknown strong-protocol setting"):
        StrongConfig.coerce({"stepz": 3})


def test_strong_objective_reads_the_validation_split_only(vae, mnist_small):
    poisoned = dataclasses.replace(mnist_small, test_x=torch.full_like(mnist_small.test_x, float("nan")))
    settings = StrongObjectiveSettings(val_limit=100, probe_limit=2000, steps=10)
    metrics = strong_validation_objective(vae, poisoned, settings)
    parts = [metrics[f"val_strong_acc_delta_{k}"] for k in ("0.025", "0.05", "0.1")]
    assert metrics["val_strong_robust_accuracy"] == pytest.approx(sum(parts) / 3)
    assert all(0 <= p <= metrics["val_clean_accuracy"] for p in parts) and parts == sorted(parts, reverse=True)
    # The sweeps' --objective strong is this objective, reporting exactly the metrics it declares.
    chosen = ObjectiveSettings(protocol="strong", val_limit=100, probe_limit=2000, steps=10)
    assert validation_objective(vae, poisoned, chosen) == metrics
    assert set(metrics) == set(chosen.metrics())
    with pytest.raises(ConfigError, match="--objective must be one of paper, strong, certified"):
        ObjectiveSettings(protocol="autoattack")


def test_certified_objective_is_certifys_own_mean_on_the_validation_images(vae, mnist_small):
    poisoned = dataclasses.replace(mnist_small, test_x=torch.full_like(mnist_small.test_x, float("nan")))
    chosen = ObjectiveSettings(protocol="certified", val_limit=100, probe_limit=2000)
    metrics = validation_objective(vae, poisoned, chosen)
    assert metrics == certified_validation_objective(vae, poisoned, CertifiedObjectiveSettings(val_limit=100,
                                                                                                probe_limit=2000))
    assert set(metrics) == set(chosen.metrics()) == {"val_certified_accuracy", "val_clean_accuracy",
                                                     "val_certified_acc_delta_0.01", "val_certified_acc_delta_0.025"}
    # Independently: the probe on the first 2,000 training images, certify() in float32 on the first 100
    # validation images (never the test split, which is NaN here).
    x, y = mnist_small.val_x[:100], mnist_small.val_y[:100]
    probe, _ = train_linear_probe(encode_mean(vae, mnist_small.train_x[:2000]), mnist_small.train_y[:2000])
    parts = []
    for key, delta in (("0.01", 0.01), ("0.025", 0.025)):
        certified, _ = certify(ProbeOnMean(vae.encoder, probe), x, y, delta, dtype=torch.float32)
        assert metrics[f"val_certified_acc_delta_{key}"] == float(certified.double().mean())
        parts.append(float(certified.double().mean()))
    assert metrics["val_certified_accuracy"] == pytest.approx(sum(parts) / 2)
    assert metrics["val_clean_accuracy"] == float((probe(encode_mean(vae, x)).argmax(1) == y).double().mean())
    assert metrics["val_certified_acc_delta_0.01"] > 0  # the small budget certifies some images of this model
    with pytest.raises(ConfigError, match="method must be one of crown, ibp"):
        CertifiedObjectiveSettings(method="lp")


def test_checks_fail_when_accuracy_rises_or_the_flat_grey_image_is_missed():
    y = torch.tensor([0] * 5 + [1, 2, 3, 4, 5])  # 10 images: one image is 0.1, the largest class share 0.5
    x = torch.zeros(10, 784)
    robust = {"0": 0.8, "0.1": 0.3, "0.2": 0.5, "0.5": 0.7}
    by_attack = {"ce": {"0": 0.8, "0.1": 0.4, "0.2": 0.7, "0.5": 0.7}}
    noise = {"0": 0.8, "0.1": 0.3, "0.2": 0.3, "0.5": 0.7}
    checks = bite_checks(None, None, x, y, (0.0, 0.1, 0.2, 0.5), StrongConfig(convergence=False), robust, by_attack,
                         noise, {}, seed=0, batch_size=10)
    assert not checks["ok"] and not checks["monotone"]["ok"]
    assert checks["monotone"]["largest_rise"] == pytest.approx(0.2) and checks["monotone"]["tolerance"] == 0.1
    assert checks["monotone"]["attack_alone"] == "ce" and checks["monotone"]["largest_rise_alone"] == pytest.approx(0.3)
    assert not checks["flat_grey"]["ok"] and checks["flat_grey"]["largest_class_share"] == 0.5
    assert not checks["noise"]["ok"] and checks["noise"]["smallest_margin"] == pytest.approx(-0.2)
    lines = format_checks(checks)
    assert sum("FAILED" in line for line in lines) == 3 and "not run" in lines[-1]
