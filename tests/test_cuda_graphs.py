"""A pack's training step can be captured in a CUDA graph: inside the step no tensor is made from Python
numbers (capture rejects the host-to-device copy and the step silently falls back to eager steps), checked on
CPU; on a GPU, a graph is captured for packs whose members share sigma_aug and for packs whose members differ,
and its replays match the eager steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import raven
from raven.config import TrainConfig
from raven.data import DataSplits
from raven.pack import PackedTrainer
from raven.step import build_model

# Functions that copy Python data into a new tensor: on CUDA a host-to-device copy, which a capture rejects.
FROM_HOST = {"tensor", "as_tensor", "asarray", "scalar_tensor", "from_numpy"}
RAVEN = Path(raven.__file__).parent


class HostTensors(TorchFunctionMode):
    """Records every tensor raven's code creates from Python data (not from a tensor) while it is active.

    Only calls made from raven's own files count: torch's RAdam without capturable=True (the only kind the CPU
    runs) wraps 1.0 in a CPU tensor to count steps, a path the capturable RAdam of a CUDA graph does not take."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        caller = sys._getframe(1).f_code  # the Python function that called torch.<name>
        if (name in FROM_HOST and args and not isinstance(args[0], torch.Tensor)
                and Path(caller.co_filename).is_relative_to(RAVEN)):
            self.created.append(f"torch.{name}({args[0]!r}) in {caller.co_name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tiny(mnist_small) -> DataSplits:
    s = mnist_small
    return DataSplits(s.train_x[:256], s.train_y[:256], s.val_x[:100], s.val_y[:100], s.test_x[:10], s.test_y[:10])


def pack_configs(method: str, sigma_augs: list) -> list[TrainConfig]:
    base = TrainConfig(method=method, n_components=3, se_steps=2)
    return [base.replace(seed=seed, sigma_aug=sigma_aug) for seed, sigma_aug in enumerate(sigma_augs)]


SHARED = [0.3, 0.3]
DIFFERING = [0.3, 0.1]
PER_DIMENSION = [tuple(0.2 + 0.05 * j for j in range(10))] * 2
PACKS = [("raven", SHARED), ("raven", DIFFERING), ("raven", PER_DIMENSION), ("raven-gmm", SHARED),
         ("raven-gmm", DIFFERING), ("vae", SHARED), ("vae-noise", SHARED), ("se", SHARED), ("beta-tcvae", SHARED)]


def trainer_for(configs: list[TrainConfig], splits: DataSplits, device: str, cuda_graphs: bool) -> PackedTrainer:
    train_x = splits.train_x.to(device)
    generators = [torch.Generator(device=device).manual_seed(c.seed) for c in configs]
    return PackedTrainer(configs, train_x, [build_model(c) for c in configs], generators, [None] * len(configs),
                         cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("method, sigma_augs", PACKS)
def test_the_step_to_capture_creates_no_tensor_from_python_numbers(method, sigma_augs, tiny):
    trainer = trainer_for(pack_configs(method, sigma_augs), tiny, "cpu", cuda_graphs=False)
    index = torch.stack([torch.arange(64), torch.arange(64, 128)])
    trainer.step(index)  # the warm-up steps before a capture may set things up
    with HostTensors() as mode:
        trainer.step(index)  # what GraphedStep captures: PackedTrainer._step
    assert mode.created == [], f"{method}: the step makes tensors from Python data: {mode.created}"


def test_the_check_sees_a_setting_turned_into_a_tensor_inside_the_step(tiny, monkeypatch):
    # The old PackSettings kept a shared sigma_aug as a float, which aug_variance turned into a tensor per step.
    trainer = trainer_for(pack_configs("raven", SHARED), tiny, "cpu", cuda_graphs=False)
    monkeypatch.setattr(trainer.settings, "sigma_aug", 0.3)
    with HostTensors() as mode:
        trainer.step(torch.stack([torch.arange(64), torch.arange(64, 128)]))
    assert mode.created == ["torch.as_tensor(0.3) in aug_variance"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sigma_augs", [SHARED, DIFFERING], ids=["shared", "differing"])
def test_a_graph_is_captured_and_its_replays_match_eager_steps_on_gpu(sigma_augs, tiny):
    configs = pack_configs("raven", sigma_augs)
    graphed = trainer_for(configs, tiny, "cuda", cuda_graphs=True)
    eager = trainer_for(configs, tiny, "cuda", cuda_graphs=False)
    assert not graphed._graphs.failed
    for _ in range(2):  # two epochs of 4 steps: 3 eager warm-up steps, the capture, then replays
        graphed.train_epoch(64)
        eager.train_epoch(64)
    assert not graphed._graphs.failed and list(graphed._graphs.graphs) == [(2, 64)]
    for name, value in eager.model.state_dict().items():
        assert torch.allclose(graphed.model.state_dict()[name], value, rtol=0, atol=1e-5), name
    for name, value in eager.totals.items():
        assert torch.allclose(graphed.totals[name], value, rtol=1e-5, atol=1e-5), name
