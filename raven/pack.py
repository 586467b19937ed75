"""Packed training: the K seeds (or settings) of one configuration trained as one model.

Each member is an ordinary run: its model is initialised exactly as `build_model(config)`
of its seed, it has its own torch.Generator (batch order, pixel noise, PGD start,
reparameterisation), its own fixed noisy copy of the training set where its method uses
one (`training_noisy_copy` of its seed, indexed by its own batch order), its own sigma_aug,
eta and beta, its own gradient-norm cap, NaN guard, early stopping and checkpoint. What
the members share is the arithmetic: every Linear layer of the K models is one batched
matrix product over weights of shape (K, out, in), every PReLU one elementwise select,
and one RAdam steps the stacked parameters (RAdam is elementwise, so that equals K
separate RAdams). The step is the solo run's own: the random numbers are
`raven.step.partner_noise` and `latent_noise`, drawn member by member from each
member's generator in the solo order and stacked, and the partner and the objective are
`raven.step.make_partner` and `step_terms`, run on (K, batch, 784) tensors, so a member
of a pack trains exactly as it would alone:

- on CPU a pack of 1 is bitwise the solo loop; a pack of K is bitwise K solo runs with one
  thread, and differs by float rounding with more: a few sums are split across threads one
  way for one model and another way for K (MKL splits the contraction of some single
  matrix products across threads but gives each matrix of a batched product one thread;
  a PReLU slope's gradient sums the whole (N, P) input). For the Smooth Encoder that
  rounding does not stay rounding: its partner is PGD along sign(gradient), so a pixel
  whose gradient is within rounding of zero moves by a whole step in one run and not (or
  the other way) in the other, and the member follows a different trajectory from its solo
  run (2e-5 in the parameters after 6 steps at 2 threads in tests/test_pack.py). Set
  torch.set_num_threads(1) to reproduce SE solo runs from a pack bit for bit;
- each member unpacks to DIR/checkpoint.pt + DIR/metrics.json in the solo format, so
  `raven.load_checkpoint`, `raven evaluate` and `raven.train.train` (resume) read it, and
  a pack resumes from its members' checkpoints (or solo ones) exactly.

The epoch loop is the solo run's too (raven.train.train_members, with `PackedTrainer`
running the steps): members leave the pack when they stop early, finish their epochs or
diverge, and the rest are repacked. A member that leaves keeps its parameters and optimizer
state exactly as they were, except that with early stopping on its parameters become those of
its best val_elbo epoch, as in its solo run (the loop keeps a CPU copy of each member's best
weights, unpacked from the stack). Members resumed at different epochs join when the pack
reaches theirs. Only the seed and
PER_MEMBER_FIELDS may differ inside a pack; everything that shapes the computation
(method, dataset, architecture, batch size, training images, lr, ...) must agree.

On CUDA the training step is replayed from CUDA graphs (raven.cuda_graphs): one launch per
step instead of a few hundred, with the data, the accumulated losses and the NaN flags on
the device and one host synchronisation per epoch. Each member's generator is registered
with every graph, so replays draw what eager steps would; drawing all members' noise from
one generator could not reproduce K solo runs. RAdam runs with capturable=True there (its
step count on the device), which computes the bias corrections in float32 on the device:
equal to a solo CUDA run to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from raven.config import ConfigError, TrainConfig
from raven.cuda_graphs import GraphedStep, graphs_wanted
from raven.data import DataSplits
from raven.methods import options
from raven.models import RavenModel
from raven.step import latent_noise, make_optimizer, make_partner, matmul_precision, partner_noise, step_terms
from raven.train import EpochReport, Member, TrainResult, resolve_device, train_members


# The step's settings that may differ between the members of one pack, each with its row of the
# pack's tensor: beta and every method option declared per_member (sigma_aug, eta, ...).
_PER_MEMBER_ROWS = {o.name: o.row or (lambda value, d: value) for o in options().values() if o.per_member} | {
    "beta": lambda value, d: value}
# The per-member settings with one value per latent dimension (their row is a list): sigma_aug.
_PER_DIMENSION = {o.name for o in options().values() if o.per_member and o.row}
# TrainConfig fields that may differ between the members of one pack.
PER_MEMBER_FIELDS = ("seed", *_PER_MEMBER_ROWS, "grad_clip_norm", "epochs", "patience")


def check_packable(configs: list[TrainConfig]) -> None:
    """Raise ConfigError unless `configs` can train as one pack (all but PER_MEMBER_FIELDS agree)."""
    if not configs:
        raise ConfigError("a pack needs at least one config")
    first = configs[0]
    for config in configs[1:]:
        for f in dataclasses.fields(TrainConfig):
            if f.name not in PER_MEMBER_FIELDS and getattr(config, f.name) != getattr(first, f.name):
                raise ConfigError(
                    f"the configs of one pack must share {f.name} (got {getattr(first, f.name)!r} and "
                    f"{getattr(config, f.name)!r}); only {', '.join(PER_MEMBER_FIELDS)} may differ")


def member_dirname(seed: int) -> str:
    """The folder of one seed of a pack, under the pack's folder: seed-3 (`raven train --seeds`, sweeps,
    the reproduction)."""
    return f"seed-{seed}"


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0-4' -> (0, 1, 2, 3, 4), '0,2,5' -> (0, 2, 5); ranges and lists mix ('0-2,7')."""
    seeds: list[int] = []
    for word in (w.strip() for w in text.split(",")):
        low, dash, high = word.partition("-")
        try:
            span = range(int(low), int(high) + 1) if dash else [int(word)]
        except ValueError:
            span = []
        if not span or min(span) < 0:
            raise ConfigError(f"--seeds expects seeds >= 0 as a range or a list, such as 0-4 or 0,2,5; got {text!r}")
        seeds.extend(span)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed: {text!r}")
    return tuple(seeds)


class _BatchedLinear(torch.autograd.Function):
    """y[k] = x[k] W[k]^T + b[k] for every member k, with nn.Linear's arithmetic.

    Forward is baddbmm, which starts each product from the bias as nn.Linear's addmm does.
    Backward forms the products as autograd does for addmm (grad_W = grad^T x, grad_x =
    grad W, grad_b = sum over rows), where baddbmm's own backward would form x^T grad:
    the same sums, which BLAS orders differently for thin matrices. So on CPU with one thread
    each member's outputs and gradients are bitwise those of its own nn.Linear. With more,
    MKL may split one matrix's contraction across threads where bmm runs each matrix on one
    thread (grad (128, 784) times W (784, 500) at 2 threads): equal to float rounding. Running
    each member's own mm instead would be bitwise at any thread count but was 2-5x slower
    per product on 2 loaded cores.

    Under an autocast (training precision "bf16", raven.step.matmul_precision) the products take
    x, W and b in the autocast's dtype, forward and backward, as autocast does for nn.Linear;
    autograd returns the gradients to W and b in their own float32.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        ctx.save_for_backward(x, weight)
        with torch.autocast(device, enabled=False):
            return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(-1, -2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(-1, -2), x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=-2) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


class PackedLinear(nn.Module):
    """K nn.Linear layers as one: weight (K, out, in), bias (K, out), inputs (K, N, in)."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))
        self.bias = nn.Parameter(torch.stack([layer.bias.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BatchedLinear.apply(x, self.weight, self.bias)


class PackedPReLU(nn.Module):
    """K nn.PReLU layers as one: weight (K, P) with P = 1 or the channel count."""

    def __init__(self, layers: list[nn.PReLU]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.prelu's own rule (x if x > 0 else a x), with a per-member slope; in x's dtype (bf16 under autocast).
        return torch.where(x > 0, x, self.weight.unsqueeze(-2).to(x.dtype) * x)


def stack_modules(modules: list[nn.Module]) -> nn.Module:
    """One module of the same structure with every layer packed and every parameter stacked: it maps
    (K, N, in) to (K, N, out), member k with module k's weights (the pack's training, raven.eval.pack_eval)."""
    first = modules[0]
    if isinstance(first, nn.Linear):
        return PackedLinear(modules)
    if isinstance(first, nn.PReLU):
        return PackedPReLU(modules)
    assert not list(first.buffers(recurse=False)), f"cannot pack {type(first).__name__}: it has buffers"
    packed = copy.deepcopy(first)
    for name, _ in first.named_parameters(recurse=False):
        setattr(packed, name, nn.Parameter(torch.stack([getattr(m, name).detach() for m in modules])))
    for name, _ in first.named_children():
        setattr(packed, name, stack_modules([getattr(m, name) for m in modules]))
    return packed


class PackedModel(nn.Module):
    """K RavenModels as one. Same module tree and state_dict keys, every tensor with a leading
    member dimension; encoder and decoder map (K, N, in) to (K, N, out)."""

    def __init__(self, models: list[RavenModel]) -> None:
        super().__init__()
        self.size = len(models)
        self.latent_dim = models[0].latent_dim
        self.encoder = stack_modules([m.encoder for m in models])
        self.decoder = stack_modules([m.decoder for m in models])
        self.prior = stack_modules([m.prior for m in models]) if models[0].prior is not None else None

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's parameters under RavenModel's keys (views: copy before training on)."""
        return {name: tensor[k] for name, tensor in self.state_dict().items()}


class PackSettings(SimpleNamespace):
    """The settings a step reads (raven.train.StepSettings), for a pack: every TrainConfig field
    of the first member, with the per-member ones (beta and the methods' per-member options)
    that differ between members as tensors broadcasting over the pack: (K, 1) against per-pair
    terms (K, batch), sigma_aug (K, 1, d) against (K, batch, d). A per-member scalar that all
    members share stays the solo loop's own float, so a pack of members that agree computes
    exactly what each would alone. A shared per-dimension setting (sigma_aug) becomes the (d,)
    float32 tensor the solo step would make of it (raven.objectives.aug_variance), on the device
    before any step: a CUDA graph cannot capture the step making it (a host-to-device copy),
    while a float is a kernel argument the graph records."""

    @classmethod
    def of(cls, configs: list[TrainConfig], device: torch.device) -> "PackSettings":
        first = configs[0]
        values = {f.name: getattr(first, f.name) for f in dataclasses.fields(TrainConfig)}
        for name, row in _PER_MEMBER_ROWS.items():
            column = [getattr(c, name) for c in configs]
            if any(v != column[0] for v in column):
                values[name] = torch.tensor([row(v, first.latent_dim) for v in column], dtype=torch.float32,
                                            device=device).unsqueeze(1)
            elif name in _PER_DIMENSION:
                values[name] = torch.tensor(row(column[0], first.latent_dim), dtype=torch.float32, device=device)
        return cls(**values)


class PackedTrainer:
    """The stacked model, optimizer and per-member generators of the members trained together.

    `models`, `generators` and `optimizer_states` (solo RAdam state_dicts, None for fresh
    members) are the members' current states; all members must be at the same step.
    `noisy_copies` holds each member's `training_noisy_copy` (N, 784) where the method
    trains on a fixed copy, else None. `train_epoch` runs one epoch and returns its
    per-member loss sums and first non-finite step, read from the device once; `member_state`
    unpacks a member (the raven.train.Trainer of a pack).
    """

    def __init__(self, configs: list[TrainConfig], train_x: torch.Tensor, models: list[RavenModel],
                 generators: list[torch.Generator], optimizer_states: list[dict[str, Any] | None],
                 noisy_copies: list[torch.Tensor] | None = None, cuda_graphs: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        check_packable(configs)
        assert noisy_copies is None or len(noisy_copies) == len(configs), "one noisy copy per member"
        self.configs = configs
        self.train_x = train_x
        self.noisy_copies = noisy_copies
        device = train_x.device
        self.model = PackedModel(models).to(device)
        self.model.train()
        # A captured step needs RAdam's step count on the device (no host read of it).
        capturable = cuda_graphs and device.type == "cuda"
        self.optimizer = make_optimizer(self.model.parameters(), configs[0].lr, capturable=capturable)
        self._load_optimizer_states(optimizer_states, device, capturable)
        # The param_groups a solo run's RAdam saves, so unpacked optimizer states load there unchanged.
        self.param_groups = make_optimizer(models[0].parameters(), configs[0].lr).state_dict()["param_groups"]
        self.generators = generators
        self.settings = PackSettings.of(configs, device)
        caps = [c.grad_clip_norm for c in configs]
        # A member without a cap gets an infinite one: its clip factor is then exactly 1.
        self.max_norm = (None if all(c is None for c in caps) else
                         torch.tensor([math.inf if c is None else c for c in caps], device=device))
        self.totals: dict[str, torch.Tensor] | None = None
        self.first_bad = torch.full((len(configs),), -1, dtype=torch.long, device=device)
        self.step_count = torch.zeros((), dtype=torch.long, device=device)
        self._graphs = GraphedStep(self._step, generators, list(self.model.parameters()), log) if cuda_graphs else None

    def _load_optimizer_states(self, states: list[dict[str, Any] | None], device: torch.device,
                               capturable: bool) -> None:
        """Stack the members' RAdam states (or zeros, as RAdam would start) into the pack's."""
        assert all(s is None for s in states) or all(s is not None for s in states), "members at different steps"
        for i, p in enumerate(self.model.parameters()):
            if states[0] is None:
                step = 0.0
                exp_avg, exp_avg_sq = torch.zeros_like(p), torch.zeros_like(p)
            else:
                member = [s["state"][i] for s in states]
                steps = {float(m["step"]) for m in member}
                assert len(steps) == 1, f"members at different optimizer steps {sorted(steps)}"
                step = steps.pop()
                exp_avg = torch.stack([m["exp_avg"].to(device) for m in member])
                exp_avg_sq = torch.stack([m["exp_avg_sq"].to(device) for m in member])
            self.optimizer.state[p] = {
                "step": torch.tensor(step, dtype=torch.float32, device=device if capturable else "cpu"),
                "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
            }

    def member_state(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Member k's parameters (views: copy before training on) and its RAdam state_dict in the solo
        format (copies), so a solo run resumes from it unchanged."""
        state = {}
        for i, p in enumerate(self.model.parameters()):
            s = self.optimizer.state[p]
            state[i] = {"step": s["step"].detach().to("cpu", torch.float32).clone(),
                        "exp_avg": s["exp_avg"][k].clone(), "exp_avg_sq": s["exp_avg_sq"][k].clone()}
        return self.model.member_state_dict(k), {"state": state, "param_groups": copy.deepcopy(self.param_groups)}

    def _clip_gradients(self) -> None:
        """Each member's global gradient norm capped at its own max, as clip_grad_norm_ does per model."""
        grads = [p.grad for p in self.model.parameters()]
        # (K, parameters), so each member's total is a contiguous reduction like its solo one.
        norms = torch.stack([torch.linalg.vector_norm(g, 2, dim=tuple(range(1, g.dim()))) for g in grads], dim=1)
        total = torch.linalg.vector_norm(norms, 2, dim=1)
        # clip_grad_norm_'s arithmetic: max_norm / (norm + 1e-6) is reciprocal(...) * max_norm.
        coef = torch.clamp((total + 1e-6).reciprocal() * self.max_norm, max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))

    def _step(self, index: torch.Tensor) -> None:
        """One optimiser step of every member on its batch train_x[index[k]]; nothing read back."""
        x = self.train_x[index]
        # Each member's rows of its own fixed copy, in its own batch order.
        fixed = (None if self.noisy_copies is None
                 else torch.stack([copy[rows] for copy, rows in zip(self.noisy_copies, index)]))
        draws, eps = [], []
        for config, generator in zip(self.configs, self.generators):
            # The solo order: the partner's draws, then the reparameterisation's.
            draws.append(partner_noise(config, index.shape[1], generator, fixed is not None))
            eps.append(latent_noise(config, index.shape[1], generator))
        noise = {name: torch.stack([d[name] for d in draws]) for name in draws[0]}
        # A capture needs the weights cast afresh at each use (no autocast cache).
        with matmul_precision(self.configs[0].precision, x.device, cache=False):
            partner = make_partner(self.model, self.settings, x, noise, fixed)
            terms = step_terms(self.model, self.settings, x, partner, torch.stack(eps), len(self.train_x))
        loss = terms["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        # Members share no parameter, so each gets exactly the gradient of its own loss.
        loss.sum().backward()
        if self.max_norm is not None:
            self._clip_gradients()
        self.optimizer.step()
        with torch.no_grad():
            if self.totals is None:
                self.totals = {name: torch.zeros_like(value) for name, value in terms.items()}
            for name, value in terms.items():
                self.totals[name].add_(value.detach())
            bad_now = (~torch.isfinite(loss)) & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(bad_now, self.step_count, self.first_bad))
            self.step_count.add_(1)

    def step(self, index: torch.Tensor) -> None:
        """One step on batch indices (K, b): replayed from a CUDA graph where enabled."""
        if self._graphs is not None:
            self._graphs(index)
        else:
            self._step(index)

    def epoch_order(self) -> torch.Tensor:
        """Each member's permutation of the training images, (K, N), from its generator."""
        n, device = len(self.train_x), self.train_x.device
        return torch.stack([torch.randperm(n, generator=g, device=device) for g in self.generators])

    def train_epoch(self, batch_size: int, on_step: Callable[[], None] | None = None
                    ) -> tuple[dict[str, list[float]], list[int]]:
        """One epoch; returns per-member sums of every term and the first non-finite step (-1: none)."""
        order = self.epoch_order()
        if self.totals is not None:
            for total in self.totals.values():
                total.zero_()
        self.first_bad.fill_(-1)
        self.step_count.zero_()
        for start in range(0, order.shape[1], batch_size):
            self.step(order[:, start:start + batch_size])
            if on_step:
                on_step()
        assert self.totals is not None
        return {name: total.tolist() for name, total in self.totals.items()}, self.first_bad.tolist()


def train_pack(
    configs: list[TrainConfig],
    splits: DataSplits | None = None,
    device: str | torch.device = "auto",
    out_dirs: list[str | os.PathLike] | None = None,
    callbacks: list[Callable[[EpochReport], None]] | None = None,
    pack_callbacks: list[Callable[[list[EpochReport]], None]] | None = None,
    resume: bool = True,
    data_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    cuda_graphs: bool | None = None,
) -> list[TrainResult]:
    """Train `configs` as one pack; one TrainResult per config, in order, as train() would give.

    out_dirs: one folder per member for its checkpoint.pt and metrics.json (resumed when
    `resume`). callbacks receive each member's EpochReport, as in train(); pack_callbacks
    receive, once per epoch, the reports of the members that trained in it. A member whose
    loss becomes non-finite is reported in the log and in its result's `diverged`, keeps
    its last good checkpoint, and the others go on. cuda_graphs: see graphs_wanted.
    """
    check_packable(configs)
    if out_dirs is not None:
        if len(out_dirs) != len(configs):
            raise ConfigError(f"{len(configs)} configs but {len(out_dirs)} output folders")
        if len({Path(d).resolve() for d in out_dirs}) != len(out_dirs):
            raise ConfigError("every member of a pack needs its own output folder")
    device = resolve_device(device)
    use_graphs = graphs_wanted(device, cuda_graphs)

    def make_trainer(members: list[Member], train_x: torch.Tensor) -> PackedTrainer:
        copies = [m.noisy_copy for m in members]
        return PackedTrainer([m.config for m in members], train_x, [m.model for m in members],
                             [m.generator for m in members], [m.optimizer_state for m in members],
                             None if copies[0] is None else copies, cuda_graphs=use_graphs, log=log)

    return train_members(configs, make_trainer, solo=False, splits=splits, device=device, out_dirs=out_dirs,
                         callbacks=callbacks, pack_callbacks=pack_callbacks, resume=resume, data_dir=data_dir,
                         progress=progress, log=log)
