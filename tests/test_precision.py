"""Precision: bf16 training (float32 weights and optimiser) reaches what float32 training reaches, and bf16 attacks
(float32 verdicts) fool as many images as float32 attacks."""

from __future__ import annotations

import statistics

import pytest
import torch

from raven.cli import main
from raven.config import ConfigError, TrainConfig
from raven.data import DataSplits
from raven.eval.attacks import attack, dissimilarity, survives
from raven.eval.evaluate import EvalConfig
from raven.eval.probe import encode_mean, probe_accuracy, train_linear_probe
from raven.pack import train_pack
from raven.step import build_model, make_optimizer, train_step
from raven.train import train

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


@pytest.fixture
def native_bf16(monkeypatch):
    """Set whether this CPU multiplies bf16 in hardware (raven.step asks oneDNN once per process)."""
    import raven.step

    def set_native(native: bool) -> None:
        raven.step._native.cache_clear()
        raven.step._warn_once.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)

    yield set_native
    raven.step._native.cache_clear()
    raven.step._warn_once.cache_clear()


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bfloat16_is_warned_once(native_bf16, mnist_small, recwarn, native):
    """On an AVX2 CPU torch emulates bf16 (8x slower than fp32 in the products measured here): a bf16 training
    step or attack there warns once, in one line; on a CPU with AVX-512 BF16 or AMX, or in fp32, nothing."""
    native_bf16(native)
    x = mnist_small.train_x[:64]
    for precision in ("fp32", "bf16"):
        config = TrainConfig(method="vae", precision=precision)
        model = build_model(config)
        optimizer = make_optimizer(model.parameters(), config.lr)
        for _ in range(2):
            train_step(model, optimizer, config, x, torch.Generator().manual_seed(0))
        attack(model, x[:8], 0.05, "kl", steps=2, precision=precision)
    slow = [w for w in recwarn.list if issubclass(w.category, RuntimeWarning) and "bf16" in str(w.message)]
    if native:
        assert not slow
    else:
        assert len(slow) == 1 and "\n" not in str(slow[0].message)
        assert "without native bfloat16" in str(slow[0].message) and "--precision fp32" in str(slow[0].message)


def test_precision_is_checked_and_is_a_flag_of_raven_train(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'fp16'"):
        TrainConfig(method="vae", precision="fp16")
    out = tmp_path / "bf16"
    assert main(["train", "--method", "vae", "--epochs", "1", "--limit", "200", "--validation-size", "100",
                 "--precision", "bf16", "--data-dir", str(data_dir), "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["config"]["precision"] == "bf16"


@pytest.fixture(scope="module")
def attacked(small):
    """A VAE trained for 2 epochs on 1,500 images, its probe, and 1,000 test images."""
    model = train(TrainConfig(method="vae", epochs=2), splits=small, device="cpu", progress=False).model.eval()
    probe, _ = train_linear_probe(encode_mean(model, small.train_x), small.train_y)
    return model, probe, small.test_x, small.test_y


def test_bf16_attacks_fool_no_fewer_images_than_fp32_within_half_a_point(attacked):
    # The guard of EvalConfig.precision "bf16": the paper's KL attack and the strong protocol's per-iterate PGD.
    model, probe, x, y = attacked
    fooled = {}
    for precision in ("fp32", "bf16"):
        out = attack(model, x, 0.1, "kl", probe=probe, y=y, generator=torch.Generator().manual_seed(0),
                     precision=precision)
        alive = survives(model, probe, x, y, 0.05, "kl", steps=50, generator=torch.Generator().manual_seed(0),
                         precision=precision)
        fooled[precision] = (1 - out.correct.double().mean().item(), 1 - alive.double().mean().item())
    (paper32, strong32), (paper16, strong16) = fooled["fp32"], fooled["bf16"]
    assert 0.1 < paper32 < 0.9 and 0.1 < strong32 < 0.9, fooled  # both attacks bite, and not on every image
    assert paper16 >= paper32 - 0.005 and strong16 >= strong32 - 0.005, fooled


def test_bf16_attack_verdicts_are_float32_on_the_exact_image(attacked):
    model, probe, x, y = attacked
    x, y = x[:300], y[:300]
    out = attack(model, x, 0.1, "w2", probe=probe, y=y, generator=torch.Generator().manual_seed(1), precision="bf16")
    assert out.x_adv.dtype == torch.float32
    assert (out.x_adv - x).abs().max() <= 0.1 + 1e-6 and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    with torch.no_grad():
        mu, logvar = model.encoder(x)
        mu_adv, logvar_adv = model.encoder(out.x_adv)
        assert torch.equal(out.correct, probe(mu_adv).argmax(dim=1) == y)
        assert torch.equal(out.dissimilarity, dissimilarity("w2", mu, logvar, mu_adv, logvar_adv))


def test_evaluation_precision_is_checked_and_reaches_the_strong_protocol():
    assert EvalConfig(precision="bf16").strong.precision == "bf16"
    assert EvalConfig().strong.precision == "fp32"
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'half'"):
        EvalConfig(precision="half")


def test_precision_reaches_training_and_evaluation_from_the_reproduction_and_the_sweeps():
    from raven.reproduce.grid import Budget, Cell, default_hyperparameters, eval_config, train_config
    from raven.sweep.spec import SweepSpec
    from raven.sweep.space import SearchSpace

    cell, budget = Cell("mnist", "raven", 0), Budget(precision="bf16")
    hp = default_hyperparameters("mnist", "test")
    assert train_config(cell, budget, hp).precision == "bf16"
    assert (eval_config(cell, budget).precision, eval_config(cell, budget).strong.precision) == ("bf16", "bf16")
    assert "bf16 training and attacks (full: fp32)" in budget.describe()
    assert train_config(cell, Budget(), hp).precision == eval_config(cell, Budget()).precision == "fp32"
    spec = SweepSpec(kind="sigma_aug", method="raven", space=SearchSpace.log_uniform("sigma_aug", 1e-3, 1.0),
                     precision="bf16")
    assert spec.train_config(0.1).precision == "bf16" and spec.eval_config.precision == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16"):
        Budget(precision="fp16")


def test_a_part_or_a_kept_evaluation_written_before_the_precision_field_still_matches():
    """Parts and kept seed records of a run that started before a field existed compare at that field's default."""
    import dataclasses
    import json

    from raven.reproduce.grid import FULL_BUDGET, _comparable, _with_defaults
    from raven.reproduce.parts import same_budget

    older = {k: v for k, v in FULL_BUDGET.params().items() if k != "budget.precision"}
    assert same_budget(older, FULL_BUDGET.params())
    assert not same_budget(older, dataclasses.replace(FULL_BUDGET, precision="bf16").params())
    saved = json.loads(json.dumps(_comparable(EvalConfig(limit=100))))
    del saved["precision"], saved["strong"]["precision"]
    assert _with_defaults(saved, _comparable(EvalConfig())) == _comparable(EvalConfig(limit=100))
    assert _with_defaults(saved, _comparable(EvalConfig())) != _comparable(EvalConfig(limit=100, precision="bf16"))
