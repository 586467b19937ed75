"""The robustness evaluator: probe + attacks protocols, metric definitions, clustering accuracy, FID,
plots, MLflow logging, and `raven evaluate` end to end (both protocols) on a checkpoint of `raven train`."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from raven.cli import main
from raven.config import ConfigError, TrainConfig
from raven.data import noisy_copy
from raven.eval import plots
from raven.eval.evaluate import (
    EvalConfig,
    delta_key,
    evaluate_model,
    format_summary,
    probe_and_attack,
    protocol_scope,
)
from raven.eval.metrics import (
    cluster_accuracy,
    latent_pair_distance,
    mixture_assignments,
    reconstruction_mse_255,
    sampled_latent_pair_distance,
)
from raven.eval.plots import accuracy_curve_data, plot_accuracy_curves
from raven.eval.attacks import attack
from raven.eval.autoattack import ProbeOnMean
from raven.eval.certify import certify
from raven.eval.probe import encode_mean, train_linear_probe
from raven.eval.protocols import StrongConfig, stream, strong_protocol
from raven.objectives import aug_variance, mixture_component_log_prob
from raven.train import train

CLI_DELTAS = "0,0.05,0.1,0.2"
STRONG_ATTACKS = {"kl", "rkl", "w2", "mean", "ce", "autoattack"}


@pytest.fixture(scope="module")
def vae(mnist_small):
    return train(TrainConfig(method="vae", epochs=2, limit=2000), splits=mnist_small, device="cpu").model


@pytest.fixture(scope="module")
def gmm(mnist_small):
    return train(TrainConfig(method="raven-gmm", epochs=1, limit=1000, n_components=10), splits=mnist_small,
                 device="cpu").model


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data_dir):
    """`raven train --limit 2000 --epochs 1`, then `raven evaluate --limit 300` (both protocols) with MLflow."""
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "vae"
    assert main(["train", "--method", "vae", "--limit", "2000", "--epochs", "1", "--out", str(run_dir),
                 "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    code = main(["evaluate", str(run_dir), "--limit", "300", "--deltas", CLI_DELTAS, "--no-fid",
                 "--data-dir", str(data_dir), "--device", "cpu", "--tracking-uri", tracking,
                 "--experiment", "raven-test", "--plots-dir", str(root / "plots")])
    return {"code": code, "run_dir": run_dir, "root": root, "tracking": tracking}


def test_delta_keys_are_the_decimals_as_written():
    assert [delta_key(float(t)) for t in CLI_DELTAS.split(",")] == ["0", "0.05", "0.1", "0.2"]
    assert delta_key(0.025) == "0.025" and delta_key(1e-5) == "0.00001" and delta_key(0.3) == "0.3"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attacks": ("kl", "fgsm")}, "unknown attack 'fgsm'"),
        ({"attacks": ()}, "at least one"),
        ({"deltas": (0.1, 1.5)}, r"in \[0, 1\]"),
        ({"deltas": (0.1, 0.10)}, "must not repeat"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"step_size": -0.1}, "step_size must be"),
        ({"restarts": 3, "random_start": False}, "restarts > 1 needs random_start"),
        ({"limit": 0}, "limit must be"),
        ({"strong_limit": 0}, "strong_limit must be an integer >= 1, got 0"),
        ({"protocol": "fast"}, "protocol must be one of paper, strong, both, certified, all, got 'fast'"),
        ({"certify_method": "lp"}, "certify_method must be one of crown, ibp, got 'lp'"),
        ({"certify_dtype": "bfloat16"}, "certify_dtype must be one of float32, float64, got 'bfloat16'"),
        ({"strong": {"restarts": 0}}, "strong.restarts must be an integer >= 1"),
    ],
)
def test_eval_config_rejects_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        EvalConfig(**changes)


def test_probe_and_attack_protocol(vae, mnist_small):
    config = EvalConfig(deltas=(0.0, 0.05, 0.1, 0.2), limit=300, probe_limit=2000, fid=False, tsne=False)
    result = probe_and_attack(vae, mnist_small.train_x, mnist_small.train_y, mnist_small.test_x, mnist_small.test_y,
                              config)
    json.dumps(result)  # plain data, safe to log or store
    clean = result["clean_accuracy"]
    assert 0.3 < clean <= 1.0 and result["images"] == 300
    tolerance = 1.0 / 300  # one image
    for kind in ("kl", "w2"):
        accuracy = result["adversarial_accuracy"][kind]
        assert list(accuracy) == ["0", "0.05", "0.1", "0.2"]
        assert accuracy["0"] == clean
        values = list(accuracy.values())
        assert all(b <= a + tolerance for a, b in zip(values, values[1:])), values
        assert values[-1] < clean - 0.1  # the attack bites
        strength = list(result["attack_dissimilarity"][kind].values())
        assert strength[0] == 0.0 and all(b > a for a, b in zip(strength, strength[1:]))


def test_clean_accuracy_is_the_probe_accuracy_on_clean_means(vae, mnist_small):
    config = EvalConfig(attacks=("kl",), deltas=(0.0,), limit=200, probe_limit=2000)
    result = probe_and_attack(vae, mnist_small.train_x, mnist_small.train_y, mnist_small.test_x, mnist_small.test_y,
                              config)
    probe, info = train_linear_probe(encode_mean(vae, mnist_small.train_x[:2000]), mnist_small.train_y[:2000])
    expected = (probe(encode_mean(vae, mnist_small.test_x[:200])).argmax(1) == mnist_small.test_y[:200]).double().mean()
    assert result["clean_accuracy"] == pytest.approx(float(expected))
    assert info["train_images"] == 2000 and info["train_accuracy"] > 0.3


def test_robust_reading_counts_images_right_clean_and_after_the_attack(vae, mnist_small):
    """adversarial_robust_accuracy is an independent count: the attack's per-image correctness AND the probe's
    clean rightness, never above the paper's reading or the clean accuracy."""
    config = EvalConfig(attacks=("kl", "ce"), deltas=(0.0, 0.05, 0.1), steps=10, limit=200, probe_limit=2000)
    result = probe_and_attack(vae, mnist_small.train_x, mnist_small.train_y, mnist_small.test_x, mnist_small.test_y,
                              config)
    x, y = mnist_small.test_x[:200], mnist_small.test_y[:200]
    probe, _ = train_linear_probe(encode_mean(vae, mnist_small.train_x[:2000]), mnist_small.train_y[:2000])
    clean = probe(encode_mean(vae, x)).argmax(1) == y
    turned_right = 0
    for kind in ("kl", "ce"):
        robust, paper = result["adversarial_robust_accuracy"][kind], result["adversarial_accuracy"][kind]
        assert list(robust) == list(paper) == ["0", "0.05", "0.1"]
        assert robust["0"] == paper["0"] == result["clean_accuracy"]
        for delta in config.deltas:
            key = delta_key(delta)
            out = attack(vae, x, delta, kind, steps=10, step_size=delta / 25, generator=stream(x.device, 0, kind, key),
                         probe=probe, y=y)
            assert paper[key] == float(out.correct.double().mean())
            assert robust[key] == float((out.correct & clean).double().mean())
            assert robust[key] <= min(paper[key], result["clean_accuracy"])
            turned_right += int((out.correct & ~clean).sum())
    assert turned_right > 0  # the readings differ on this model: some wrong clean predictions are turned right


def test_strong_protocol_runs_on_the_first_strong_limit_images(vae, mnist_small, tmp_path):
    small = StrongConfig(attacks=("ce",), steps=10, restarts=1, autoattack=False, check_images=30, convergence=False)
    config = EvalConfig(protocol="both", strong=small, attacks=("kl",), deltas=(0.0, 0.1), steps=5, limit=80,
                        strong_limit=30, probe_limit=2000, fid=False, tsne=False)
    result = evaluate_model(vae, mnist_small, config, out_dir=tmp_path)
    assert result.settings["test_images"] == 80 and result.settings["strong_images"] == 30
    probe, _ = train_linear_probe(encode_mean(vae, mnist_small.train_x[:2000]), mnist_small.train_y[:2000])
    alone = strong_protocol(vae, probe, mnist_small.test_x[:30], mnist_small.test_y[:30], config.deltas, small,
                            seed=0, batch_size=1000)
    assert result.robust_accuracy == alone["robust_accuracy"]
    x, y = mnist_small.test_x[:80], mnist_small.test_y[:80]
    assert result.clean_accuracy == float((probe(encode_mean(vae, x)).argmax(1) == y).double().mean())
    with open(tmp_path / "robustness.csv") as f:
        images = {(r["protocol"], r["attack"], r["delta"]): int(r["images"]) for r in csv.DictReader(f)}
    assert images[("strong", "all", "0.1")] == 30 and images[("paper", "kl", "0.1")] == 80
    assert json.loads((tmp_path / "robustness.json").read_text())["settings"]["strong_images"] == 30


def test_protocol_all_certifies_below_the_strong_protocol_on_its_images(vae, mnist_small, tmp_path):
    """The certified protocol reads the strong protocol's images (the first strong_limit); its accuracy is certify()'s
    own verdict, never above the strong protocol's, and the clean accuracy of those images at delta 0. That no
    certified image is broken by an attack is tests/test_certify.py's."""
    small = StrongConfig(attacks=("ce",), steps=10, restarts=1, autoattack=False, check_images=40, convergence=False)
    config = EvalConfig(protocol="all", strong=small, attacks=("kl",), deltas=(0.0, 0.005, 0.01, 0.05), steps=5,
                        limit=80, strong_limit=40, probe_limit=2000, fid=False, tsne=False)
    result = evaluate_model(vae, mnist_small, config, out_dir=tmp_path)
    report = json.loads((tmp_path / "robustness.json").read_text())
    assert report["protocol"] == "all" and report["certified_bound"] == result.certified_bound == "crown-fp32"
    assert report["certified_accuracy"] == result.certified_accuracy and list(result.certified_accuracy) == \
        ["0", "0.005", "0.01", "0.05"]
    assert report["settings"]["certified"]["images"] == 40 and result.timings["certified_seconds"] > 0
    x, y = mnist_small.test_x[:40], mnist_small.test_y[:40]
    probe, _ = train_linear_probe(encode_mean(vae, mnist_small.train_x[:2000]), mnist_small.train_y[:2000])
    clean = probe(encode_mean(vae, x)).argmax(1) == y
    assert result.certified_accuracy["0"] == result.robust_accuracy["0"] == float(clean.double().mean())
    for delta in config.deltas:
        key = delta_key(delta)
        certified, shift = certify(ProbeOnMean(vae.encoder, probe), x, y, delta, dtype=torch.float32)
        assert result.certified_accuracy[key] == float(certified.double().mean())
        assert result.certified_accuracy[key] <= result.robust_accuracy[key]
        stats = result.latent_shift_bound[key]
        assert stats["max"] == pytest.approx(float(shift.max())) and stats["mean"] == pytest.approx(float(shift.mean()))
        assert stats["median"] <= stats["q90"] <= stats["max"]
    assert 0 < result.certified_accuracy["0.005"] and result.certified_accuracy["0.05"] < result.clean_accuracy
    metrics, curves = result.metrics(), result.curves()
    assert metrics["certified_acc_delta_0.01"] == result.certified_accuracy["0.01"]
    assert metrics["latent_shift_bound_q90_delta_0.01"] == result.latent_shift_bound["0.01"]["q90"]
    assert curves["certified_acc"] == result.certified_accuracy
    with open(tmp_path / "robustness.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["protocol"] == "certified"]
    assert {(r["attack"], r["delta"], int(r["images"])) for r in rows} == {("crown-fp32", k, 40) for k in
                                                                          result.certified_accuracy}
    assert "CERTIFIED (crown)" in format_summary([result])


def test_evaluate_command_runs_the_certified_protocol_alone(cli_run, tmp_path, data_dir):
    import shutil

    run_dir = tmp_path / "vae"
    shutil.copytree(cli_run["run_dir"], run_dir)
    (run_dir / "robustness.json").unlink()
    assert main(["evaluate", str(run_dir), "--protocol", "certified", "--certify-method", "ibp", "--limit", "60",
                 "--strong-limit", "50", "--deltas", "0,0.01", "--no-fid", "--no-tsne", "--data-dir", str(data_dir),
                 "--device", "cpu", "--plots-dir", str(tmp_path / "plots")]) == 0
    report = json.loads((run_dir / "robustness.json").read_text())
    assert report["protocol"] == "certified" and report["certified_bound"] == "ibp-fp32"
    assert report["adversarial_accuracy"] == {} and report["robust_accuracy"] is None
    assert set(report["certified_accuracy"]) == set(report["latent_shift_bound"]) == {"0", "0.01"}
    assert report["certified_accuracy"]["0.01"] <= report["certified_accuracy"]["0"]
    assert report["settings"]["certified"]["images"] == 50 and "certified_seconds" in report["timings"]
    assert (tmp_path / "plots" / "robustness_curves.png").stat().st_size > 1000


def test_cluster_accuracy_on_hand_made_assignments():
    # clusters 2 -> label 0, 0 -> label 1, 1 -> label 2; one point of label 0 sits in cluster 1.
    assert cluster_accuracy([2, 2, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2, 0]) == pytest.approx(6 / 7)
    assert cluster_accuracy([5, 5, 3, 3], [1, 1, 0, 0]) == 1.0  # any cluster ids, any permutation
    # more clusters than labels: one-to-one matching leaves a cluster unmatched, its points wrong.
    assert cluster_accuracy([0, 1, 2, 2], [0, 0, 1, 1]) == pytest.approx(3 / 4)
    assert cluster_accuracy(torch.tensor([1, 1, 1, 1]), torch.tensor([0, 1, 2, 3])) == pytest.approx(1 / 4)


def test_mixture_assignments_follow_the_convolved_components(gmm, mnist_small):
    x = mnist_small.test_x[:300]
    sigma = gmm.config.sigma_aug
    assigned = mixture_assignments(gmm, x, sigma)
    mu = encode_mean(gmm, x)
    prior = gmm.prior
    log_p = mixture_component_log_prob(mu, prior.logits, prior.means, prior.logvars, aug_variance(sigma, mu))
    assert torch.equal(assigned, log_p.argmax(1))
    accuracy = cluster_accuracy(assigned, mnist_small.test_y[:300])
    assert 0.1 <= accuracy <= 1.0


def test_metric_definitions(vae, mnist_small):
    x = mnist_small.test_x[:100]
    x_hat = vae.reconstruct(x)
    expected = np.mean((255.0 * (x.numpy().astype(np.float64) - x_hat.numpy())) ** 2)
    assert reconstruction_mse_255(x, x_hat) == pytest.approx(expected, rel=1e-9)
    noisy = noisy_copy(x, 0.05, torch.Generator().manual_seed(0))
    a, b = encode_mean(vae, x), encode_mean(vae, noisy)
    distances = ((a - b) ** 2).sum(1).double().numpy()
    mean, std = latent_pair_distance(a, b)
    assert mean == pytest.approx(distances.mean()) and std == pytest.approx(distances.std())


def test_sampled_pair_distance_adds_both_posterior_variances(vae, mnist_small):
    """E||z~ - z||^2 = ||mu~ - mu||^2 + tr Sigma~ + tr Sigma for independent draws, checked over 10^4 images."""
    x = mnist_small.test_x
    noisy = noisy_copy(x, 0.05, torch.Generator().manual_seed(0))
    with torch.no_grad():
        (mu, logvar), (mu_n, logvar_n) = vae.encoder(x), vae.encoder(noisy)
    expected = ((mu - mu_n).pow(2) + logvar.exp() + logvar_n.exp()).sum(1).double()
    mean, std = sampled_latent_pair_distance(vae, x, noisy, torch.Generator().manual_seed(1))
    assert abs(mean - float(expected.mean())) < 4 * std / math.sqrt(len(x))
    assert mean - latent_pair_distance(mu, mu_n)[0] > 10 * std / math.sqrt(len(x))  # the variances count


def test_curves_and_metrics_carry_both_protocols(vae, mnist_small):
    small = StrongConfig(attacks=("ce",), steps=10, restarts=1, autoattack_steps=5, square_queries=20, check_images=50,
                         convergence=False)
    both = EvalConfig(protocol="both", strong=small, deltas=(0.0, 0.1), limit=80, probe_limit=2000, fid=False,
                      tsne=False)
    result = evaluate_model(vae, mnist_small, both)
    paper = evaluate_model(vae, mnist_small, both.replace(protocol="paper"))
    assert result.adversarial_accuracy == paper.adversarial_accuracy  # the strong run leaves the paper's untouched
    assert paper.robust_accuracy is None and "robust_acc" not in paper.curves()
    curves = result.curves()
    assert set(curves) == {"adv_acc_kl", "adv_acc_w2", "adv_robust_acc_kl", "adv_robust_acc_w2", "robust_acc"}
    assert curves["adv_robust_acc_w2"] == result.adversarial_robust_accuracy["w2"]
    assert result.metrics()["adv_robust_acc_kl_delta_0.1"] == result.adversarial_robust_accuracy["kl"]["0.1"]
    assert curves["robust_acc"] == result.robust_accuracy and list(curves["adv_acc_kl"]) == ["0", "0.1"]
    assert result.metrics()["robust_acc_delta_0.1"] == result.robust_accuracy["0.1"]
    strong_only = evaluate_model(vae, mnist_small, both.replace(protocol="strong"))
    assert strong_only.adversarial_accuracy == {} and strong_only.robust_accuracy == result.robust_accuracy
    assert not any(name.startswith(("adv_acc", "adv_robust_acc")) for name in strong_only.metrics())


def test_evaluate_model_without_out_dir_and_with_fid(gmm, mnist_small, tmp_path, monkeypatch):
    from raven.eval.fid import fid_available

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the test images' Inception statistics land here
    available, reason = fid_available()
    config = EvalConfig(attacks=("kl",), deltas=(0.0, 0.1), limit=64, probe_limit=1000, fid=True, tsne=False)
    result = evaluate_model(gmm, mnist_small, config)
    if available:
        assert result.fid is not None and math.isfinite(result.fid) and result.fid >= 0
        assert len(list((tmp_path / "raven" / "fid").glob("inception-64-*.npz"))) == 1
    else:
        assert result.fid is None and result.fid_note == reason
    assert result.cluster_accuracy is not None and 0 <= result.cluster_accuracy <= 1
    assert all(math.isfinite(v) for v in result.attack_dissimilarity["kl"].values())
    assert result.artifacts == [] and result.settings["method"] == "raven-gmm"
    metrics = result.metrics()
    assert metrics["adv_acc_kl_delta_0.1"] == result.adversarial_accuracy["kl"]["0.1"]
    assert "cluster_accuracy" in metrics and all(isinstance(v, float) for v in metrics.values())


def test_accuracy_curves_average_runs_sharing_a_label(tmp_path, monkeypatch):
    def fake(values):
        return {"adversarial_accuracy": {"kl": dict(zip(["0", "0.1", "0.2"], values))}}

    runs = [fake([0.9, 0.6, 0.3]), fake([0.8, 0.4, 0.1])]
    deltas, mean, std = accuracy_curve_data(runs, "kl")
    np.testing.assert_allclose(deltas, [0, 0.1, 0.2])
    np.testing.assert_allclose(mean, [0.85, 0.5, 0.2])
    np.testing.assert_allclose(std, np.std([[0.9, 0.6, 0.3], [0.8, 0.4, 0.1]], axis=0, ddof=1))
    path = plot_accuracy_curves([("raven", runs[0]), ("raven", runs[1]), ("vae", fake([0.9, 0.2, 0.0]))],
                                tmp_path / "curves.png")
    assert path.stat().st_size > 1000
    strong = [{**fake([0.9, 0.6, 0.3]), "robust_accuracy": {"0": 0.9, "0.1": 0.2, "0.2": 0.0}},
              {**fake([0.8, 0.4, 0.1]), "robust_accuracy": {"0": 0.8, "0.1": 0.1, "0.2": 0.0}}]
    deltas, mean, _ = accuracy_curve_data(strong, "strong")
    np.testing.assert_allclose(mean, [0.85, 0.15, 0.0])
    panels, subplots = [], plots.plt.subplots
    monkeypatch.setattr(plots.plt, "subplots",
                        lambda rows, cols, **kw: panels.append(cols) or subplots(rows, cols, **kw))
    plot_accuracy_curves([("raven", r) for r in strong], tmp_path / "strong.png", attacks=("kl", "ce"))
    assert panels == [2]  # kl (ce was not measured) beside the strong protocol's panel


def test_evaluate_command_writes_complete_outputs(cli_run, capsys):
    assert cli_run["code"] == 0
    run_dir = cli_run["run_dir"]
    report = json.loads((run_dir / "robustness.json").read_text())
    for key in ("clean_accuracy", "adversarial_accuracy", "mse", "fid", "latent_pair_distance", "settings",
                "cluster_accuracy"):
        assert key in report
    assert report["fid"] is None and "no-fid" in report["fid_note"]
    assert report["cluster_accuracy"] is None
    assert set(report["adversarial_accuracy"]) == {"kl", "w2"}
    for by_delta in report["adversarial_accuracy"].values():
        assert list(by_delta) == CLI_DELTAS.split(",")
        assert all(0.0 <= v <= 1.0 for v in by_delta.values())
        assert by_delta["0"] == report["clean_accuracy"]
    assert report["mse"] > 0 and report["latent_pair_distance"]["mean"] >= 0
    assert report["latent_pair_distance"]["std"] >= 0
    settings = report["settings"]
    assert settings["steps"] == 50 and settings["step_size"] == "delta/25" and settings["test_images"] == 300
    assert settings["seed"] == 0 and settings["dataset"] == "mnist" and settings["method"] == "vae"
    assert settings["checkpoint"].endswith("checkpoint.pt")
    assert settings["probe"]["train_images"] == 55000
    assert report["protocol"] == settings["protocol"] == "both"  # the command's default
    assert list(report["robust_accuracy"]) == CLI_DELTAS.split(",")
    assert report["robust_accuracy"]["0"] == report["clean_accuracy"]
    assert set(report["robust_accuracy_by_attack"]) == STRONG_ATTACKS
    for key, robust in report["robust_accuracy"].items():
        assert robust <= min(by_delta[key] for by_delta in report["robust_accuracy_by_attack"].values())
        assert robust <= min(by_delta[key] for by_delta in report["adversarial_accuracy"].values())
    assert report["robust_accuracy"]["0.2"] < report["adversarial_accuracy"]["kl"]["0.2"]
    assert set(report["adversarial_robust_accuracy"]) == {"kl", "w2"}
    for kind, by_delta in report["adversarial_robust_accuracy"].items():
        assert by_delta["0"] == report["clean_accuracy"]
        for key, robust in by_delta.items():
            assert robust <= min(report["clean_accuracy"], report["adversarial_accuracy"][kind][key])
    assert report["checks"]["ok"] and set(report["checks"]) == {"monotone", "flat_grey", "noise", "convergence", "ok"}
    assert settings["strong"]["steps"] == StrongConfig().steps and settings["strong"]["square_queries"] == 5000
    with open(run_dir / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    paper = [r for r in rows if r["protocol"] == "paper"]
    robust = {(r["attack"], r["delta"]): float(r["accuracy"]) for r in rows if r["protocol"] == "paper-robust"}
    assert len(paper) == 2 * 4 and len(rows) == 2 * len(paper) + (1 + len(STRONG_ATTACKS)) * 4
    assert robust == {(a, d): report["adversarial_robust_accuracy"][a][d] for a in ("kl", "w2") for d in
                      CLI_DELTAS.split(",")}
    assert {(r["attack"], r["delta"]) for r in paper} == {(a, d) for a in ("kl", "w2") for d in CLI_DELTAS.split(",")}
    assert float(next(r for r in rows if r["attack"] == "all" and r["delta"] == "0.1")["accuracy"]) == \
        report["robust_accuracy"]["0.1"]
    for png in (run_dir / "reconstructions.png", run_dir / "tsne.png",
                cli_run["root"] / "plots" / "robustness_curves.png"):
        assert png.is_file() and png.stat().st_size > 1000, png


def test_evaluate_command_logs_to_mlflow(cli_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cli_run["tracking"])
    experiment = client.get_experiment_by_name("raven-test")
    (run,) = client.search_runs([experiment.experiment_id])
    report = json.loads((cli_run["run_dir"] / "robustness.json").read_text())
    metrics = run.data.metrics
    assert metrics["adv_acc_kl_delta_0.1"] == pytest.approx(report["adversarial_accuracy"]["kl"]["0.1"])
    assert metrics["clean_accuracy"] == pytest.approx(report["clean_accuracy"])
    assert metrics["robust_acc_delta_0.1"] == pytest.approx(report["robust_accuracy"]["0.1"])
    assert metrics["adv_robust_acc_w2_delta_0.1"] == pytest.approx(report["adversarial_robust_accuracy"]["w2"]["0.1"])
    assert {"mse_255", "latent_pair_distance_mean", "latent_pair_distance_std"} <= set(metrics)
    history = client.get_metric_history(run.info.run_id, "adv_acc_w2")
    assert sorted(m.step for m in history) == [0, 50, 100, 200]
    strong = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "robust_acc")}
    assert strong == pytest.approx({round(1000 * float(k)): v for k, v in report["robust_accuracy"].items()})
    assert run.data.params["eval.steps"] == "50"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "robustness")}
    assert {"robustness/robustness.json", "robustness/robustness.csv", "robustness/tsne.png"} <= artifacts
    assert mlflow.active_run() is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--deltas", "0,abc"], "--deltas expects comma-separated numbers"),
        (["--deltas", "0,2"], "every delta must be a number in [0, 1]"),
        (["--attacks", "kl,pgd"], "unknown attack 'pgd'"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--protocol", "strongest"], "protocol must be one of paper, strong, both, certified, all, got 'strongest'"),
    ],
)
def test_evaluate_errors_are_one_line(args, message, cli_run, capsys):
    assert main(["evaluate", str(cli_run["run_dir"]), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raven: error:") and message in err[0], err


def test_evaluate_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no raven checkpoint" in err[0]


def _evaluate_args(*argv: str):
    from raven.cli import build_parser

    return build_parser().parse_args(["evaluate", "run", *argv])


def test_evaluate_flags_are_the_eval_config_fields():
    """`raven evaluate`'s evaluation flags come from EvalConfig's fields: none gives EvalConfig's defaults but
    --protocol both, and each flag sets its field."""
    from raven.cli import EVALUATE_DEFAULTS
    from raven.options import field_flag_values

    def config(*argv: str) -> EvalConfig:
        return EvalConfig(**{**EVALUATE_DEFAULTS, **field_flag_values(_evaluate_args(*argv), EvalConfig)})

    assert config() == EvalConfig(protocol="both")
    assert config("--attacks", "kl,ce", "--deltas", "0,0.1", "--steps", "3", "--step-size", "0.01", "--restarts", "2",
                  "--limit", "10", "--probe-limit", "20", "--no-fid", "--no-tsne", "--seed", "4", "--batch-size", "8",
                  "--fid-images", "5", "--protocol", "paper", "--strong-limit", "7") == EvalConfig(
        attacks=("kl", "ce"), deltas=(0.0, 0.1), steps=3, step_size=0.01, restarts=2, limit=10, probe_limit=20,
        fid=False, tsne=False, seed=4, batch_size=8, fid_images=5, protocol="paper", strong_limit=7)
    assert config("--protocol", "all", "--certify-method", "ibp", "--certify-dtype", "float64") == EvalConfig(
        protocol="all", certify_method="ibp", certify_dtype="float64")
    # --no-strong-check turns the strong protocol's convergence check off, and only it.
    unchecked = config("--no-strong-check")
    assert config().strong.convergence and not unchecked.strong.convergence
    assert unchecked.strong == dataclasses.replace(config().strong, convergence=False)
    assert not EvalConfig(strong={"convergence": False}).strong.convergence  # a caller's False stands


def test_evaluate_help_shows_each_fields_default(capsys):
    with pytest.raises(SystemExit):
        _evaluate_args("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default both)" in text and "random restarts per image (default 1)" in text
    assert "images attacked at once (default 1000)" in text and "--no-fid" in text


@pytest.mark.parametrize("protocol, limit, scope", [
    ("paper", 1000, "paper protocol on 10000 test images"),
    ("strong", 1000, "strong protocol on the first 1000 of 10000 test images, clean accuracy, MSE and FID on all 10000"),
    ("all", 1000, "paper protocol on 10000 test images, strong and certified protocols on the first 1000 of 10000 "
                  "test images"),
    ("certified", None, "certified protocol on 10000 test images, clean accuracy, MSE and FID on all 10000"),
])
def test_the_first_log_line_says_which_protocol_reads_which_images(protocol, limit, scope):
    # Once read "strong protocol on 10000 test images (strong/certified on the first 1000)" with no paper protocol.
    assert protocol_scope(EvalConfig(protocol=protocol, strong_limit=limit), 10000) == scope
