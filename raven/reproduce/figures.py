"""The reproduction report's figures: Figure 2 (accuracy against delta, both protocols) and Figure 1
(t-SNE of clean and noisy encodings), drawn from the runs `raven.reproduce.report` reads from MLflow,
and the artifacts and models they need.

Figure 2 reads the paper's attacks in two ways: the paper's (the probe is right after the attack,
metrics adv_acc_{attack}_delta_{delta}) and the robust one of AutoAttack and RobustBench (right on
the clean image too, adv_robust_acc_{attack}_delta_{delta}). It draws the robust reading solid and
the paper's dashed; runs logged before the robust reading existed show the paper's alone, solid.
Where the runs logged the certified protocol (certified_acc_delta_{delta}), the strong protocol's
panel holds a hatched band from the certified accuracy (lower edge) to the strong protocol's
(upper edge), labelled with the bound: its width is what the evaluation leaves open.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from raven.config import DATASETS, METHODS
from raven.methods import METHODS as REGISTRY
from raven.data import default_data_dir, load_raw, noisy_copy, to_tensor
from raven.eval.evaluate import encode_mean, tsne_embedding
from raven.eval.plots import DATASET_LABELS, PAPER_READING, READING_LABELS, ROBUST_READING
from raven.reproduce.grid import CHECKPOINT_ARTIFACTS
from raven.train import CHECKPOINT_NAME, load_checkpoint

METHOD_LABELS = {name: method.label for name, method in REGISTRY.items()}
# RAVEN in blue as in the paper's Figure 2.
METHOD_COLORS = {"raven": "tab:blue", "raven-gmm": "tab:purple", "vae": "tab:gray", "vae-noise": "tab:orange",
                 "se": "tab:green"}
ATTACK_LABELS = {"kl": "KL attack", "w2": "Wasserstein attack", "ce": "cross-entropy attack",
                 "rkl": "reverse-KL attack", "mean": "posterior-mean attack", "strong": "strong protocol (worst case)"}
STRONG = "strong"
TSNE_ARTIFACT = "robustness/tsne.png"
CERTIFIED = "certified"
PAPER_READING, ROBUST_READING = "paper", "robust"
# Every accuracy curve a run logs (raven.eval.results.EvalResult.metrics), by reading: the paper's attacks as the
# paper reads them (adv_acc_*) and robustly (adv_robust_acc_*), the strong protocol (robust_acc_*) and the
# certified bound (certified_acc_*). A pattern with two groups names its attack; one with a delta only is its own.
ACCURACY_COLUMNS = (
    (PAPER_READING, re.compile(r"^metrics\.adv_acc_([a-z0-9]+)_delta_([0-9.e-]+)$")),
    (ROBUST_READING, re.compile(r"^metrics\.adv_robust_acc_([a-z0-9]+)_delta_([0-9.e-]+)$")),
    (STRONG, re.compile(r"^metrics\.robust_acc_delta_([0-9.e-]+)$")),
    (CERTIFIED, re.compile(r"^metrics\.certified_acc_delta_([0-9.e-]+)$")),
)
CERTIFIED_BOUND_PARAM = "params.eval.certified.bound"  # raven.record.tracking.log_evaluation's settings


class ReportError(RuntimeError):
    """Nothing to report (no store, no reproduction); the message says what to run."""


# ----------------------------------------------------------------------------- figures


def ordered(values: Any, order: tuple[str, ...]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def accuracy_column(column: str) -> tuple[str, str, float] | None:
    """(reading, attack, delta) of a run column that holds a point of an accuracy curve; None for any other column.

    The strong protocol's and the certified bound's attack is the reading itself ("strong", "certified").
    """
    for reading, pattern in ACCURACY_COLUMNS:
        if match := pattern.match(column):
            attack = match.group(1) if pattern.groups == 2 else reading
            return reading, attack, float(match.group(pattern.groups))
    return None


def accuracy_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Every accuracy point the runs logged, in long form: dataset, method, seed, reading, attack, delta, accuracy.

    `runs` has search_runs metric columns and dataset, method (and seed, NaN where absent); non-finite values
    are left out. Readings: "paper", "robust", "strong", "certified" (ACCURACY_COLUMNS).
    """
    columns = ["dataset", "method", "seed", "reading", "attack", "delta", "accuracy"]
    rows = []
    for column in runs.columns:
        found = accuracy_column(str(column))
        if found is None:
            continue
        reading, attack, delta = found
        values = pd.to_numeric(runs[column], errors="coerce")
        for (_, run), value in zip(runs.iterrows(), values):
            if np.isfinite(value):
                rows.append({"dataset": run["dataset"], "method": run["method"], "seed": run.get("seed", np.nan),
                             "reading": reading, "attack": attack, "delta": delta, "accuracy": float(value)})
    return pd.DataFrame(rows, columns=columns)


def robust_reading_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Figure 2's other curves per (dataset, method, attack, delta): seeds, accuracy_mean, accuracy_std (sample std
    over seeds). The paper attacks' robust reading (adv_robust_acc_{attack}_delta_{delta}) under the attack's
    name, the certified accuracy (certified_acc_delta_{delta}) as attack "certified"; empty when none logged them.
    """
    points = accuracy_points(runs)
    points = points[points["reading"].isin([ROBUST_READING, CERTIFIED])]
    columns = ["dataset", "method", "attack", "delta", "seeds", "accuracy_mean", "accuracy_std"]
    if points.empty:
        return pd.DataFrame(columns=columns)
    grouped = points.groupby(["dataset", "method", "attack", "delta"], sort=False)["accuracy"]
    out = grouped.agg(seeds="count", accuracy_mean="mean", accuracy_std=lambda s: s.std(ddof=1)).reset_index()
    return out[columns]


def plot_figure2(summary: pd.DataFrame, path: str | os.PathLike | None = None, title: str | None = None,
                 runs: pd.DataFrame | None = None) -> Figure:
    """Figure 2: accuracy (%) vs delta, rows = datasets, columns = attacks, mean line and +-std band per method.

    The strong protocol's worst case, where present, is the last column, beside the paper's attacks.
    `summary` holds the paper's reading; `runs` (the reproduction's runs, search_runs columns), where
    they logged the robust reading, add it: solid with its band, the paper's reading dashed beside it;
    where they logged the certified accuracy, the strong panel adds it dotted, and the band from it up
    to the strong protocol's accuracy.
    """
    runs = pd.DataFrame() if runs is None else runs
    robust = robust_reading_summary(runs)
    bound = (next(iter(runs[CERTIFIED_BOUND_PARAM].dropna()), CERTIFIED) if CERTIFIED_BOUND_PARAM in runs
             else CERTIFIED)
    datasets = ordered([*summary["dataset"], *robust["dataset"]], DATASETS)
    attacks = ordered(summary["attack"], ("kl", "w2", "ce", "rkl", "mean"))
    strong = STRONG in attacks or (robust["attack"] == CERTIFIED).any()
    attacks = [a for a in attacks if a != STRONG] + ([STRONG] if strong else [])
    fig = Figure(figsize=(4.6 * len(attacks), 3.7 * len(datasets)), layout="constrained")
    axes = fig.subplots(len(datasets), len(attacks), squeeze=False)
    panel = iter("abcdefghijklmnop")
    for row, dataset in zip(axes, datasets):
        for ax, attack in zip(row, attacks):
            part = summary[(summary["dataset"] == dataset) & (summary["attack"] == attack)]
            robust_part = robust[(robust["dataset"] == dataset) & (robust["attack"] == attack)]
            both_readings, measured = False, not part.empty
            for method in ordered(part["method"], METHODS):
                line = part[part["method"] == method].sort_values("delta")
                color = METHOD_COLORS.get(method)
                label = f"{METHOD_LABELS.get(method, method)} (n={int(line['seeds'].max())})"
                robust_line = robust_part[robust_part["method"] == method].sort_values("delta")
                if not robust_line.empty:
                    both_readings = True
                    ax.plot(line["delta"], 100 * line["accuracy_mean"], linestyle="--", linewidth=1, color=color)
                    line = robust_line
                elif attack != STRONG:
                    label += ", paper's reading"
                mean, std = 100 * line["accuracy_mean"].to_numpy(), 100 * line["accuracy_std"].fillna(0).to_numpy()
                ax.plot(line["delta"], mean, marker="o", markersize=3, color=color, label=label)
                ax.fill_between(line["delta"], mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
            if attack == STRONG:
                certified = robust[(robust["dataset"] == dataset) & (robust["attack"] == CERTIFIED)]
                for method in ordered(certified["method"], METHODS):
                    _draw_certified(ax, certified[certified["method"] == method].sort_values("delta"),
                                    part[part["method"] == method].sort_values("delta"), method, bound)
                measured = measured or not certified.empty
            ax.set_title(f"({next(panel)}) {DATASET_LABELS.get(dataset, dataset)}, {ATTACK_LABELS.get(attack, attack)}",
                         fontsize=10)
            ax.set_xlabel(r"attack budget $\delta$ ($L_\infty$)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
            if not measured:  # e.g. a dataset whose runs were not evaluated with the strong protocol
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="gray")
            else:
                handles, _ = ax.get_legend_handles_labels()
                if both_readings:
                    handles += [Line2D([], [], color="gray", linestyle=style, label=READING_LABELS[reading])
                                for reading, style in ((ROBUST_READING, "-"), (PAPER_READING, "--"))]
                ax.legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig


def _draw_certified(ax: Axes, certified: pd.DataFrame, strong: pd.DataFrame, method: str, bound: str) -> None:
    """A method's certified accuracy (mean over seeds) dotted, and the band from it up to its strong accuracy."""
    color = METHOD_COLORS.get(method)
    name = METHOD_LABELS.get(method, method)
    lower = 100 * certified.set_index("delta")["accuracy_mean"]
    ax.plot(lower.index, lower.to_numpy(), linestyle=":", marker="v", markersize=3, color=color,
            label=f"{name}: certified ({bound})")
    upper = 100 * strong.set_index("delta")["accuracy_mean"]
    shared = sorted(set(lower.index) & set(upper.index))
    if shared:
        ax.fill_between(shared, lower[shared].to_numpy(), upper[shared].to_numpy(), color=color, alpha=0.15,
                        hatch="//", linewidth=0, label=f"{name}: open between {bound} and strong")


def plot_protocol_curves(points: pd.DataFrame, title: str | None = None) -> Figure:
    """One panel per method: each paper attack's accuracy (%) against delta, and the strong protocol's, dashed.

    `points` is `curves(...)`'s long table cut to the runs to show; several seeds are averaged.
    """
    methods = ordered(points["method"], METHODS)
    fig = Figure(figsize=(3.4 * len(methods), 3.2), layout="constrained")
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods):
        part = points[points["method"] == method].groupby(["attack", "delta"])["accuracy"].mean().reset_index()
        for attack in ordered(part["attack"], ("kl", "w2", "ce", "rkl", "mean", STRONG)):
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


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def download_artifact(run_id: str, artifact: str, dst: str | os.PathLike | None = None) -> Path | None:
    """A run's artifact as a local file (None when the run has no such artifact)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                        dst_path=str(dst) if dst else None))
    except Exception:  # noqa: BLE001 - MLflow raises store-specific errors for a missing artifact
        return None


def load_run_model(run_id: str, map_location: str = "cpu") -> Any:
    """The trained model of a reproduction (or any raven) run, from its logged checkpoint artifact."""
    path = download_artifact(run_id, f"{CHECKPOINT_ARTIFACTS}/{CHECKPOINT_NAME}")
    if path is None:
        raise ReportError(f"run {run_id} has no {CHECKPOINT_ARTIFACTS}/{CHECKPOINT_NAME} artifact")
    return load_checkpoint(path, map_location=map_location)


@functools.lru_cache(maxsize=2)
def _test_set(dataset: str, data_dir: str | None) -> tuple[Any, Any]:
    images, labels = load_raw(dataset, str(default_data_dir(data_dir)))["test"]
    return to_tensor(images), torch.from_numpy(labels.astype(np.int64))


def latent_pairs(model: Any, dataset: str, n: int = 1000, noise_std: float = 0.05, seed: int = 0,
                 data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Encoder means of the first n test images and of their noisy copies, labels, and pair distances.

    The noisy copy is the paper's x + eps, eps ~ N(0, noise_std^2 I), unclipped (as the encoder sees it).
    """
    test_x, test_y = _test_set(dataset, None if data_dir is None else str(data_dir))
    x, y = test_x[:n], test_y[:n]
    noisy = noisy_copy(x, noise_std, torch.Generator().manual_seed(seed))
    mu_clean, mu_noisy = encode_mean(model, x), encode_mean(model, noisy)
    distance = (mu_clean.double() - mu_noisy.double()).pow(2).sum(dim=1)
    return {"mu_clean": mu_clean.numpy(), "mu_noisy": mu_noisy.numpy(), "labels": y.numpy(),
            "pair_distance": distance.numpy()}


def tsne_of_pairs(pairs: dict[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """2-d t-SNE of the clean and noisy encodings stacked (clean first)."""
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


def plot_figure1(repro: Any, path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                 seed: int | None = None) -> Path:
    """Figure 1: the t-SNE of clean and noisy test encodings per dataset (rows) and method (columns).

    Each panel is the evaluator's robustness/tsne.png of the run with the lowest seed
    (or `seed`); a run without one is recomputed from its logged checkpoint.
    """
    runs = repro.runs if seed is None else repro.runs[repro.runs["seed"] == seed]
    datasets = ordered(runs["dataset"], DATASETS)
    methods = ordered(runs["method"], METHODS)
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
    return save_figure(fig, path)
