"""The pack evaluation: every member's probe and paper attacks, in one batched pass, equal its solo evaluation."""

from __future__ import annotations

import pytest
import torch

from raven.config import ConfigError, TrainConfig
from raven.data import DataSplits
from raven.eval.evaluate import EvalConfig, evaluate_model, probe_and_attack
from raven.eval.pack_eval import pack_probe_and_attack
from raven.eval.protocols import StrongConfig
from raven.models import RavenModel
from raven.pack import train_pack

ATTACKS = ("kl", "w2", "ce", "rkl", "mean")


@pytest.fixture(autouse=True)
def one_thread():
    """The claim under test is bitwise equality with one thread (as the reproduction's tasks run); with more,
    BLAS may split a product differently and a sign step of PGD may flip."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pack(mnist_small):
    """Two RAVEN members (seeds 0 and 1, sigma_aug 0.3 and 0.1) trained 1 epoch as one pack on 1000 images."""
    s = mnist_small
    splits = DataSplits(s.train_x[:1000], s.train_y[:1000], s.val_x[:200], s.val_y[:200], s.test_x[:64],
                        s.test_y[:64])
    base = TrainConfig(method="raven", epochs=1, patience=None)
    results = train_pack([base.replace(seed=0, sigma_aug=0.3), base.replace(seed=1, sigma_aug=0.1)], splits=splits,
                         device="cpu", progress=False)
    return [r.model for r in results], splits


def settings(seed: int) -> EvalConfig:
    """All five attacks, 2 deltas, 5 steps, 2 restarts; chunks of 40 so that 64 images make an uneven last chunk."""
    return EvalConfig(attacks=ATTACKS, deltas=(0.05, 0.1), steps=5, restarts=2, seed=seed, batch_size=40, fid=False,
                      tsne=False)


def test_each_member_of_a_pack_gets_its_solo_probe_and_attack(pack):
    models, splits = pack
    configs = [settings(0), settings(1)]
    packed = pack_probe_and_attack(models, splits.train_x, splits.train_y, splits.test_x, splits.test_y, configs)
    for model, config, result in zip(models, configs, packed):
        solo = probe_and_attack(model, splits.train_x, splits.train_y, splits.test_x, splits.test_y, config)
        # The same products, the same starts, the same steps: with one thread, the same numbers.
        assert result["clean_accuracy"] == solo["clean_accuracy"]
        assert result["probe"] == solo["probe"]
        assert result["adversarial_accuracy"] == solo["adversarial_accuracy"]
        assert result["adversarial_robust_accuracy"] == solo["adversarial_robust_accuracy"]
        for kind in ATTACKS:
            assert result["attack_dissimilarity"][kind] == pytest.approx(solo["attack_dissimilarity"][kind],
                                                                         rel=1e-5), kind
        assert result["images"] == solo["images"] == 64 and result["strong"] is None
    # The members are different models (sigma_aug 0.3 and 0.1), and the attack moves each.
    assert packed[0]["attack_dissimilarity"] != packed[1]["attack_dissimilarity"]
    assert all(v > 0 for r in packed for kind in ATTACKS for v in r["attack_dissimilarity"][kind].values())


def test_each_member_draws_its_starts_from_its_own_seed(pack):
    """Swapping the members' seeds changes their random starts, hence their numbers: member k follows configs[k]."""
    models, splits = pack
    configs = [settings(0).replace(attacks=("kl",)), settings(1).replace(attacks=("kl",))]
    args = (models, splits.train_x, splits.train_y, splits.test_x, splits.test_y)
    straight = pack_probe_and_attack(*args, configs)
    swapped = pack_probe_and_attack(*args, configs[::-1])
    solo = probe_and_attack(models[0], *args[1:], configs[1])
    assert swapped[0]["attack_dissimilarity"]["kl"] == pytest.approx(solo["attack_dissimilarity"]["kl"], rel=1e-5)
    assert swapped[0]["attack_dissimilarity"]["kl"] != pytest.approx(straight[0]["attack_dissimilarity"]["kl"],
                                                                     rel=1e-3)


def test_members_that_cannot_be_packed_are_rejected(pack):
    models, splits = pack
    args = (splits.train_x, splits.train_y, splits.test_x, splits.test_y)
    other = RavenModel(latent_dim=5)
    with pytest.raises(ConfigError, match="architecture") as error:
        pack_probe_and_attack([models[0], other], *args, [settings(0), settings(1)])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="must share the evaluation's steps") as error:
        pack_probe_and_attack(models, *args, [settings(0), settings(1).replace(steps=6)])
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="paper's protocol"):
        pack_probe_and_attack(models, *args, [settings(0), settings(1).replace(protocol="strong")])


def test_evaluate_model_on_a_pack_stage_equals_its_solo_evaluation(pack):
    """evaluate_model with a member's stage (no probe fit, no paper attacks of its own) reports what it reports
    alone, the strong protocol included, attacked through the stage's probe."""
    models, splits = pack
    strong = StrongConfig(attacks=("ce", "mean"), steps=3, restarts=1, autoattack=False, convergence=False)
    configs = [settings(k).replace(protocol="both", strong=strong) for k in range(2)]
    stages = pack_probe_and_attack(models, splits.train_x, splits.train_y, splits.test_x, splits.test_y, configs)
    for model, config, stage in zip(models, configs, stages):
        packed = evaluate_model(model, splits, config, stage=stage)
        solo = evaluate_model(model, splits, config)
        assert packed.metrics() == pytest.approx(solo.metrics(), rel=1e-5, abs=1e-9)
        assert packed.robust_accuracy == solo.robust_accuracy and packed.settings["probe"] == solo.settings["probe"]
