"""Figures of the robustness evaluation, drawn with matplotlib's Agg backend (no display needed).

* `plot_accuracy_curves`: adversarial accuracy against the attack budget delta, one panel
  per attack of the paper's protocol and, beside them, one for the strong protocol's
  worst case (robust accuracy), one line per label (Figure 2). In a paper attack's panel the
  solid line counts an image only if the probe is right on the clean image and after the
  attack (adversarial_robust_accuracy), the dashed line is the paper's reading, right after
  the attack (adversarial_accuracy); results written before the first existed show the
  paper's reading alone, solid, and say so in the legend. Runs sharing a label (seeds of one
  setting) are drawn as their mean with a +-1 standard deviation band (sample std over runs).
  Where a run has the certified protocol's accuracy, the strong panel draws it dotted, and
  where it has both, a hatched band from the certified accuracy (lower edge, a sound bound) to
  the strong protocol's (upper edge): the band's width is what the evaluation leaves open.
* `plot_reconstructions`: test images above their mean reconstructions sigmoid(Dec(mu_x)).
* `plot_tsne`: a 2-d t-SNE of clean and noisy test encodings coloured by class, clean as
  dots and noisy as crosses (Figure 1).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, and safe in worker processes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

ATTACK_TITLES = {"kl": "KL attack", "w2": "Wasserstein-2 attack", "ce": "end-to-end cross-entropy attack",
                 "rkl": "reverse-KL attack", "mean": "posterior-mean attack"}
DATASET_LABELS = {"mnist": "MNIST", "fashion-mnist": "F-MNIST"}
STRONG = "strong"  # the panel of the strong protocol's robust accuracy
STRONG_TITLE = "strong protocol: worst case over all attacks"
CERTIFIED = "certified"  # the certified protocol's accuracy, drawn in the strong panel
GAP_TITLE = "robust accuracy: certified (lower) to strong (upper)"
PAPER_READING = "paper"  # adversarial_accuracy: the probe is right after the attack
ROBUST_READING = "robust"  # adversarial_robust_accuracy: right on the clean image and after the attack
READING_KEYS = {PAPER_READING: "adversarial_accuracy", ROBUST_READING: "adversarial_robust_accuracy"}
READING_LABELS = {ROBUST_READING: "solid: right clean and after the attack",
                  PAPER_READING: "dashed: right after the attack (paper's reading)"}


def curve(run: dict[str, Any], attack: str, reading: str = PAPER_READING) -> dict[str, float]:
    """One accuracy-vs-delta curve of a robustness.json dict: a paper attack's in `reading`, or STRONG's robust
    accuracy. A result written before the robust reading existed has none ({})."""
    if attack == STRONG:
        return run.get("robust_accuracy") or {}
    if attack == CERTIFIED:
        return run.get("certified_accuracy") or {}
    return (run.get(READING_KEYS[reading]) or {}).get(attack, {})


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def accuracy_curve_data(runs: Sequence[dict[str, Any]], attack: str,
                        reading: str = PAPER_READING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(deltas, mean, std) over `runs` (robustness.json dicts) for one attack (or STRONG) in `reading`, on the
    deltas all share.

    std is the sample standard deviation over runs (0 for a single run).
    """
    keys = None
    for run in runs:
        run_keys = set(curve(run, attack, reading))
        keys = run_keys if keys is None else keys & run_keys
    keys = sorted(keys or (), key=float)
    deltas = np.array([float(k) for k in keys])
    values = np.array([[curve(run, attack, reading)[k] for k in keys] for run in runs], dtype=float)
    if len(keys) == 0:
        return deltas, np.zeros(0), np.zeros(0)
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
    return deltas, mean, std


def plot_accuracy_curves(entries: Iterable[tuple[str, dict[str, Any]]], path: str | os.PathLike,
                         attacks: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Figure 2: accuracy vs delta per attack for labelled robustness results; returns the file written.

    `entries` are (label, robustness.json dict) pairs; several entries with one label are
    averaged (mean line, +-std band). A paper attack's line is its robust reading, with the
    paper's reading dashed beside it (the paper's alone, solid, for results without the robust one).
    `attacks` (default: every paper attack present) that no run measured are left out; the
    STRONG panel is added when any run has the strong protocol's robust accuracy or the
    certified accuracy (dotted, with a band up to the strong accuracy where both exist).
    """
    groups: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for label, result in entries:
        groups.setdefault(label, []).append(result)
    if not groups:
        raise ValueError("no results to plot")
    runs_all = [run for runs in groups.values() for run in runs]
    present = list(dict.fromkeys(a for run in runs_all for a in (run.get("adversarial_accuracy") or {})))
    attacks = [a for a in (present if attacks is None else attacks) if a in present]
    if any(curve(run, STRONG) or curve(run, CERTIFIED) for run in runs_all):
        attacks.append(STRONG)
    if not attacks:
        raise ValueError("the results hold no accuracy curve to plot")
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.6 * len(attacks), 3.8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, attack in zip(axes[0], attacks):
        both_readings = False
        for i, (label, runs) in enumerate(groups.items()):
            color = colors[i % len(colors)]
            suffix = f" (n={len(runs)})" if len(runs) > 1 else ""
            deltas, mean, std = accuracy_curve_data(runs, attack, ROBUST_READING)
            if attack != STRONG and len(deltas):
                # Beside the robust reading, the paper's, dashed.
                both_readings = True
                paper_deltas, paper_mean, _ = accuracy_curve_data(runs, attack, PAPER_READING)
                ax.plot(paper_deltas, 100 * paper_mean, linestyle="--", linewidth=1, color=color)
            elif attack != STRONG:
                deltas, mean, std = accuracy_curve_data(runs, attack, PAPER_READING)
                suffix += ", paper's reading"
            if len(deltas) == 0:
                continue
            ax.plot(deltas, 100 * mean, marker="o", markersize=3, color=color, label=label + suffix)
            if len(runs) > 1:
                ax.fill_between(deltas, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.2, linewidth=0)
        certified = attack == STRONG and any(curve(run, CERTIFIED) for run in runs_all)
        if certified:
            for i, (label, runs) in enumerate(groups.items()):
                _draw_certified(ax, label, runs, colors[i % len(colors)])
        heading = GAP_TITLE if certified else STRONG_TITLE if attack == STRONG else ATTACK_TITLES.get(attack, attack)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel(r"attack budget $\delta$ ($L_\infty$)")
        ax.set_ylabel("linear-probe accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if both_readings:
            handles += [Line2D([], [], color="gray", linestyle=style, label=READING_LABELS[reading])
                        for reading, style in ((ROBUST_READING, "-"), (PAPER_READING, "--"))]
        ax.legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _draw_certified(ax: plt.Axes, label: str, runs: list[dict[str, Any]], color: str) -> None:
    """The certified accuracy dotted and, where the strong protocol's exists too, the band between them."""
    deltas, lower, _ = accuracy_curve_data(runs, CERTIFIED)
    if len(deltas) == 0:
        return
    bound = next((run.get("certified_bound") for run in runs if run.get("certified_bound")), CERTIFIED)
    ax.plot(deltas, 100 * lower, linestyle=":", marker="v", markersize=3, color=color,
            label=f"{label}: certified ({bound})")
    strong_deltas, upper, _ = accuracy_curve_data(runs, STRONG)
    shared = np.intersect1d(deltas, strong_deltas)
    if len(shared):
        low = lower[np.isin(deltas, shared)]
        high = upper[np.isin(strong_deltas, shared)]
        ax.fill_between(shared, 100 * low, 100 * high, color=color, alpha=0.15, hatch="//", linewidth=0,
                        label=f"{label}: open between {bound} and strong")


def plot_reconstructions(images: np.ndarray, reconstructions: np.ndarray, path: str | os.PathLike,
                         title: str | None = None) -> Path:
    """Originals (top row) above their reconstructions (bottom row); arrays (n, 784) in [0, 1]."""
    images = np.asarray(images).reshape(-1, 28, 28)
    reconstructions = np.asarray(reconstructions).reshape(-1, 28, 28)
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.0 * n, 2.3), squeeze=False)
    for j in range(n):
        for i, picture in enumerate((images[j], reconstructions[j])):
            axes[i, j].imshow(picture, cmap="gray", vmin=0.0, vmax=1.0)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    axes[0, 0].set_ylabel("test", fontsize=8)
    axes[1, 0].set_ylabel("recon.", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_tsne(embedding: np.ndarray, labels: np.ndarray, noisy: np.ndarray, path: str | os.PathLike,
              title: str | None = None) -> Path:
    """Figure 1: 2-d points coloured by class; `noisy` (bool per point) picks crosses over dots."""
    embedding = np.asarray(embedding)
    labels = np.asarray(labels)
    noisy = np.asarray(noisy, dtype=bool)
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.0, 5.2))
    for cls in np.unique(labels):
        for is_noisy, marker, size in ((False, "o", 6), (True, "x", 8)):
            sel = (labels == cls) & (noisy == is_noisy)
            if sel.any():
                ax.scatter(embedding[sel, 0], embedding[sel, 1], s=size, marker=marker, color=cmap(int(cls) % 10),
                           linewidths=0.6, alpha=0.7, label=str(cls) if not is_noisy else None)
    ax.scatter([], [], marker="o", color="gray", s=12, label="clean")
    ax.scatter([], [], marker="x", color="gray", s=12, label="noisy")
    ax.legend(fontsize=7, markerscale=1.5, loc="upper right", ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)
