"""`raven report`: the paper's Tables 1-2 and Figures 1-2 from a reproduction recorded in MLflow.

Everything is read through `mlflow.search_runs` (pandas) from the reproduction's parent run
(raven.reproduce) and its complete child runs, one per (dataset, method, seed), and set
next to the paper's published numbers. The report states the run budget on its first
line: numbers from a reduced budget are not comparable with the paper's.

Aggregation. Table 2 and Figure 2: mean +- sample std (ddof 1) over seeds, as the paper's
"std over 5 runs". Table 1: the paper's "mean +- std" is over the 10^4 test images of one
model; here the mean is the mean over seeds of each model's per-image mean, shown with
its std over seeds, and the per-image std is the mean over seeds of each model's
per-image std (the quantity the paper's +- reports).

The notebooks (notebooks/results.ipynb, notebooks/latent_space.ipynb) call the functions
here; `write_report` is the whole command.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from raven.config import DATASETS, METHODS, PAPER_ETA, PAPER_SIGMA_AUG
from raven.reproduce import (CHECKPOINT_ARTIFACTS, CHILD_ROLE, COMPLETE_TAG, DEFAULT_EXPERIMENT, ETA_SWEEP_EXPERIMENT,
                             ROLE, SIGMA_SWEEP_EXPERIMENT)

# Published reference values (not results of this code), from Irobe, Aoki et al., "Robust VAEs
# via Generating Process of Noise Augmented Data": Table 1, mean +- std over the 10^4 MNIST
# test images of ||z~ - z||^2 for one model each ("Ours" is RAVEN); Table 2, linear-probe
# accuracy (%), MSE (0-255 scale) and FID, mean +- std over 5 runs. The paper reports no
# RAVEN-GMM numbers and no Fashion-MNIST Table 1.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "mnist": {"vae": (0.89, 1.29), "vae-noise": (3.24, 5.12), "raven": (0.53, 0.36)},
}
# Erratum to the paper's Table 1, found by measurement (README, "Table 1: which reading"): the paper
# does not say which distance it reports, and only the sampled reading with sigma_aug near 0.2 fits.
TABLE1_ERRATUM = """**Erratum (Table 1, next to Eq. (7)'s constant).** The paper does not say whether z is the
posterior mean or a sample. Measured on MNIST (one seed, 20 epochs on 55,000 images, all 10⁴ test
images), its numbers fit the *sampled* reading, and RAVEN's 0.53 ± 0.36 fits σ_aug ≈ 0.2, not the
σ_aug = 0.01 it reports: sampled, the VAE gives 0.85 ± 0.94 (paper 0.89 ± 1.29) and RAVEN 0.0041 ±
0.0020 (σ_aug 0.01), 0.21 ± 0.11 (0.1), 0.51 ± 0.27 (0.2), 0.92 ± 0.57 (0.4); with the means, RAVEN
stays below 0.05 for every σ_aug ≤ 0.4 (its bound charges ‖Δμ‖²/(4σ_aug²)). No reading reproduces VAE (noise)'s
3.24 ± 5.12 (measured 0.86 ± 0.97 sampled, 0.036 ± 0.033 means)."""
PAPER_TABLE2: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "mnist": {
        "vae": {"accuracy": (91.45, 0.26), "mse": (862.114, 10.96), "fid": (21.766, 0.27)},
        "vae-noise": {"accuracy": (91.84, 0.45), "mse": (916.383, 5.43), "fid": (23.990, 0.86)},
        "se": {"accuracy": (91.44, 0.19), "mse": (876.454, 10.82), "fid": (22.434, 0.70)},
        "raven": {"accuracy": (92.49, 0.51), "mse": (795.946, 6.01), "fid": (20.636, 0.49)},
    },
    "fashion-mnist": {
        "vae": {"accuracy": (76.33, 0.89), "mse": (915.934, 10.69), "fid": (50.338, 0.85)},
        "vae-noise": {"accuracy": (76.71, 0.58), "mse": (953.350, 7.46), "fid": (52.151, 0.78)},
        "se": {"accuracy": (77.02, 0.87), "mse": (963.828, 19.64), "fid": (52.896, 1.36)},
        "raven": {"accuracy": (77.20, 0.18), "mse": (821.254, 4.84), "fid": (45.751, 0.54)},
    },
}

METHOD_LABELS = {"vae": "VAE", "vae-noise": "VAE (noise)", "se": "SE", "raven": "RAVEN", "raven-gmm": "RAVEN-GMM"}
DATASET_LABELS = {"mnist": "MNIST", "fashion-mnist": "F-MNIST"}
# RAVEN in blue as in the paper's Figure 2.
METHOD_COLORS = {"raven": "tab:blue", "raven-gmm": "tab:purple", "vae": "tab:gray", "vae-noise": "tab:orange",
                 "se": "tab:green"}
ATTACK_LABELS = {"kl": "KL attack", "w2": "Wasserstein attack", "ce": "cross-entropy attack",
                 "rkl": "reverse-KL attack", "mean": "posterior-mean attack", "strong": "strong protocol (worst case)"}
# Figure 2's curves: the paper protocol's adv_acc_{attack}_delta_{delta}, and the strong protocol's
# robust_acc_delta_{delta} as the attack "strong" (raven.evaluate.EvalResult.metrics).
_CURVE_COLUMN = re.compile(r"^metrics\.adv_acc_([a-z0-9]+)_delta_([0-9.e-]+)$")
_STRONG_COLUMN = re.compile(r"^metrics\.robust_acc_delta_([0-9.e-]+)$")
STRONG = "strong"
TSNE_ARTIFACT = "robustness/tsne.png"


class ReportError(RuntimeError):
    """Nothing to report (no store, no reproduction); the message says what to run."""


# ----------------------------------------------------------------------------- reading MLflow


@dataclass
class Reproduction:
    """A reproduction parent run and its complete child runs, as read from MLflow."""

    tracking_uri: str
    experiment: str
    parent: pd.Series
    runs: pd.DataFrame  # one row per complete (dataset, method, seed), search_runs columns

    @property
    def run_id(self) -> str:
        return str(self.parent["run_id"])

    @property
    def budget(self) -> str:
        return str(self.parent.get("params.budget") or "budget unknown")

    @property
    def planned(self) -> int:
        datasets = str(self.parent.get("params.budget.datasets") or "").split(",")
        methods = str(self.parent.get("params.budget.methods") or "").split(",")
        return len(datasets) * len(methods) * int(self.parent.get("params.budget.seeds") or 0)

    def hyperparameters(self) -> dict[str, str]:
        out = {}
        for dataset in DATASETS:
            if isinstance(self.parent.get(f"params.sigma_aug.{dataset}"), str):
                out[dataset] = (f"sigma_aug = {self.parent[f'params.sigma_aug.{dataset}']}, "
                                f"eta = {self.parent[f'params.eta.{dataset}']} "
                                f"({self.parent[f'params.hyperparameters.{dataset}']})")
        return out


def use_store(tracking_uri: str | None = None) -> str:
    """Point MLflow at `tracking_uri` (None: MLFLOW_TRACKING_URI, else the sweeps' sqlite:///mlflow.db here)."""
    import mlflow

    from raven.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    mlflow.set_tracking_uri(uri)
    return uri


def load_reproduction(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                      run_id: str | None = None) -> Reproduction:
    """The reproduction `run_id`, else the latest in `experiment`, with its complete child runs."""
    import mlflow

    uri = use_store(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise ReportError(f"no MLflow experiment {experiment!r} at {uri}; run `python sweeps/reproduce.py --smoke` "
                          "first (or pass --tracking-uri / --experiment)")
    parents = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.`raven.role` = '{ROLE}'",
                                 order_by=["attributes.start_time DESC"])
    if run_id:
        parents = parents[parents["run_id"] == run_id]
    if parents.empty:
        what = f"reproduction run {run_id}" if run_id else "reproduction run"
        raise ReportError(f"no {what} in experiment {experiment!r} at {uri}; run `python sweeps/reproduce.py --smoke`")
    parent = parents.iloc[0]
    runs = mlflow.search_runs(experiment_names=[experiment],
                              filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}' "
                                            f"and tags.`raven.role` = '{CHILD_ROLE}'")
    if f"tags.{COMPLETE_TAG}" in runs:
        runs = runs[(runs["status"] == "FINISHED") & (runs[f"tags.{COMPLETE_TAG}"] == "true")].copy()
    if runs.empty or f"tags.{COMPLETE_TAG}" not in runs:
        raise ReportError(f"reproduction {parent['run_id']} holds no complete run yet")
    runs["dataset"] = runs["tags.raven.dataset"]
    runs["method"] = runs["tags.raven.method"]
    runs["seed"] = runs["tags.raven.seed"].astype(int)
    order = {name: i for i, name in enumerate(DATASETS + METHODS)}
    runs = runs.sort_values(["dataset", "method", "seed"], key=lambda s: s.map(order) if s.name != "seed" else s)
    return Reproduction(uri, experiment, parent, runs.reset_index(drop=True))


def per_run_table(repro: Reproduction) -> pd.DataFrame:
    """One row per (dataset, method, seed): the headline numbers of every run."""
    columns = {"metrics.clean_accuracy": "clean_accuracy", "metrics.mse_255": "mse_255", "metrics.fid": "fid",
               "metrics.latent_pair_distance_mean": "pair_distance_mean",
               "metrics.latent_pair_distance_std": "pair_distance_std",
               "metrics.latent_pair_distance_sampled_mean": "sampled_pair_distance_mean",
               "metrics.latent_pair_distance_sampled_std": "sampled_pair_distance_std",
               "metrics.cluster_accuracy": "cluster_accuracy",
               "metrics.epochs_trained": "epochs_trained", "metrics.best_val_elbo": "best_val_elbo"}
    out = repro.runs[["dataset", "method", "seed", "run_id"]].copy()
    for source, name in columns.items():
        out[name] = pd.to_numeric(repro.runs[source], errors="coerce") if source in repro.runs else np.nan
    return out


def _seed_stats(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    grouped = frame.groupby(["dataset", "method"], sort=False)[column]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count()})


# ----------------------------------------------------------------------------- tables


def table1(repro: Reproduction) -> pd.DataFrame:
    """Table 1 in both readings on the test images, next to the paper's: the distance between the
    posterior means ||mu(x) - mu(x + eps)||^2 (pair_distance_*) and between sampled latents
    ||z - z'||^2, z ~ q(.|x), z' ~ q(.|x + eps) (sampled_pair_distance_*; NaN for runs evaluated
    before it was measured)."""
    runs = per_run_table(repro)
    means = _seed_stats(runs, "pair_distance_mean")
    per_image = _seed_stats(runs, "pair_distance_std")
    sampled = _seed_stats(runs, "sampled_pair_distance_mean")
    sampled_per_image = _seed_stats(runs, "sampled_pair_distance_std")
    rows = []
    for (dataset, method), stats in means.iterrows():
        paper = PAPER_TABLE1.get(dataset, {}).get(method, (np.nan, np.nan))
        s_stats = sampled.loc[(dataset, method)]
        rows.append({"dataset": dataset, "method": method, "seeds": int(stats["n"]),
                     "pair_distance_mean": stats["mean"], "pair_distance_mean_std_over_seeds": stats["std"],
                     "pair_distance_per_image_std": per_image.loc[(dataset, method), "mean"],
                     "sampled_pair_distance_mean": s_stats["mean"],
                     "sampled_pair_distance_mean_std_over_seeds": s_stats["std"],
                     "sampled_pair_distance_per_image_std": sampled_per_image.loc[(dataset, method), "mean"],
                     "paper_mean": paper[0], "paper_per_image_std": paper[1],
                     "difference_mean": stats["mean"] - paper[0],
                     "difference_sampled_mean": s_stats["mean"] - paper[0]})
    return pd.DataFrame(rows)


def table2(repro: Reproduction) -> pd.DataFrame:
    """Clean probe accuracy (%), MSE (0-255) and FID, mean and std over seeds, next to the paper's Table 2."""
    runs = per_run_table(repro)
    runs["accuracy_pct"] = 100.0 * runs["clean_accuracy"]
    stats = {name: _seed_stats(runs, column) for name, column in
             (("accuracy_pct", "accuracy_pct"), ("mse_255", "mse_255"), ("fid", "fid"))}
    rows = []
    for (dataset, method), acc in stats["accuracy_pct"].iterrows():
        paper = PAPER_TABLE2.get(dataset, {}).get(method, {})
        row: dict[str, Any] = {"dataset": dataset, "method": method, "seeds": int(acc["n"])}
        for name, key in (("accuracy_pct", "accuracy"), ("mse_255", "mse"), ("fid", "fid")):
            ours = stats[name].loc[(dataset, method)]
            published = paper.get(key, (np.nan, np.nan))
            row.update({f"{name}_mean": ours["mean"], f"{name}_std": ours["std"],
                        f"paper_{name}_mean": published[0], f"paper_{name}_std": published[1],
                        f"difference_{name}": ours["mean"] - published[0]})
        rows.append(row)
    return pd.DataFrame(rows)


def curves(repro: Reproduction) -> pd.DataFrame:
    """Long table of adversarial accuracy: dataset, method, seed, attack, delta, accuracy (one row per point).

    The strong protocol's robust accuracy, where the runs logged it, is the attack "strong".
    """
    rows = []
    for column in repro.runs.columns:
        match, strong = _CURVE_COLUMN.match(column), _STRONG_COLUMN.match(column)
        if not (match or strong):
            continue
        attack, delta = (match.group(1), match.group(2)) if match else (STRONG, strong.group(1))
        values = pd.to_numeric(repro.runs[column], errors="coerce")
        for (_, run), value in zip(repro.runs.iterrows(), values):
            if np.isfinite(value):
                rows.append({"dataset": run["dataset"], "method": run["method"], "seed": run["seed"],
                             "attack": attack, "delta": float(delta), "accuracy": float(value)})
    if not rows:
        raise ReportError(f"reproduction {repro.run_id} logged no adversarial accuracy (metrics adv_acc_*_delta_*)")
    return pd.DataFrame(rows).sort_values(["dataset", "method", "attack", "delta", "seed"]).reset_index(drop=True)


def curve_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Figure 2's data: mean and sample std over seeds per (dataset, method, attack, delta)."""
    grouped = points.groupby(["dataset", "method", "attack", "delta"], sort=False)["accuracy"]
    return grouped.agg(seeds="count", accuracy_mean="mean", accuracy_std=lambda s: s.std(ddof=1)).reset_index()


def protocol_table(summary: pd.DataFrame, deltas: tuple[float, ...] = (0.05, 0.1, 0.2)) -> pd.DataFrame:
    """The paper's attacks beside the strong protocol: accuracy (%) mean over seeds per (dataset, method).

    One column per (attack, delta) at the `deltas` the runs measured; empty when no run has the strong protocol.
    """
    if not (summary["attack"] == STRONG).any():
        return pd.DataFrame()
    part = summary[summary["delta"].round(6).isin([round(d, 6) for d in deltas])].copy()
    part["column"] = part["attack"] + " δ=" + part["delta"].map(lambda d: f"{d:g}")
    table = part.pivot_table(index=["dataset", "method"], columns="column", values="accuracy_mean", sort=False) * 100
    attacks = [a for a in _ordered(part["attack"], ("kl", "w2", "ce", "rkl", "mean")) if a != STRONG] + [STRONG]
    columns = [f"{a} δ={d:g}" for a in attacks for d in deltas if f"{a} δ={d:g}" in table.columns]
    order = {name: i for i, name in enumerate(DATASETS + METHODS)}
    table = table[columns].reset_index()
    return table.sort_values(["dataset", "method"], key=lambda c: c.map(order)).reset_index(drop=True)


def protocol_markdown(table: pd.DataFrame) -> str:
    header = ["Dataset", "Method"] + [c for c in table.columns if c not in ("dataset", "method")]
    rows = [[DATASET_LABELS.get(r["dataset"], r["dataset"]), METHOD_LABELS.get(r["method"], r["method"])]
            + [_num(r[c], 1) for c in header[2:]] for _, r in table.iterrows()]
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- figures


def _ordered(values: Any, order: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def plot_figure2(summary: pd.DataFrame, path: str | os.PathLike | None = None, title: str | None = None) -> Figure:
    """Figure 2: accuracy (%) vs delta, rows = datasets, columns = attacks, mean line and +-std band per method.

    The strong protocol's worst case, where present, is the last column, beside the paper's attacks.
    """
    datasets = _ordered(summary["dataset"], DATASETS)
    attacks = _ordered(summary["attack"], ("kl", "w2", "ce", "rkl", "mean"))
    attacks = [a for a in attacks if a != STRONG] + ([STRONG] if STRONG in attacks else [])
    fig = Figure(figsize=(4.6 * len(attacks), 3.7 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), len(attacks), squeeze=False)
    panel = iter("abcdefghijklmnop")
    for row, dataset in zip(axes, datasets):
        for ax, attack in zip(row, attacks):
            part = summary[(summary["dataset"] == dataset) & (summary["attack"] == attack)]
            for method in _ordered(part["method"], METHODS):
                line = part[part["method"] == method].sort_values("delta")
                mean, std = 100 * line["accuracy_mean"].to_numpy(), 100 * line["accuracy_std"].fillna(0).to_numpy()
                color = METHOD_COLORS.get(method)
                ax.plot(line["delta"], mean, marker="o", markersize=3, color=color,
                        label=f"{METHOD_LABELS.get(method, method)} (n={int(line['seeds'].max())})")
                ax.fill_between(line["delta"], mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            ax.set_title(f"({next(panel)}) {DATASET_LABELS.get(dataset, dataset)}, {ATTACK_LABELS.get(attack, attack)}",
                         fontsize=10)
            ax.set_xlabel(r"attack budget $\delta$ ($L_\infty$)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if part.empty:  # e.g. a dataset whose runs were not evaluated with the strong protocol
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
            else:
                ax.legend(fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    if path is not None:
        _save(fig, path)
    return fig


def plot_protocol_curves(points: pd.DataFrame, title: str | None = None) -> Figure:
    """One panel per method: each paper attack's accuracy (%) against delta, and the strong protocol's, dashed.

    `points` is `curves(...)`'s long table cut to the runs to show; several seeds are averaged.
    """
    methods = _ordered(points["method"], METHODS)
    fig = Figure(figsize=(3.4 * len(methods), 3.2), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        part = points[points["method"] == method].groupby(["attack", "delta"])["accuracy"].mean().reset_index()
        for attack in _ordered(part["attack"], ("kl", "w2", "ce", "rkl", "mean", STRONG)):
            line = part[part["attack"] == attack].sort_values("delta")
            style = dict(color="black", linestyle="--", linewidth=2) if attack == STRONG else {}
            ax.plot(line["delta"], 100 * line["accuracy"], marker="o", markersize=3,
                    label=ATTACK_LABELS.get(attack, attack), **style)
        ax.set_title(METHOD_LABELS.get(method, method), fontsize=10)
        ax.set_xlabel(r"$\delta$ ($L_\infty$)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def download_artifact(run_id: str, artifact: str, dst: str | os.PathLike | None = None) -> Path | None:
    """A run's artifact as a local file (None when the run has no such artifact)."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                        dst_path=str(dst) if dst else None))
    except Exception:  # noqa: BLE001 - MLflow raises store-specific errors for a missing artifact
        return None


def load_run_model(run_id: str, map_location: str = "cpu") -> Any:
    """The trained model of a reproduction (or any raven) run, from its logged checkpoint artifact."""
    from raven.train import CHECKPOINT_NAME, load_checkpoint

    path = download_artifact(run_id, f"{CHECKPOINT_ARTIFACTS}/{CHECKPOINT_NAME}")
    if path is None:
        raise ReportError(f"run {run_id} has no {CHECKPOINT_ARTIFACTS}/{CHECKPOINT_NAME} artifact")
    return load_checkpoint(path, map_location=map_location)


@functools.lru_cache(maxsize=2)
def _test_set(dataset: str, data_dir: str | None) -> tuple[Any, Any]:
    import torch

    from raven.data import default_data_dir, load_raw, to_tensor

    images, labels = load_raw(dataset, str(default_data_dir(data_dir)))["test"]
    return to_tensor(images), torch.from_numpy(labels.astype(np.int64))


def latent_pairs(model: Any, dataset: str, n: int = 1000, noise_std: float = 0.05, seed: int = 0,
                 data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Encoder means of the first n test images and of their noisy copies, labels, and pair distances.

    The noisy copy is the paper's x + eps, eps ~ N(0, noise_std^2 I), unclipped (as the encoder sees it).
    """
    import torch

    from raven.data import noisy_copy
    from raven.evaluate import encode_mean

    test_x, test_y = _test_set(dataset, None if data_dir is None else str(data_dir))
    x, y = test_x[:n], test_y[:n]
    noisy = noisy_copy(x, noise_std, torch.Generator().manual_seed(seed))
    mu_clean, mu_noisy = encode_mean(model, x), encode_mean(model, noisy)
    distance = (mu_clean.double() - mu_noisy.double()).pow(2).sum(dim=1)
    return {"mu_clean": mu_clean.numpy(), "mu_noisy": mu_noisy.numpy(), "labels": y.numpy(),
            "pair_distance": distance.numpy()}


def tsne_of_pairs(pairs: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """2-d t-SNE of the clean and noisy encodings stacked (clean first)."""
    import torch

    from raven.evaluate import tsne_embedding

    return tsne_embedding(torch.from_numpy(pairs["mu_clean"]), torch.from_numpy(pairs["mu_noisy"]), seed)


def plot_tsne_pairs(pairs: dict[str, np.ndarray], embedding: np.ndarray, ax: Axes, title: str = "") -> None:
    """Figure 1 style: clean encodings as dots, noisy as crosses, coloured by class."""
    n = len(pairs["labels"])
    cmap = matplotlib.colormaps["tab10"]
    for cls in np.unique(pairs["labels"]):
        sel = pairs["labels"] == cls
        ax.scatter(embedding[:n][sel, 0], embedding[:n][sel, 1], s=5, color=cmap(int(cls)), label=str(cls))
        ax.scatter(embedding[n:][sel, 0], embedding[n:][sel, 1], s=7, marker="x", linewidths=0.5, color=cmap(int(cls)))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def plot_figure1(repro: Reproduction, path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 seed: int | None = None) -> Path:
    """Figure 1: the t-SNE of clean and noisy test encodings per dataset (rows) and method (columns).

    Each panel is the evaluator's robustness/tsne.png of the run with the lowest seed
    (or `seed`); a run without one is recomputed from its logged checkpoint.
    """
    runs = repro.runs if seed is None else repro.runs[repro.runs["seed"] == seed]
    datasets = _ordered(runs["dataset"], DATASETS)
    methods = _ordered(runs["method"], METHODS)
    fig = Figure(figsize=(3.4 * len(methods), 3.2 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), len(methods), squeeze=False)
    with tempfile.TemporaryDirectory() as tmp:
        for row, dataset in zip(axes, datasets):
            for ax, method in zip(row, methods):
                chosen = runs[(runs["dataset"] == dataset) & (runs["method"] == method)].sort_values("seed")
                label = f"{DATASET_LABELS.get(dataset, dataset)}, {METHOD_LABELS.get(method, method)}"
                if chosen.empty:
                    ax.axis("off")
                    continue
                run = chosen.iloc[0]
                title = f"{label} (seed {run['seed']})"
                png = download_artifact(run["run_id"], TSNE_ARTIFACT, Path(tmp) / run["run_id"])
                if png is not None:
                    ax.imshow(matplotlib.image.imread(png))
                    ax.axis("off")
                    ax.set_title(title, fontsize=9)
                else:
                    pairs = latent_pairs(load_run_model(run["run_id"]), dataset, n=1000, data_dir=data_dir)
                    plot_tsne_pairs(pairs, tsne_of_pairs(pairs), ax, title)
    fig.suptitle("t-SNE of clean (o) and noisy (x) test encodings; colours are classes", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- sweeps (results notebook)


@dataclass
class Sweep:
    """A sweep's parent run (raven.sweep) and its trial runs: one row per seed of each trial (a trial of
    several seeds is one run holding `<metric>_seed<S>`), the searched value and objective."""

    param: str
    parent: pd.Series
    trials: pd.DataFrame  # columns: run_id, status, seed, <param>, val_robust_accuracy, val_elbo, val_mse_255

    @property
    def dataset(self) -> str:
        return str(self.parent["params.dataset"])

    @property
    def best(self) -> float:
        return float(self.parent.get(f"metrics.best_{self.param}", np.nan))

    @property
    def paper_value(self) -> float:
        return (PAPER_SIGMA_AUG if self.param == "sigma_aug" else PAPER_ETA)[self.dataset]


def load_sweep(param: str = "sigma_aug", dataset: str | None = None, experiment: str | None = None,
               tracking_uri: str | None = None) -> Sweep | None:
    """The latest sweep of `param` ("sigma_aug" or "eta") recorded by sweeps/*.py, or None when there is none."""
    import mlflow

    from raven.selection import OBJECTIVE

    use_store(tracking_uri)
    experiment = experiment or (SIGMA_SWEEP_EXPERIMENT if param == "sigma_aug" else ETA_SWEEP_EXPERIMENT)
    if mlflow.get_experiment_by_name(experiment) is None:
        return None
    query = f"tags.`raven.role` = 'sweep' and params.`search.param` = '{param}'"
    if dataset:
        query += f" and params.dataset = '{dataset}'"
    parents = mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                                 order_by=["attributes.start_time DESC"])
    if parents.empty:
        return None
    parent = parents.iloc[0]
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=(
        f"tags.mlflow.parentRunId = '{parent['run_id']}' and tags.`raven.role` = 'trial'"))
    rows = []
    for _, run in runs.iterrows():
        seeds = str(run.get("params.seed", "")).split(",")  # "0" or, for a trial of several seeds, "0,1,2"
        for seed in seeds:
            row = {"run_id": run["run_id"], "status": run["status"], param: run.get(f"params.{param}"), "seed": seed}
            for name in (OBJECTIVE, "val_elbo", "val_mse_255"):
                row[name] = run.get(f"metrics.{name}" if len(seeds) == 1 else f"metrics.{name}_seed{seed}")
            rows.append(row)
    columns = ["run_id", "status", param, "seed", OBJECTIVE, "val_elbo", "val_mse_255"]
    trials = pd.DataFrame(rows, columns=columns)
    for name in columns[2:]:
        trials[name] = pd.to_numeric(trials[name], errors="coerce")
    return Sweep(param, parent, trials.sort_values([param, "seed"]).reset_index(drop=True))


def plot_sweep(sweep: Sweep, path: str | os.PathLike | None = None) -> Figure:
    """The selection objective against the searched value (log x): trials, mean per value, best and paper's value."""
    from raven.selection import OBJECTIVE

    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    done = sweep.trials.dropna(subset=[sweep.param, OBJECTIVE])
    ax.scatter(done[sweep.param], 100 * done[OBJECTIVE], color="tab:blue", zorder=3, label="trial")
    means = done.groupby(sweep.param)[OBJECTIVE].mean()
    ax.plot(means.index, 100 * means.to_numpy(), color="tab:blue", alpha=0.5)
    if np.isfinite(sweep.best):
        ax.axvline(sweep.best, color="tab:red", linestyle="--", label=f"best {sweep.best:.4g}")
    ax.axvline(sweep.paper_value, color="tab:gray", linestyle=":", label=f"paper {sweep.paper_value:g}")
    ax.set_xscale("log")
    ax.set_xlabel(sweep.param)
    ax.set_ylabel(f"{OBJECTIVE} (%)")
    smoke = " (smoke)" if str(sweep.parent.get("params.smoke")) == "True" else ""
    ax.set_title(f"{sweep.param} sweep on {DATASET_LABELS.get(sweep.dataset, sweep.dataset)}{smoke}: "
                 "validation robust accuracy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if path is not None:
        _save(fig, path)
    return fig


# ----------------------------------------------------------------------------- Markdown


def _pm(mean: float, std: float, digits: int, kind: str = "f") -> str:
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.{digits}{kind}} ± {std:.{digits}{kind}}" if np.isfinite(std) else f"{mean:.{digits}{kind}}"


def _num(value: float, digits: int, signed: bool = False, kind: str = "f") -> str:
    if not np.isfinite(value):
        return "—"
    return f"{value:+.{digits}{kind}}" if signed else f"{value:.{digits}{kind}}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def table1_markdown(t1: pd.DataFrame) -> str:
    header = ["Dataset", "Method", "Seeds", "Means ‖μ̃ − μ‖²", "per-image std", "Sampled ‖z̃ − z‖²", "per-image std",
              "Paper (mean ± per-image std)", "Diff. means", "Diff. sampled"]
    rows = [[DATASET_LABELS.get(r.dataset, r.dataset), METHOD_LABELS.get(r.method, r.method), str(r.seeds),
             _pm(r.pair_distance_mean, r.pair_distance_mean_std_over_seeds, 3, "g"),
             _num(r.pair_distance_per_image_std, 3, kind="g"),
             _pm(r.sampled_pair_distance_mean, r.sampled_pair_distance_mean_std_over_seeds, 3, "g"),
             _num(r.sampled_pair_distance_per_image_std, 3, kind="g"), _pm(r.paper_mean, r.paper_per_image_std, 2),
             _num(r.difference_mean, 3, signed=True, kind="g"), _num(r.difference_sampled_mean, 3, signed=True, kind="g")]
            for r in t1.itertuples()]
    return markdown_table(header, rows)


def table2_markdown(t2: pd.DataFrame) -> str:
    header = ["Dataset", "Method", "Seeds", "Accuracy (%)", "Paper", "Diff.", "MSE", "Paper", "Diff.", "FID", "Paper",
              "Diff."]
    rows = []
    for r in t2.itertuples():
        rows.append([DATASET_LABELS.get(r.dataset, r.dataset), METHOD_LABELS.get(r.method, r.method), str(r.seeds),
                     _pm(r.accuracy_pct_mean, r.accuracy_pct_std, 2),
                     _pm(r.paper_accuracy_pct_mean, r.paper_accuracy_pct_std, 2),
                     _num(r.difference_accuracy_pct, 2, signed=True),
                     _pm(r.mse_255_mean, r.mse_255_std, 1), _pm(r.paper_mse_255_mean, r.paper_mse_255_std, 1),
                     _num(r.difference_mse_255, 1, signed=True),
                     _pm(r.fid_mean, r.fid_std, 3), _pm(r.paper_fid_mean, r.paper_fid_std, 3),
                     _num(r.difference_fid, 3, signed=True)])
    return markdown_table(header, rows)


def budget_line(repro: Reproduction) -> str:
    return f"**Budget: {repro.budget}**"


def write_report(out: str | os.PathLike = "report", tracking_uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                 data_dir: str | os.PathLike | None = None) -> Path:
    """Write report.md, the tables and Figure 2's data as CSV, and figure1.png / figure2.png into `out`."""
    repro = load_reproduction(tracking_uri, experiment, run_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = per_run_table(repro)
    t1, t2 = table1(repro), table2(repro)
    points = curves(repro)
    summary = curve_summary(points)
    runs.to_csv(out / "runs.csv", index=False)
    t1.to_csv(out / "table1.csv", index=False)
    t2.to_csv(out / "table2.csv", index=False)
    summary.to_csv(out / "figure2.csv", index=False)
    plot_figure2(summary, out / "figure2.png", title=repro.budget)
    plot_figure1(repro, out / "figure1.png", data_dir=data_dir)

    comparison = protocol_table(summary)
    strong_note = ("\nThe last column is the strong protocol (`raven evaluate --protocol strong`, attack `strong` in "
                   "`figure2.csv`): an image counts as correct only if the probe is right at every iterate of every "
                   "attack, AutoAttack on the probe included. It bounds the probe's true robust accuracy from above "
                   "far more tightly than the paper's attacks on the encoder. Accuracy (%), mean over seeds:\n\n"
                   f"{protocol_markdown(comparison)}\n" if not comparison.empty else "")
    fid_note = ""
    if t2["fid_mean"].isna().all():
        fid_note = "\nFID was not computed in this reproduction (its budget has no FID), so its columns are empty.\n"
    reduced = "" if repro.budget.startswith("full") else (
        "\nThis reproduction ran on a reduced budget: its numbers show that the pipeline works end to end and "
        "are not comparable with the paper's; the differences below are not evidence for or against it.\n")
    hps = "\n".join(f"- {DATASET_LABELS.get(d, d)}: {text}" for d, text in repro.hyperparameters().items())
    status = repro.parent.get("status")
    text = f"""# RAVEN reproduction report

{budget_line(repro)}

Reproduction run `{repro.run_id}` (status {status}) in experiment `{repro.experiment}` at `{repro.tracking_uri}`:
{len(repro.runs)} of {repro.planned} runs (dataset × method × seed) complete. Written
{datetime.datetime.now().isoformat(timespec="seconds")} by `raven report`.
{reduced}
Hyperparameters:
{hps}

Reference numbers are the paper's published Tables 1 and 2 (Irobe, Aoki et al., *Robust VAEs via
Generating Process of Noise Augmented Data*); "RAVEN" is the paper's "Ours". Mean ± std over seeds
(sample std) unless stated.

## Table 1: latent pair distance

Two readings over the test images, with ε ~ N(0, 0.05² I) and x + ε unclipped: the distance between
the posterior means, ‖μ(x) − μ(x + ε)‖², and between sampled latents, ‖z − z'‖² with z ~ q(·|x) and
z' ~ q(·|x + ε) drawn independently. The paper's mean ± std is over the 10⁴ MNIST test images of one
model; here the mean is averaged over seeds (± its std over seeds) and the per-image std is each
model's std over test images, averaged over seeds.

{table1_markdown(t1)}

{TABLE1_ERRATUM}

## Table 2: clean linear-probe accuracy, reconstruction MSE (0–255 scale) and FID
{fid_note}
{table2_markdown(t2)}

## Figure 2: adversarial accuracy against the attack budget δ

Linear-probe accuracy on PGD-attacked test images (L∞ ball of radius δ), mean line and ± std band
over seeds. The paper publishes this figure as a plot only; the points are in `figure2.csv`.
{strong_note}
![Figure 2](figure2.png)

## Figure 1: t-SNE of clean and noisy test encodings

The paper shows the VAE (A) and the noise-augmented VAE (B) on MNIST; every method is shown here.

![Figure 1](figure1.png)

## Files

`table1.csv`, `table2.csv` (the tables with the paper's numbers and differences), `figure2.csv`
(Figure 2's points), `runs.csv` (every run's numbers and MLflow run id), `figure1.png`, `figure2.png`.
"""
    path = out / "report.md"
    path.write_text(text)
    return path
