"""Packed training: every member trains exactly as its solo run, with its own guard, stop and checkpoint."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

import raven
from raven import cuda_graphs
from raven import train as train_module
from raven.cli import main
from raven.config import METHODS, ConfigError, TrainConfig
from raven.data import DataSplits
from raven.pack import PackedTrainer, check_packable, graphs_wanted, parse_seeds, train_pack
from raven.train import TrainingDiverged, build_model, load_state, train

TIMING_KEYS = ("epoch_seconds", "images_per_second")


@pytest.fixture(scope="module")
def tiny(mnist_small) -> DataSplits:
    """384 training images (3 steps of 128), 200 validation images."""
    s = mnist_small
    return DataSplits(s.train_x[:384], s.train_y[:384], s.val_x[:200], s.val_y[:200], s.test_x[:10], s.test_y[:10])


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def history_diff(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """Largest relative difference of the per-epoch metrics (timings excluded)."""
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b]
    return max(abs(x[k] - y[k]) / max(1.0, abs(x[k])) for x, y in zip(a, b) for k in x if k not in TIMING_KEYS)


def optimizer_diff(a: dict, b: dict) -> float:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    return max(max_abs_diff(a["state"][i], b["state"][i]) for i in a["state"])


def member_configs(method: str, **shared) -> list[TrainConfig]:
    """Three members that differ in seed, sigma_aug, eta, beta and the gradient cap."""
    base = TrainConfig(method=method, n_components=3, **shared)
    return [
        base.replace(seed=0, sigma_aug=0.3, beta=1.0, eta=100.0),
        base.replace(seed=1, sigma_aug=0.1, beta=0.5, eta=300.0),  # the norm cap binds here
        base.replace(seed=2, sigma_aug=tuple(0.2 + 0.05 * j for j in range(10)), beta=2.0, eta=50.0,
                     grad_clip_norm=None),
    ]


def test_stacked_radam_equals_per_member_radam():
    shapes = [(7, 5), (5,), (1,), (3, 4, 2)]
    K, steps = 3, 12  # RAdam's rectified (adaptive) phase starts at step 6
    generator = torch.Generator().manual_seed(0)
    members = [[torch.randn(s, generator=generator).requires_grad_() for s in shapes] for _ in range(K)]
    stacked = [torch.stack([m[i].detach() for m in members]).requires_grad_() for i in range(len(shapes))]
    solo_optimizers = [torch.optim.RAdam(m, lr=1e-2) for m in members]
    packed_optimizer = torch.optim.RAdam(stacked, lr=1e-2)
    for _ in range(steps):
        grads = [torch.randn((K, *s), generator=generator) * 10 for s in shapes]
        for k, (params, optimizer) in enumerate(zip(members, solo_optimizers)):
            for p, g in zip(params, grads):
                p.grad = g[k].clone()
            optimizer.step()
        for p, g in zip(stacked, grads):
            p.grad = g.clone()
        packed_optimizer.step()
    for k in range(K):
        for i, p in enumerate(stacked):
            assert torch.equal(p[k], members[k][i])
            state, solo_state = packed_optimizer.state[p], solo_optimizers[k].state[members[k][i]]
            assert torch.equal(state["exp_avg"][k], solo_state["exp_avg"])
            assert torch.equal(state["exp_avg_sq"][k], solo_state["exp_avg_sq"])
            assert float(state["step"]) == float(solo_state["step"]) == steps


@contextmanager
def torch_threads(n: int):
    """PyTorch's intra-op thread count (OpenMP, MKL) set to n inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Every method with its default pairs (a fixed noisy copy per seed for vae-noise, fresh noise
# per step for raven and raven-gmm), and the other pair_noise of two paired methods.
@pytest.mark.parametrize("method, pair_noise",
                         [(m, None) for m in METHODS] + [("raven", "fixed"), ("vae-noise", "per-step")])
def test_members_train_exactly_as_their_solo_runs(method, pair_noise, tiny):
    configs = member_configs(method, epochs=2, limit=384, pair_noise=pair_noise)

    # A pack of one is the solo loop bit for bit, whatever the thread count: the batched
    # products and per-member reductions run the same arithmetic on the same numbers.
    solo = train(configs[0], splits=tiny, device="cpu")
    (alone,) = train_pack(configs[:1], splits=tiny, device="cpu")
    for (name, a), b in zip(solo.model.state_dict().items(), alone.model.state_dict().values()):
        assert torch.equal(a, b), f"{method}: {name} differs in a pack of one"
    assert [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in alone.history] == \
           [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in solo.history]

    # A pack of K is K solo runs bit for bit with one thread, pinned here. With more, a few
    # reductions are split across threads one way for one member's (N, ...) tensor and
    # another way for K members at once: MKL splits the contraction of some single sgemms
    # (the decoder's last layer, grad (128, 784) times W (784, 500), at 2 threads) but runs
    # each matrix of a bmm on one thread, and ATen splits a PReLU slope's gradient (a sum over
    # the whole (N, 500) input) by thread. That is float rounding, and stays so for the
    # methods whose step is smooth in it, but the Smooth Encoder's partner is PGD on
    # sign(gradient): a pixel whose gradient is within rounding of zero steps by +-2.5 eps/steps
    # (0.05) one way in the solo run and the other way (or not at all) in the pack, and the two
    # runs go on as different trajectories (2e-5 in the parameters after 6 steps, seed 0, at 2
    # threads; 0 at one thread), which no rounding bound covers.
    with torch_threads(1):
        solos = [train(c, splits=tiny, device="cpu") for c in configs]
        packed = train_pack(configs, splits=tiny, device="cpu")
    # Validation metrics come from the unpacked member through the solo code, so they are
    # equal with the parameters. The training losses are the pack's own step terms; one
    # differs: where the members' eta differ, the pack takes the Smooth Encoder's constant
    # (d/2) log(1 + 2 eta) from a float32 tensor of etas and a solo run from a Python float
    # (computed in double), one float32 ulp apart (1.9e-6 at d = 10, eta = 50-300). It moves
    # no gradient, only the reported train_kl and train_loss.
    shifted = ("train_kl", "train_loss") if method == "se" else ()
    for solo, member in zip(solos, packed):
        assert member.config == solo.config and member.diverged is None
        for (name, a), b in zip(solo.model.state_dict().items(), member.model.state_dict().values()):
            assert torch.equal(a, b), f"{method}, seed {solo.config.seed}: {name} differs in a pack of 3"
        assert [{k: v for k, v in h.items() if k not in TIMING_KEYS + shifted} for h in member.history] == \
               [{k: v for k, v in h.items() if k not in TIMING_KEYS + shifted} for h in solo.history]
        assert history_diff(solo.history, member.history) < 1e-5


def test_a_diverging_member_stops_and_the_others_go_on(tiny, tmp_path):
    # Without the norm cap, RAdam's unadapted first steps blow RAVEN up at sigma_aug 0.01
    # (TrainConfig's docstring): a real divergence, in epoch 2 with 2 steps per epoch.
    base = TrainConfig(method="raven", sigma_aug=0.01, epochs=3, limit=256)
    wild, tame = base.replace(seed=0, grad_clip_norm=None), base.replace(seed=1)
    with pytest.raises(TrainingDiverged) as solo_error:
        train(wild, splits=tiny, device="cpu", out_dir=tmp_path / "solo-wild")
    solo_tame = train(tame, splits=tiny, device="cpu")

    dirs = [tmp_path / "pack-wild", tmp_path / "pack-tame"]
    lines: list[str] = []
    wild_result, tame_result = train_pack([wild, tame], splits=tiny, device="cpu", out_dirs=dirs, log=lines.append)
    assert wild_result.diverged == str(solo_error.value).replace(str(tmp_path / "solo-wild"), str(dirs[0]))
    assert "at epoch 2, step 2 of 2" in wild_result.diverged
    assert any("seed 0: training diverged" in line for line in lines)
    # Its last good checkpoint (epoch 1) stays, equal to the solo run's, and is its result.
    kept, solo_kept = load_state(dirs[0]), load_state(tmp_path / "solo-wild")
    assert kept["epoch"] == solo_kept["epoch"] == 1 and len(wild_result.history) == 1
    assert max_abs_diff(kept["model"], solo_kept["model"]) < 1e-5
    assert max_abs_diff(kept["model"], wild_result.model.state_dict()) == 0.0
    assert all(torch.isfinite(t).all() for t in wild_result.model.state_dict().values())
    # The other member never noticed.
    assert tame_result.diverged is None and len(tame_result.history) == 3
    assert max_abs_diff(solo_tame.model.state_dict(), tame_result.model.state_dict()) < 1e-5


@contextmanager
def scripted_validation(monkeypatch, scores_by_seed: dict[int, list[float]]):
    """validation_metrics replaced by a fixed val_elbo sequence per seed (fresh for each run)."""
    streams = {seed: iter(scores) for seed, scores in scores_by_seed.items()}

    def fake(model, config, val_x):
        return {"val_loss": 0.0, "val_elbo": next(streams[config.seed]), "val_mse_255": 0.0}

    monkeypatch.setattr(train_module, "validation_metrics", fake)  # the one loop, solo and packed
    yield


def test_early_stopped_member_is_frozen_while_the_others_train_on(monkeypatch, tiny, tmp_path):
    scores = {0: [-500.0, -490.0, -495.0, -496.0, -480.0, -470.0],  # stalls: stops after epoch 4
              1: [-500.0, -490.0, -480.0, -470.0, -460.0, -450.0]}  # improves every epoch
    configs = [TrainConfig(method="vae", epochs=6, patience=2, limit=128, seed=seed) for seed in (0, 1)]
    solos = []
    for config in configs:
        with scripted_validation(monkeypatch, scores):
            solos.append(train(config, splits=tiny, device="cpu", out_dir=tmp_path / f"solo-{config.seed}"))
    epochs_per_report: list[list[int]] = []
    with scripted_validation(monkeypatch, scores):
        packed = train_pack(configs, splits=tiny, device="cpu", out_dirs=[tmp_path / "p0", tmp_path / "p1"],
                            pack_callbacks=[lambda reports: epochs_per_report.append([r.config.seed for r in reports])])
    assert [h["epoch"] for h in packed[0].history] == [1, 2, 3, 4]
    assert [h["epoch"] for h in packed[1].history] == [1, 2, 3, 4, 5, 6]
    assert epochs_per_report == [[0, 1]] * 4 + [[1]] * 2
    for k, solo in enumerate(solos):
        kept, solo_kept = load_state(tmp_path / f"p{k}"), load_state(tmp_path / f"solo-{k}")
        assert kept["epoch"] == solo_kept["epoch"] == len(solo.history)
        assert max_abs_diff(kept["model"], solo_kept["model"]) < 1e-5
        assert optimizer_diff(kept["optimizer"], solo_kept["optimizer"]) < 1e-5
        assert torch.equal(kept["generator"], solo_kept["generator"])
        assert ("last_model" in kept) == ("last_model" in solo_kept) == (k == 0)
        assert max_abs_diff(kept.get("last_model", kept["model"]), solo_kept.get("last_model", solo_kept["model"])) \
            < 1e-5  # the last epoch's weights, which a resume continues from
    # Member 0 stopped and holds its best epoch (2), as its solo run does: the same seed trained 2 epochs
    # straight; member 1 improved to its end and holds its last.
    assert [r.best_epoch for r in packed] == [s.best_epoch for s in solos] == [2, 6]
    assert load_state(tmp_path / "p0")["best_epoch"] == 2 and "last_model" not in load_state(tmp_path / "p1")
    two_epochs = train(configs[0].replace(epochs=2, patience=None), splits=tiny, device="cpu")
    assert max_abs_diff(packed[0].model.state_dict(), two_epochs.model.state_dict()) < 1e-5
    assert max_abs_diff(solos[0].model.state_dict(), two_epochs.model.state_dict()) == 0.0
    # The stopped member's result is its checkpoint.
    assert max_abs_diff(load_state(tmp_path / "p0")["model"], packed[0].model.state_dict()) == 0.0


def test_checkpoints_unpack_and_resume_exactly(tiny, tmp_path):
    configs = [TrainConfig(method="raven", sigma_aug=sigma, epochs=3, limit=256, seed=seed)
               for seed, sigma in ((3, 0.2), (4, 0.05))]
    straight = train_pack(configs, splits=tiny, device="cpu")
    dirs = [tmp_path / "m0", tmp_path / "m1"]

    # Pack for one epoch, then resume the pack: identical to the straight run.
    train_pack([c.replace(epochs=1) for c in configs], splits=tiny, device="cpu", out_dirs=dirs)
    for d, config in zip(dirs, configs):
        loaded = raven.load_checkpoint(d)  # an ordinary checkpoint
        assert loaded.config == config.replace(epochs=1) and len(loaded.history) == 1
    resumed = train_pack([c.replace(epochs=2) for c in configs], splits=tiny, device="cpu", out_dirs=dirs)
    # Member 0 goes one epoch further alone with the solo loop; member 1 then rejoins it
    # from an earlier epoch, and the pack trains member 1 alone until they are level.
    solo = train(configs[0], splits=tiny, device="cpu", out_dir=dirs[0])
    assert len(resumed[0].history) == 2 and len(solo.history) == 3
    final = train_pack(configs, splits=tiny, device="cpu", out_dirs=dirs)
    assert [len(r.history) for r in final] == [3, 3]
    for a, b in zip(straight, final):
        assert max_abs_diff(a.model.state_dict(), b.model.state_dict()) < 1e-5
        assert history_diff(a.history, b.history) < 1e-5
    assert max_abs_diff(straight[0].model.state_dict(), solo.model.state_dict()) < 1e-5
    # The pack itself replays exactly: pack 1 + resume 1 equals pack 2 bit for bit.
    twice = train_pack([c.replace(epochs=2) for c in configs], splits=tiny, device="cpu")
    for a, b in zip(twice, resumed):
        assert max_abs_diff(a.model.state_dict(), b.model.state_dict()) == 0.0


@pytest.mark.parametrize(
    "change, field",
    [({"method": "vae"}, "method"), ({"batch_size": 64}, "batch_size"), ({"lr": 1e-4}, "lr"),
     ({"latent_dim": 8, "sigma_aug": 0.1}, "latent_dim"), ({"limit": 100}, "limit"),
     ({"noise_std": 0.1}, "noise_std")],
)
def test_configs_that_cannot_share_a_step_are_rejected(change, field):
    base = TrainConfig(method="raven")
    with pytest.raises(ConfigError, match=rf"must share {field} .*; only .* may differ") as caught:
        check_packable([base, base.replace(seed=1, **change)])
    allowed = str(caught.value).split("; only ")[1].removesuffix(" may differ").split(", ")
    assert {"seed", "sigma_aug", "eta", "beta", "grad_clip_norm", "epochs", "patience"} <= set(allowed)
    check_packable([base, base.replace(seed=1, sigma_aug=0.5, beta=2.0, eta=10.0, epochs=3, patience=2,
                                       grad_clip_norm=None)])


def test_seed_lists_and_ranges():
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("0,2,5") == (0, 2, 5)
    assert parse_seeds("7, 1-2") == (7, 1, 2)
    for bad in ("3-1", "a", "", "1,1", "-1", "0-2,2"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


def test_cuda_graphs_are_never_used_on_cpu():
    assert graphs_wanted(torch.device("cpu"), None) is False
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device"):
        graphs_wanted(torch.device("cpu"), True)


def test_train_seeds_command_writes_one_checkpoint_per_seed(tmp_path, data_dir, capsys):
    out = tmp_path / "vae"
    common = ["--method", "vae", "--limit", "128", "--epochs", "1", "--data-dir", str(data_dir), "--device", "cpu"]
    assert main(["train", *common, "--seeds", "0,2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["seed-0", "seed-2"]
    assert main(["train", *common, "--seed", "2", "--out", str(tmp_path / "solo")]) == 0
    packed, solo = raven.load_checkpoint(out / "seed-2"), raven.load_checkpoint(tmp_path / "solo")
    assert packed.config == solo.config and packed.config.seed == 2
    assert max_abs_diff(packed.state_dict(), solo.state_dict()) < 1e-5
    assert "seed-0: val_elbo" in capsys.readouterr().out
    assert main(["train", *common, "--seeds", "2-0", "--out", str(tmp_path / "never")]) == 2
    assert "raven: error: --seeds" in capsys.readouterr().err and not (tmp_path / "never").exists()


@pytest.mark.parametrize("fail_capture", [False, True])
def test_graphed_steps_replay_the_eager_steps(monkeypatch, tiny, fail_capture):
    """The CUDA-graph plumbing (warm-up, static batch indices, replay, fallback), simulated on CPU:
    a capture records the step and runs nothing, a replay runs the recorded step."""
    configs = member_configs("raven", epochs=2, limit=320)[:2]  # steps of 128, 128 and 64 images
    eager = train_pack(configs, splits=tiny, device="cpu")
    capture: dict = {"on": False}
    replays = []

    class Graph:
        def register_generator_state(self, generator):
            pass

        def replay(self):
            replays.append(1)
            self.step()

    @contextmanager
    def graph(g):
        capture["on"] = True
        try:
            yield
        finally:
            capture["on"] = False
        if fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        index = capture["index"]
        g.step = lambda: real_step(index)

    class Stream:
        def wait_stream(self, other):
            pass

    @contextmanager
    def stream(s):
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(cuda_graphs, "GRAPH_WARMUP_STEPS", 2)
    trainer = PackedTrainer(configs, tiny.train_x[:320], [build_model(c) for c in configs],
                            [torch.Generator().manual_seed(c.seed) for c in configs], [None, None], cuda_graphs=True)
    real_step = trainer._graphs.step_fn

    def step(index):
        if capture["on"]:
            capture["index"] = index
        else:
            real_step(index)

    trainer._graphs.step_fn = step
    for _ in range(2):
        trainer.train_epoch(128)
    # 4 full batches: 2 warm-up, 1 captured and replayed at once, 1 replayed; the 64s stay eager.
    assert len(replays) == (0 if fail_capture else 2)
    for k, member in enumerate(eager):
        assert max_abs_diff(member.model.state_dict(), trainer.model.member_state_dict(k)) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["raven", "se"])
def test_cuda_graph_pack_matches_solo_runs_on_gpu(method, tiny):
    configs = member_configs(method, epochs=2, limit=320)  # graphs for the 128s, eager 64s
    splits = tiny.to("cuda")
    solos = [train(c, splits=splits, device="cuda") for c in configs]
    graphed = train_pack(configs, splits=splits, device="cuda", cuda_graphs=True)
    eager = train_pack(configs, splits=splits, device="cuda", cuda_graphs=False)
    for solo, g, e in zip(solos, graphed, eager):
        assert max_abs_diff(solo.model.state_dict(), g.model.state_dict()) < 1e-5
        assert max_abs_diff(solo.model.state_dict(), e.model.state_dict()) < 1e-5
        assert history_diff(solo.history, g.history) < 1e-4
        assert math.isfinite(g.history[-1]["val_elbo"])
