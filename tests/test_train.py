"""Gradients, learning on real MNIST, checkpoints and exact resume, divergence errors."""

from __future__ import annotations

import pytest
import torch

import raven
from raven.config import DEFAULT_ETA, METHODS, ConfigError, TrainConfig
from raven.train import TrainingDiverged, build_model, method_loss, train, validation_metrics


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_parameter(method, mnist_small):
    config = TrainConfig(method=method, sigma_aug=0.3)
    model = build_model(config)
    generator = torch.Generator().manual_seed(0)
    terms = method_loss(model, config, mnist_small.train_x[:64], generator)
    terms["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{method}: no gradient for {name}"
        assert torch.isfinite(parameter.grad).all(), f"{method}: non-finite gradient for {name}"
        assert parameter.grad.abs().sum() > 0, f"{method}: zero gradient for {name}"
    assert (model.prior is not None) == (method == "raven-gmm")


@pytest.mark.parametrize("method", ["vae", "raven"])
def test_short_training_lowers_validation_loss(method, mnist_small):
    config = TrainConfig(method=method, epochs=2, limit=2000)
    before = validation_metrics(build_model(config), config, mnist_small.val_x)
    result = train(config, splits=mnist_small, device="cpu")
    after = result.final_metrics
    assert after["val_loss"] < before["val_loss"] - 10
    assert after["val_elbo"] > before["val_elbo"] + 10
    assert after["val_mse_255"] < before["val_mse_255"]
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_checkpoint_round_trip_and_public_api(tmp_path, mnist_small):
    config = TrainConfig(method="raven-gmm", epochs=1, limit=500, n_components=3)
    result = train(config, splits=mnist_small, device="cpu", out_dir=tmp_path)
    loaded = raven.load_checkpoint(tmp_path)
    x = mnist_small.test_x[:32]
    mu, logvar = loaded.encode(x)
    assert mu.shape == (32, 10) and logvar.shape == (32, 10)
    expected_mu, expected_logvar = result.model.encode(x)
    assert torch.equal(mu, expected_mu) and torch.equal(logvar, expected_logvar)
    assert loaded.config == config and len(loaded.history) == 1
    assert not loaded.training
    with pytest.raises(ValueError, match=r"shape \(N, 784\)"):
        loaded.encode(x.reshape(32, 28, 28))


def test_resume_continues_exactly(tmp_path, mnist_small):
    config = TrainConfig(method="raven", epochs=2, limit=600)
    straight = train(config, splits=mnist_small, device="cpu")
    train(config.replace(epochs=1), splits=mnist_small, device="cpu", out_dir=tmp_path)
    resumed = train(config, splits=mnist_small, device="cpu", out_dir=tmp_path)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert resumed.history[-1]["val_elbo"] == straight.history[-1]["val_elbo"]


def test_resume_refuses_a_different_config(tmp_path, mnist_small):
    train(TrainConfig(method="vae", epochs=1, limit=200), splits=mnist_small, device="cpu", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        train(TrainConfig(method="raven", epochs=1, limit=200), splits=mnist_small, device="cpu", out_dir=tmp_path)


def test_divergence_names_the_step(mnist_small):
    config = TrainConfig(method="vae", epochs=1, limit=1000, lr=1e8, grad_clip_norm=None)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step \d+ of 8"):
        train(config, splits=mnist_small, device="cpu")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"sigma_aug": 0.0}, "sigma_aug must be a finite number > 0"),
        ({"sigma_aug": -0.1}, "sigma_aug must be a finite number > 0"),
        ({"sigma_aug": (0.1, 0.2)}, "one per latent dimension"),
        ({"eta": -1.0}, "eta must be a finite number >= 0"),
        ({"method": "ae"}, "unknown method 'ae'"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 1.5}, "batch_size must be an integer"),
    ],
)
def test_bad_config_is_rejected_with_its_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_defaults_per_dataset_and_method():
    assert TrainConfig(dataset="mnist").sigma_aug == 0.01
    assert TrainConfig(dataset="fashion-mnist").sigma_aug == 0.04
    for dataset in ("mnist", "fashion-mnist"):
        assert TrainConfig(method="se", dataset=dataset).eta == DEFAULT_ETA[dataset]
    assert TrainConfig(method="vae-noise").pair_noise == "fixed"
    assert TrainConfig(method="raven").pair_noise == "per-step"
    assert TrainConfig(method="vae-noise", pair_noise="per-step").pair_noise == "per-step"
    with pytest.raises(ConfigError, match="pair_noise must be one of fixed, per-step"):
        TrainConfig(pair_noise="once")


def test_a_checkpoint_config_without_the_newer_fields_still_loads():
    saved = TrainConfig(method="vae-noise").to_dict()
    del saved["pair_noise"]  # written before the field existed
    assert TrainConfig.from_dict(saved) == TrainConfig(method="vae-noise")


@pytest.mark.parametrize("method, fixed", [("vae-noise", True), ("raven", False), ("raven-gmm", True)])
def test_noisy_pairs_are_one_fixed_copy_or_fresh_per_step(method, fixed, mnist_small, monkeypatch):
    """(B) sees the same noisy copy of an image in every epoch; per-step noise differs; both unclipped."""
    import raven.step as step_module

    seen: dict[bytes, list[torch.Tensor]] = {}
    original = step_module.method_terms

    def spy(model, config, x, partner, generator, *rest):
        for row, pair in zip(x, partner):
            seen.setdefault(row.numpy().tobytes(), []).append(pair.clone())
        return original(model, config, x, partner, generator, *rest)

    monkeypatch.setattr(step_module, "method_terms", spy)
    config = TrainConfig(method=method, epochs=2, limit=256, n_components=2,
                         pair_noise="fixed" if method == "raven-gmm" else None)
    train(config, splits=mnist_small, device="cpu")
    pairs = [seen[row.numpy().tobytes()] for row in mnist_small.train_x[:256]]
    assert all(len(p) == 2 for p in pairs)
    assert all(torch.equal(a, b) for a, b in pairs) == fixed
    assert fixed or not any(torch.equal(a, b) for a, b in pairs)
    partners = torch.stack([p[0] for p in pairs])
    assert float(partners.min()) < -0.1  # the encoder sees x~ + eps below 0 on MNIST's black background
    expected = raven.data.fixed_noisy_copy(mnist_small.train_x[:256], 0.05, config.seed)
    assert torch.equal(partners, expected) == fixed


def test_epochs_since_best_and_should_stop():
    from raven.train import epochs_since_best, should_stop

    history = [{"val_elbo": v} for v in (-500.0, -480.0, -490.0, -485.0)]
    assert epochs_since_best(history) == 2
    assert should_stop(TrainConfig(patience=2), history)
    assert not should_stop(TrainConfig(patience=3), history)
    assert not should_stop(TrainConfig(), history)


def test_early_stopping_ends_training_when_validation_stalls(monkeypatch, mnist_small):
    import raven.train as train_module

    scores = iter([-500.0, -490.0, -495.0, -496.0, -480.0, -470.0])
    monkeypatch.setattr(train_module, "validation_metrics",
                        lambda model, config, val_x: {"val_loss": 0.0, "val_elbo": next(scores), "val_mse_255": 0.0})
    result = train(TrainConfig(method="vae", epochs=6, patience=2, limit=256), splits=mnist_small, device="cpu")
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]


def test_unreadable_checkpoint_is_a_config_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable raven checkpoint"):
        raven.load_checkpoint(tmp_path)
    torch.save({"format": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="not a raven checkpoint of format 1"):
        raven.load_checkpoint(tmp_path)


def scripted_val_elbo(monkeypatch, scores: list[float]) -> None:
    """validation_metrics replaced by a fixed val_elbo sequence (training itself is untouched)."""
    import raven.train as train_module

    stream = iter(scores)
    monkeypatch.setattr(train_module, "validation_metrics",
                        lambda model, config, val_x: {"val_loss": 0.0, "val_elbo": next(stream), "val_mse_255": 0.0})


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), f"{name} differs"


def test_early_stopping_restores_the_best_epoch_before_the_checkpoint_is_written(monkeypatch, tmp_path, mnist_small):
    import json

    from raven.train import load_state

    config = TrainConfig(method="vae", epochs=6, patience=2, limit=256)
    # Independent references: the same seed trained straight for 2 and 4 epochs, no early stopping.
    after_2 = train(config.replace(epochs=2, patience=None), splits=mnist_small, device="cpu").model.state_dict()
    after_4 = train(config.replace(epochs=4, patience=None), splits=mnist_small, device="cpu").model.state_dict()
    lines, reports = [], []
    with monkeypatch.context() as m:
        scripted_val_elbo(m, [-500.0, -490.0, -495.0, -496.0])  # best at 2, stops after 4
        result = train(config, splits=mnist_small, device="cpu", out_dir=tmp_path, log=lines.append,
                       callbacks=[reports.append])
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4] and result.best_epoch == 2
    assert result.final_metrics["val_elbo"] == -490.0
    assert_same_weights(result.model.state_dict(), after_2)
    on_disk = load_state(tmp_path)
    assert on_disk["epoch"] == 4 and on_disk["best_epoch"] == 2
    assert_same_weights(on_disk["model"], after_2)
    assert_same_weights(on_disk["last_model"], after_4)  # what a resume continues from
    assert_same_weights(raven.load_checkpoint(tmp_path).state_dict(), after_2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best_epoch"] == 2 and metrics["final"]["epoch"] == 2 and len(metrics["history"]) == 4
    assert "stopped early at epoch 4: val_elbo has not improved for 2 epochs; restored epoch 2 " \
           "(best val_elbo -490.00)" in lines
    assert [(r.epoch, r.last, r.best_epoch) for r in reports] == [(1, False, 1), (2, False, 2), (3, False, 2),
                                                                  (4, True, 2)]
    assert_same_weights(reports[-1].model.state_dict(), after_2)


def test_the_best_epoch_is_kept_at_the_last_epoch_too_and_never_without_patience(monkeypatch, mnist_small):
    config = TrainConfig(method="vae", epochs=3, limit=256)
    after_2 = train(config.replace(epochs=2), splits=mnist_small, device="cpu").model.state_dict()
    after_3 = train(config, splits=mnist_small, device="cpu").model.state_dict()
    for patience, expected in ((5, after_2), (None, after_3)):
        lines = []
        with monkeypatch.context() as m:
            scripted_val_elbo(m, [-500.0, -490.0, -495.0])
            result = train(config.replace(patience=patience), splits=mnist_small, device="cpu", log=lines.append)
        assert result.best_epoch == 2 and len(result.history) == 3
        assert_same_weights(result.model.state_dict(), expected)
        assert result.final_metrics["epoch"] == (2 if patience else 3)
        assert any(line.startswith("finished at epoch 3; restored epoch 2") for line in lines) == bool(patience)


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_keeps_the_best_epoch(monkeypatch, tmp_path, mnist_small):
    from raven.train import load_state

    config = TrainConfig(method="vae", epochs=6, patience=2, limit=256)
    scores = [-500.0, -490.0, -495.0, -496.0]  # best at 2, stops after 4
    with monkeypatch.context() as m:
        scripted_val_elbo(m, scores)
        straight = train(config, splits=mnist_small, device="cpu", out_dir=tmp_path / "straight")
    after_2 = train(config.replace(epochs=2, patience=None), splits=mnist_small, device="cpu").model.state_dict()
    assert_same_weights(straight.model.state_dict(), after_2)

    def interrupt_after_3(report):
        if report.epoch == 3:
            raise Interrupted  # after epoch 3's checkpoint, which holds epoch 3's weights and epoch 2's

    # Killed mid-run after epoch 3; or a first run of 3 epochs, which ends restored to epoch 2.
    with monkeypatch.context() as m:
        scripted_val_elbo(m, scores[:3])
        with pytest.raises(Interrupted):
            train(config, splits=mnist_small, device="cpu", out_dir=tmp_path / "killed", callbacks=[interrupt_after_3])
    killed = load_state(tmp_path / "killed")
    assert killed["epoch"] == 3 and killed["best_epoch"] == 2 and "best_model" in killed
    with monkeypatch.context() as m:
        scripted_val_elbo(m, scores[:3])
        shorter = train(config.replace(epochs=3), splits=mnist_small, device="cpu", out_dir=tmp_path / "shorter")
    assert shorter.best_epoch == 2 and "last_model" in load_state(tmp_path / "shorter")
    for folder in (tmp_path / "killed", tmp_path / "shorter"):
        with monkeypatch.context() as m:
            scripted_val_elbo(m, scores[3:])
            resumed = train(config, splits=mnist_small, device="cpu", out_dir=folder)
        assert resumed.best_epoch == 2 and len(resumed.history) == 4
        assert_same_weights(resumed.model.state_dict(), after_2)
        on_disk, reference = load_state(folder), load_state(tmp_path / "straight")
        for key in ("model", "last_model"):
            assert_same_weights(on_disk[key], reference[key])
        assert torch.equal(on_disk["generator"], reference["generator"])
        assert on_disk["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
        for i, state in on_disk["optimizer"]["state"].items():
            assert_same_weights(state, reference["optimizer"]["state"][i])

    # Resumed once finished: nothing trains; without patience the last epoch's weights are kept.
    folder = tmp_path / "killed"
    again = train(config, splits=mnist_small, device="cpu", out_dir=folder)
    assert len(again.history) == 4 and again.best_epoch == 2
    assert_same_weights(again.model.state_dict(), after_2)
    last = train(config.replace(epochs=4, patience=None), splits=mnist_small, device="cpu", out_dir=folder)
    assert_same_weights(last.model.state_dict(), load_state(tmp_path / "straight")["last_model"])
    assert_same_weights(raven.load_checkpoint(folder).state_dict(), last.model.state_dict())


def test_an_older_checkpoint_without_its_best_weights_refuses_patience(monkeypatch, tmp_path, mnist_small):
    from raven.train import load_state

    config = TrainConfig(method="vae", epochs=3, limit=256)
    with monkeypatch.context() as m:
        scripted_val_elbo(m, [-500.0, -490.0, -495.0])
        train(config, splits=mnist_small, device="cpu", out_dir=tmp_path)
    state = load_state(tmp_path)
    assert state["best_epoch"] == 2 and "best_model" in state
    del state["best_model"], state["best_epoch"]  # as written before the best epoch's weights were kept
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"does not hold the weights of its best epoch \(2\)"):
        train(config.replace(patience=5), splits=mnist_small, device="cpu", out_dir=tmp_path)
    assert len(train(config, splits=mnist_small, device="cpu", out_dir=tmp_path).history) == 3
