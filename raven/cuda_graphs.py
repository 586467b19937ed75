"""A training step replayed from CUDA graphs: one launch per step instead of a few hundred.

raven.pack's trainer runs its step through `GraphedStep` on CUDA: one graph per batch shape,
each captured after a few eager warm-up steps on a side stream, then replayed. Each member's
generator is registered with every graph (CUDAGraph.register_generator_state), so a replay
draws from the members' Philox streams at the offsets eager steps would use and their states
keep advancing as in a solo run. The optimiser must keep its step count on the device
(RAdam's capturable=True). A capture that fails falls back to eager steps with a log line;
RAVEN_CUDA_GRAPHS=0 (or cuda_graphs=False) turns graphs off. The CPU never uses them.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Callable

import torch
from torch import nn

from raven.config import ConfigError

# Eager steps of a batch shape before its CUDA graph is captured (lazy initialisation of
# cuBLAS and the autograd engine must happen outside a capture).
GRAPH_WARMUP_STEPS = 3
GRAPHS_ENV = "RAVEN_CUDA_GRAPHS"


class GraphedStep:
    """Runs a step function from CUDA graphs, one per batch shape, each captured after
    GRAPH_WARMUP_STEPS eager steps of its shape on a side stream. Capture executes nothing,
    so the first replay right after it is that step; eager and replayed steps update the
    same tensors in place and may alternate (the epoch's last, smaller batch)."""

    def __init__(self, step: Callable[[torch.Tensor], None], generators: list[torch.Generator],
                 parameters: list[nn.Parameter], log: Callable[[str], None] | None) -> None:
        self.step_fn = step
        self.generators = generators
        self.parameters = parameters
        self.log = log
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager_steps: Counter[tuple[int, ...]] = Counter()
        self.failed = False
        self.side = torch.cuda.Stream()

    def _eager(self, index: torch.Tensor) -> None:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            self.step_fn(index)
        torch.cuda.current_stream().wait_stream(self.side)

    def __call__(self, index: torch.Tensor) -> None:
        key = tuple(index.shape)
        if key in self.graphs:
            graph, static_index = self.graphs[key]
            static_index.copy_(index)
            graph.replay()
            return
        if self.failed or self.eager_steps[key] < GRAPH_WARMUP_STEPS:
            self.eager_steps[key] += 1
            self._eager(index)
            return
        static_index = index.clone()
        graph = torch.cuda.CUDAGraph()
        states = [g.get_state() for g in self.generators]
        for p in self.parameters:
            # The captured backward then allocates the gradients in the graph's own memory.
            p.grad = None
        try:
            for g in self.generators:
                graph.register_generator_state(g)
            with torch.cuda.graph(graph):
                self.step_fn(static_index)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to the same steps, eagerly
            self.failed = True
            for g, state in zip(self.generators, states):
                g.set_state(state)
            if self.log:
                self.log(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "training this pack eagerly")
            self._eager(index)
            return
        self.graphs[key] = (graph, static_index)
        graph.replay()


def graphs_wanted(device: torch.device, cuda_graphs: bool | None) -> bool:
    """cuda_graphs None: on for CUDA unless RAVEN_CUDA_GRAPHS=0; never on CPU."""
    if cuda_graphs is None:
        return device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"
    if cuda_graphs and device.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device, not {device}")
    return cuda_graphs
