"""The paper's probe and attacks (Section 4.1) for the K members of a pack at once.

`pack_probe_and_attack` computes, for each member, what raven.eval.evaluate.probe_and_attack
computes under the paper's protocol: the linear probe fitted on the member's own encodings
of the training images, its clean accuracy, and per attack and delta the adversarial
accuracy (in both readings: the paper's, and counting only images also right when clean)
and the mean Delta at the kept iterates. The members' encoders (and probes) are
stacked into one module (raven.pack.stack_modules: batched matrix products over (K, out, in)
weights), and one PGD (raven.pgd.pgd_linf with row_dims=2) ascends every member's own
objective on a (K, batch, 784) input: one pass, one launch per layer and step, for the K
models. Each member keeps what its solo evaluation has:

- its probe: raven.eval.probe.train_linear_probe on its encodings, fitted one member after the
  other (full-batch L-BFGS, deterministic; a one-off cost beside the attacks);
- its random starts: drawn, chunk by chunk and restart by restart in the solo order, from
  the stream raven.eval.protocols.paper_protocol gives its seed (seed, attack, delta), each draw
  shaped as the solo one, then stacked;
- its chunks: the test images in chunks of config.batch_size, as attacks.attack cuts them,
  all K members of a chunk in the same pass.

So on CPU every member's numbers are those of its solo evaluation, bit for bit with one thread
(the reproduction runs its tasks with one): the packed Linear layers compute each member's
products and input gradients with nn.Linear's arithmetic (raven.pack), the parameters are
frozen (no gradient sum over the whole pack, the one thread-dependent difference of packed
training), and every other operation is elementwise or per row. With more threads BLAS may
split a product differently (it did not with two here); a value then moves by float rounding
and can flip a sign step, so PGD follows another path, as a solo run on another machine
would. On CUDA the batched kernels differ from the solo ones in that way: equal to float
rounding, not bitwise.

Only the encoders are attacked, so the members may differ in anything their encoders do not
share a shape through (method, sigma_aug, eta, beta, seed); their encoders must have the
same architecture, and their evaluation settings must agree on every field the paper's
attacks read (PAPER_STAGE_FIELDS) but may differ in the seed. The strong protocol, FID and
the other metrics stay per member (raven.eval.evaluate.evaluate_model with `stage`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raven.config import ConfigError
from raven.eval.attacks import ascent_objective, dissimilarity, in_precision
from raven.eval.evaluate import EvalConfig
from raven.eval.probe import train_linear_probe
from raven.eval.protocols import delta_key, stream
from raven.pack import stack_modules
from raven.pgd import pgd_linf

# EvalConfig fields the paper's probe and attacks read; the members of a pack must agree on them.
PAPER_STAGE_FIELDS = ("attacks", "deltas", "steps", "step_size", "restarts", "random_start", "limit",
                      "probe_limit", "batch_size", "precision")
ENCODE_CHUNK = 5000  # raven.eval.probe.encode_mean's chunk: the same products as the solo encodings


def check_pack_evaluable(models: Sequence[nn.Module], configs: Sequence[EvalConfig]) -> None:
    """Raise ConfigError (one line) unless `models` can be attacked as one pack under `configs`."""
    if not models:
        raise ConfigError("a pack evaluation needs at least one model")
    if len(configs) != len(models):
        raise ConfigError(f"{len(models)} models but {len(configs)} evaluation configs")
    shapes = [{name: tuple(t.shape) for name, t in m.encoder.state_dict().items()} for m in models]
    for k, shape in enumerate(shapes[1:], start=1):
        if shape != shapes[0]:
            raise ConfigError(
                f"member {k}'s encoder has another architecture than member 0's (latent_dim "
                f"{getattr(models[k], 'latent_dim', '?')} vs {getattr(models[0], 'latent_dim', '?')}); the encoders "
                "of a pack must have the same shapes")
    devices = {next(m.parameters()).device for m in models}
    if len(devices) != 1:
        raise ConfigError(f"the members of a pack must be on one device, got {', '.join(map(str, devices))}")
    for k, config in enumerate(configs):
        if not config.runs_paper:
            raise ConfigError(f"member {k}'s evaluation does not run the paper's protocol (protocol "
                              f"{config.protocol!r}); the pack evaluation computes only the paper's attacks")
        for name in PAPER_STAGE_FIELDS:
            if getattr(config, name) != getattr(configs[0], name):
                raise ConfigError(
                    f"the members of a pack must share the evaluation's {name} (got {getattr(configs[0], name)!r} "
                    f"and {getattr(config, name)!r}); only the seed and settings the paper's attacks do not read "
                    "may differ")


@torch.no_grad()
def encode_mean_pack(encoder: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """mu_x (Eq. 14) of every row of x under each of the `size` stacked encoders: (K, N, d)."""
    return torch.cat([encoder(x[i:i + ENCODE_CHUNK].expand(size, -1, -1).contiguous())[0]
                      for i in range(0, len(x), ENCODE_CHUNK)], dim=1)


def _objective(kind: str, encoder: nn.Module, probe: nn.Module, x: torch.Tensor,
               y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """What PGD ascends for every member on its rows x (K, n, 784): attacks._objective, member by member."""
    if kind == "ce":
        def cross_entropy(x_adv: torch.Tensor) -> torch.Tensor:
            logits = probe(encoder(x_adv)[0])
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)

        return cross_entropy
    with torch.no_grad():
        mu, logvar = encoder(x)

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        mu_adv, logvar_adv = encoder(x_adv)
        return ascent_objective(kind, mu, logvar, mu_adv, logvar_adv)

    return objective


def attack_pack(encoder: nn.Module, probe: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: float, kind: str, *,
                steps: int, step_size: float, restarts: int, random_start: bool,
                generators: Sequence[torch.Generator], batch_size: int,
                precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """raven.eval.attacks.attack for K stacked encoders (and probes) at once: (correct, dissimilarity), each (K, N).

    encoder maps (K, n, 784) to (mu, logvar) of shape (K, n, d), probe (K, n, d) to logits;
    x (N, 784) and labels y (N,) are the same images for every member; generators[k] is
    member k's stream of random starts. correct[k]: member k's probe is right after every
    restart; dissimilarity[k]: its highest Delta over restarts (the probe's cross-entropy
    for "ce"). Parameters must be frozen (requires_grad False) by the caller. precision: the search's, as in
    attack; correct and dissimilarity are float32.
    """
    size = len(generators)
    corrects, values = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        xk = xb.expand(size, -1, -1).contiguous()
        yk = y[start:start + batch_size].expand(size, -1)
        with torch.no_grad():
            mu, logvar = encoder(xk)
        objective = in_precision(_objective(kind, encoder, probe, xk, yk), precision, xb.device)
        best_value, correct = None, None
        for _ in range(restarts if delta > 0 else 1):
            # Each member's start from its own stream, drawn as its solo attack draws it.
            noise = (torch.stack([torch.rand(xb.shape, generator=g, device=xb.device, dtype=xb.dtype)
                                  for g in generators]) if random_start and delta > 0 else None)
            x_adv = pgd_linf(objective, xk, delta, steps, step_size, random_start=random_start, start_noise=noise,
                             keep_best=True, row_dims=2)
            with torch.no_grad():
                mu_adv, logvar_adv = encoder(x_adv)
                logits = probe(mu_adv)
                if kind == "ce":
                    value = F.cross_entropy(logits.flatten(0, 1), yk.flatten(), reduction="none").view(yk.shape)
                else:
                    value = dissimilarity(kind, mu, logvar, mu_adv, logvar_adv)
                best_value = value if best_value is None else torch.where(value > best_value, value, best_value)
                right = logits.argmax(dim=-1) == yk
                correct = right if correct is None else correct & right
        corrects.append(correct)
        values.append(best_value)
    return torch.cat(corrects, dim=1), torch.cat(values, dim=1)


def pack_probe_and_attack(models: Sequence[nn.Module], train_x: torch.Tensor, train_y: torch.Tensor,
                          eval_x: torch.Tensor, eval_y: torch.Tensor, configs: Sequence[EvalConfig],
                          log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The paper's protocol of probe_and_attack for every member of a pack, its attacks in one batched pass.

    models[k] (RavenModels with encoders of one architecture, on one device) is evaluated
    under configs[k]; config.probe_limit / config.limit cut train_x / eval_x. Returns, per
    member, probe_and_attack's dict ("clean_accuracy", "adversarial_accuracy",
    "adversarial_robust_accuracy", "attack_dissimilarity", "strong": None, "probe", "images",
    "strong_images", "attack_seconds": the pack's
    shared attack time) plus "probe_layer", the fitted nn.Linear, for the rest of its
    evaluation (raven.eval.evaluate.evaluate_model's `stage`).
    """
    check_pack_evaluable(models, configs)
    config = configs[0]
    device = next(models[0].parameters()).device
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if config.probe_limit is not None:
        train_x, train_y = train_x[:config.probe_limit], train_y[:config.probe_limit]
    if config.limit is not None:
        eval_x, eval_y = eval_x[:config.limit], eval_y[:config.limit]
    if len(train_x) == 0 or len(eval_x) == 0:
        raise ConfigError("the pack evaluation needs at least one training and one evaluation image")
    train_x, train_y, eval_x, eval_y = (t.to(device) for t in (train_x, train_y, eval_x, eval_y))
    size = len(models)
    # Copies of the members' weights: the models themselves are left as they are.
    encoder = stack_modules([m.encoder for m in models]).to(device).requires_grad_(False).eval()

    features = encode_mean_pack(encoder, train_x, size)
    fitted = [train_linear_probe(features[k], train_y) for k in range(size)]
    probe = stack_modules([layer for layer, _ in fitted]).requires_grad_(False).eval()
    with torch.no_grad():
        right = probe(encode_mean_pack(encoder, eval_x, size)).argmax(dim=-1) == eval_y
    results: list[dict[str, Any]] = [
        {"clean_accuracy": float(right[k].double().mean()), "adversarial_accuracy": {},
         "adversarial_robust_accuracy": {}, "attack_dissimilarity": {}, "strong": None, "probe": info,
         "images": int(len(eval_x)), "strong_images": configs[k].strong_images(len(eval_x)), "probe_layer": layer}
        for k, (layer, info) in enumerate(fitted)]

    started = time.perf_counter()
    for kind in config.attacks:
        for result in results:
            result["adversarial_accuracy"][kind], result["attack_dissimilarity"][kind] = {}, {}
            result["adversarial_robust_accuracy"][kind] = {}
        for delta in config.deltas:
            key = delta_key(delta)
            correct, value = attack_pack(
                encoder, probe, eval_x, eval_y, delta, kind, steps=config.steps, step_size=config.step_size_for(delta),
                restarts=config.restarts, random_start=config.random_start,
                generators=[stream(device, c.seed, kind, key) for c in configs], batch_size=config.batch_size,
                precision=config.precision)
            for k, result in enumerate(results):
                # Row k alone, contiguous: the same reduction as the solo (N,) tensor's.
                result["adversarial_accuracy"][kind][key] = float(correct[k].double().mean())
                # Right after the attack and on the clean image: AutoAttack's and RobustBench's reading.
                result["adversarial_robust_accuracy"][kind][key] = float((correct[k] & right[k]).double().mean())
                result["attack_dissimilarity"][kind][key] = float(value[k].double().mean())
            if log:
                log(f"  paper {kind} delta={key} (pack of {size}): accuracy "
                    + ", ".join(f"{r['adversarial_accuracy'][kind][key]:.4f}" for r in results))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    for result in results:
        result["attack_seconds"] = seconds
    return results
