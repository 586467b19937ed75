"""The sweep's time-left model (raven.sweep.clock) and the CPUs its evaluation tasks get (raven.sweep.cluster)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from raven.eval.fid import InceptionFeatures, fid_available, reference_cached, reference_statistics
from raven.sweep.clock import (
    FID_SECONDS_PER_IMAGE_CPU,
    STRONG_CHECK_FACTOR,
    STRONG_SECONDS_PER_IMAGE_DELTA_CPU,
    TSNE_SECONDS_PER_POINT,
    Rates,
    evaluation_estimate,
    fid_image_seconds,
)
from raven.sweep.cluster import ClusterInfo
from raven.sweep.space import SearchSpace
from raven.sweep.spec import SweepSpec


def _spec(**fields) -> SweepSpec:
    return SweepSpec(kind="sigma_aug", method="raven", space=SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0), **fields)


def test_the_evaluation_estimate_adds_the_attacks_tsne_and_fid_at_the_measured_rates():
    spec = _spec()  # the defaults: objective 1,000 images x 10 steps x 2 attacks x 3 budgets; evaluation 10,000
    rates = Rates(1.0, 1.0, 0.0, eval_speedup=1.6, fid_image_s=0.05, fid_passes=1)
    objective_s = 8.0
    # By hand: the paper's attacks cost the objective's time per unit of attack work (images x steps x attacks x
    # budgets), sped up by the evaluation's threads; t-SNE 2 x 1,000 points; FID one pass over 10,000 images.
    attacks = objective_s / 1.6 * (10_000 * 50 * 2 * 8) / (1_000 * 10 * 2 * 3)
    expected = attacks + TSNE_SECONDS_PER_POINT * 2 * 1000 + 0.05 * 10_000
    assert evaluation_estimate(spec, objective_s, False, rates) == pytest.approx(expected)
    # Uncached test statistics cost a second Inception pass; without a timed rate the constant stands in.
    assert evaluation_estimate(spec, objective_s, False, Rates(1.0, 1.0, 0.0, eval_speedup=1.6)) == pytest.approx(
        attacks + TSNE_SECONDS_PER_POINT * 2000 + FID_SECONDS_PER_IMAGE_CPU * 2 * 10_000)
    # On a GPU FID is not charged; after --objective strong the strong protocol is (protocol both).
    assert evaluation_estimate(spec, objective_s, True, rates) == pytest.approx(attacks + TSNE_SECONDS_PER_POINT * 2000)
    strong = _spec(objective="strong", fid=False, tsne=False, eval_limit=2000)
    paper_part = objective_s / 1.6 * (2000 * 50 * 2 * 8) / (1_000 * 20 * 2 * 3)  # its objective: 20 steps
    # The strong protocol runs on the first 1,000 of the 2,000 evaluated images (--eval-strong-limit's default).
    assert strong.eval_config.protocol == "both" and strong.eval_config.strong_images(2000) == 1000
    # Its convergence check reruns the attacks on the first 1,000 (StrongConfig.check_images): 3.6 times more.
    protocol = STRONG_SECONDS_PER_IMAGE_DELTA_CPU * 1000 * 8 / 1.6
    assert evaluation_estimate(strong, objective_s, False, rates) == pytest.approx(
        protocol * (1 + STRONG_CHECK_FACTOR) + paper_part, rel=1e-9)


def test_a_lone_evaluation_gets_every_cpu_of_the_node_and_many_share_them():
    laptop = ClusterInfo("local", cpus=2.0, gpus=0.0, nodes=1, node_cpus=2.0)
    assert laptop.eval_cpus(None, per_trial=1.0, tasks=1) == 2.0  # the default sweep's one evaluation
    assert laptop.eval_cpus(None, per_trial=1.0, tasks=3) == 1.0  # never fewer than a trial's
    assert laptop.eval_cpus(0.5, per_trial=1.0, tasks=1) == 0.5  # --eval-cpus wins
    cluster = ClusterInfo("head:6379", cpus=64.0, gpus=0.0, nodes=4, node_cpus=16.0)
    assert cluster.eval_cpus(None, per_trial=1.0, tasks=2) == 16.0  # within the largest node, or it never runs
    assert cluster.eval_cpus(None, per_trial=1.0, tasks=8) == 8.0


@pytest.mark.skipif(not fid_available()[0], reason="FID's Inception network (the fid extra) is not installed")
def test_fid_is_timed_on_this_machine_and_a_cached_reference_is_one_pass_fewer(tmp_path):
    seconds = fid_image_seconds(threads=1)
    assert seconds is not None and 0 < seconds < 5  # the 2-core machine: about 0.09 s per image on one thread
    images = torch.rand(12, 784, generator=torch.Generator().manual_seed(1))
    assert not reference_cached(images, tmp_path)
    _, from_cache = reference_statistics(images, InceptionFeatures("cpu", batch_size=12, progress=False), tmp_path)
    assert not from_cache and reference_cached(images, tmp_path)
    assert not reference_cached(images[:11], tmp_path) and not reference_cached(images.flip(0), tmp_path)


def test_step_seconds_times_the_copies_at_once_each_on_its_own_model(monkeypatch):
    """The concurrent timing runs its copies together (their timed steps overlap) on models of their own."""
    from raven.sweep import clock

    calls = []

    def fake_step(model, optimizer, config, x, generator):
        calls.append((threading.get_ident(), id(model), time.perf_counter()))
        time.sleep(0.01)  # releases the GIL, as torch's kernels do

    monkeypatch.setattr(clock, "train_step", fake_step)
    config = _spec().train_config(0.01)
    x = torch.zeros(4, 784)
    seconds = clock.step_seconds(config, x, steps=5, copies=3)
    assert 0.01 <= seconds < 0.05  # three copies at once, not one after another (0.03 s a step)
    threads = {t for t, _, _ in calls}
    assert len(threads) == 3 and len({m for _, m, _ in calls}) == 3 and len(calls) == 3 * (2 + 5)
    by_thread = {t: [c for tt, _, c in calls if tt == t] for t in threads}
    # The timed steps start after every copy's warm-up (the barrier): they overlap.
    assert max(ts[2] for ts in by_thread.values()) < min(ts[-1] for ts in by_thread.values())


def test_calibration_charges_the_slowdown_of_trials_that_share_a_node(monkeypatch, mnist_small):
    from raven.sweep import clock

    def fake_step_seconds(config, x, steps, copies=1):
        return 0.010 * (1.5 if copies > 1 else 1.0)

    monkeypatch.setattr(clock, "step_seconds", fake_step_seconds)
    monkeypatch.setattr(clock, "validation_metrics", lambda *a, **k: None)
    monkeypatch.setattr(clock, "validation_objective", lambda *a, **k: time.sleep(0.05))
    spec = _spec(fid=False, tsne=False)
    alone = clock.calibrate(spec, mnist_small, eval_on_gpu=False)
    shared = clock.calibrate(spec, mnist_small, eval_on_gpu=False, concurrent=2)
    steps = math.ceil(len(mnist_small.train_x) / spec.train_config(0.01).batch_size)
    assert alone.contention == 1.0 and shared.contention == pytest.approx(1.5)
    assert alone.epoch_s == pytest.approx(steps * 0.010, rel=0.01) and shared.epoch_s == pytest.approx(
        steps * 0.015, rel=0.01)
    assert shared.objective_s == pytest.approx(1.5 * 0.05, rel=0.5)
    # The evaluation runs alone: its estimate does not carry the trials' contention.
    assert shared.evaluation_s == pytest.approx(alone.evaluation_s, rel=0.5)
