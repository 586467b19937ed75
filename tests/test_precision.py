"""Training precision: bf16 matrix products with float32 weights and optimiser reach what float32 training reaches."""

from __future__ import annotations

import statistics

import pytest
import torch

from raven.cli import main
from raven.config import ConfigError, TrainConfig
from raven.data import DataSplits
from raven.eval.probe import encode_mean, probe_accuracy, train_linear_probe
from raven.pack import train_pack
from raven.step import build_model, make_optimizer, train_step

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def small(mnist_small) -> DataSplits:
    s = mnist_small
    return DataSplits(s.train_x[:1500], s.train_y[:1500], s.val_x[:1000], s.val_y[:1000], s.test_x[:1000],
                      s.test_y[:1000])


def trained(precision: str, splits: DataSplits) -> list[tuple[float, float]]:
    """(val_elbo, clean probe accuracy on test images) of each seed of a raven pack trained in `precision`."""
    configs = [TrainConfig(method="raven", epochs=3, seed=seed, sigma_aug=0.1, precision=precision) for seed in SEEDS]
    results = train_pack(configs, splits=splits, device="cpu", progress=False)
    outcomes = []
    for result in results:
        model = result.model.eval()
        with torch.no_grad():
            probe, _ = train_linear_probe(encode_mean(model, splits.train_x), splits.train_y)
            accuracy = probe_accuracy(probe, model, splits.test_x, splits.test_y)
        outcomes.append((result.history[-1]["val_elbo"], accuracy))
    return outcomes


def test_a_bf16_pack_reaches_the_val_elbo_and_accuracy_of_fp32_seeds(small):
    # The guard of precision "bf16": its seeds' mean lies within the spread (max - min) of the fp32 seeds of
    # their mean, for val_elbo (nats) and for the linear probe's clean accuracy.
    fp32, bf16 = trained("fp32", small), trained("bf16", small)
    for i, name in enumerate(("val_elbo", "clean accuracy")):
        reference = [outcome[i] for outcome in fp32]
        spread = max(reference) - min(reference)
        gap = abs(statistics.mean(o[i] for o in bf16) - statistics.mean(reference))
        assert spread > 0 and gap <= spread, (name, fp32, bf16)


def test_bf16_steps_keep_float32_weights_gradients_and_optimiser(mnist_small):
    x = mnist_small.train_x[:128]
    steps = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(method="raven", precision=precision)
        model = build_model(config)
        optimizer = make_optimizer(model.parameters(), config.lr)
        terms = train_step(model, optimizer, config, x, torch.Generator().manual_seed(0))
        assert all(t.dtype == torch.float32 for t in terms.values())
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values())
        steps[precision] = terms["loss"].item(), torch.cat([p.detach().flatten() for p in model.parameters()])
    # The same start and draws: bf16 products give a loss within bf16 rounding of fp32's, not the same one.
    (loss32, weights32), (loss16, weights16) = steps["fp32"], steps["bf16"]
    assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=1e-2)
    assert not torch.equal(weights16, weights32)


def test_precision_is_checked_and_is_a_flag_of_raven_train(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'fp16'"):
        TrainConfig(method="vae", precision="fp16")
    out = tmp_path / "bf16"
    assert main(["train", "--method", "vae", "--epochs", "1", "--limit", "200", "--validation-size", "100",
                 "--precision", "bf16", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["precision"] == "bf16"
