"""`raven report`: the paper's Tables 1-2 and Figures 1-2 from a reproduction recorded in MLflow.

Everything is read through `mlflow.search_runs` (pandas) from the reproduction's parent run
(raven.reproduce.runner) and its complete child runs, one per (dataset, method, seed), and set
next to the paper's published numbers. The report states the run budget on its first
line: numbers from a reduced budget are not comparable with the paper's; fewer seeds or cells at the
full budget for each model are (each model is), with rougher spreads.

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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from raven.config import DATASETS, METHODS, ConfigError
from raven.eval.plots import DATASET_LABELS
from raven.record.tracking import use_store
from raven.record.tracking import COMPLETE_TAG
from raven.record.tracking import REPRODUCTION_EXPERIMENT as DEFAULT_EXPERIMENT
from raven.record.tracking import REPRODUCTION_ROLE as ROLE
from raven.record.tracking import REPRODUCTION_RUN_ROLE as CHILD_ROLE
from raven.reproduce.figures import (  # noqa: F401 - the notebooks read these through raven.reproduce.report
    ATTACK_LABELS,
    CERTIFIED,
    METHOD_COLORS,
    METHOD_LABELS,
    PAPER_READING,
    STRONG,
    ReportError,
    accuracy_points,
    download_artifact,
    latent_pairs,
    load_run_model,
    ordered,
    plot_figure1,
    plot_figure2,
    plot_protocol_curves,
    plot_tsne_pairs,
    robust_reading_summary,
    save_figure,
    tsne_of_pairs,
)
from raven.reproduce.grid import PAPER_METHODS, PAPER_SEEDS
from raven.reproduce.parts import parts_frames, parts_under_way, under_way_markdown
from raven.reproduce.paper import PAPER_TABLE1, PAPER_TABLE2, TABLE1_ERRATUM
from raven.reproduce.reading import (
    BAND_LEGEND,
    band_mark,
    claim_comparisons,
    claims_section,
    markdown_table,
    number,
    plus_minus,
    within_band,
)

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


def load_reproduction(tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                      run_id: str | None = None) -> Reproduction:
    """The reproduction `run_id`, else the latest in `experiment`, with its complete child runs."""
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


def load_parts(folders: list[str | os.PathLike]) -> Reproduction:
    """A reproduction run in parts (raven.reproduce.parts), merged from one or more folders, read like one from MLflow."""
    try:
        parent, runs, _ = parts_frames(list(folders))
    except ConfigError as exc:
        raise ReportError(str(exc)) from None
    return Reproduction("parts: " + ", ".join(str(f) for f in folders), "parts", parent, runs)


def per_run_table(repro: Reproduction) -> pd.DataFrame:
    """One row per (dataset, method, seed): the headline numbers of every run."""
    columns = {"metrics.clean_accuracy": "clean_accuracy", "metrics.mse_255": "mse_255", "metrics.fid": "fid",
               "metrics.latent_pair_distance_mean": "pair_distance_mean",
               "metrics.latent_pair_distance_std": "pair_distance_std",
               "metrics.latent_pair_distance_sampled_mean": "sampled_pair_distance_mean",
               "metrics.latent_pair_distance_sampled_std": "sampled_pair_distance_std",
               "metrics.cluster_accuracy": "cluster_accuracy",
               "metrics.epochs_trained": "epochs_trained", "metrics.best_epoch": "best_epoch",
               "metrics.best_val_elbo": "best_val_elbo", "metrics.train_seconds": "train_seconds",
               "metrics.eval_seconds": "eval_seconds", "metrics.seconds_attack": "paper_attack_seconds",
               "metrics.seconds_strong": "strong_seconds", "metrics.seconds_strong_check": "strong_check_seconds",
               "metrics.seconds_certified": "certified_seconds", "metrics.seconds_fid": "fid_seconds"}
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
    """Clean probe accuracy (%), MSE (0-255) and FID, mean and std over seeds, next to the paper's Table 2.

    within_paper_2sd_*: 1 when the mean lies within the paper's mean ± 2 × its std over runs, 0 outside
    (raven.reproduce.reading.within_band).
    """
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
                        f"difference_{name}": ours["mean"] - published[0],
                        f"within_paper_2sd_{name}": within_band(ours["mean"], *published)})
        rows.append(row)
    return pd.DataFrame(rows)


def curves(repro: Reproduction) -> pd.DataFrame:
    """Long table of adversarial accuracy: dataset, method, seed, attack, delta, accuracy (one row per point).

    The paper's reading of its attacks, and the strong protocol's robust accuracy, where the runs logged it,
    as the attack "strong".
    """
    points = accuracy_points(repro.runs)
    points = points[points["reading"].isin([PAPER_READING, STRONG])].drop(columns="reading")
    if points.empty:
        raise ReportError(f"reproduction {repro.run_id} logged no adversarial accuracy (metrics adv_acc_*_delta_*)")
    return points.sort_values(["dataset", "method", "attack", "delta", "seed"]).reset_index(drop=True)


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
    attacks = [a for a in ordered(part["attack"], ("kl", "w2", "ce", "rkl", "mean")) if a != STRONG] + [STRONG]
    columns = [f"{a} δ={d:g}" for a in attacks for d in deltas if f"{a} δ={d:g}" in table.columns]
    order = {name: i for i, name in enumerate(DATASETS + METHODS)}
    table = table[columns].reset_index()
    return table.sort_values(["dataset", "method"], key=lambda c: c.map(order)).reset_index(drop=True)


def bracket_table(summary: pd.DataFrame, robust: pd.DataFrame) -> pd.DataFrame:
    """The probe's true robust accuracy bracketed: per (dataset, method, delta), the certified accuracy (a lower
    bound), the strong protocol's (an upper bound) and the gap between them, in %, means over seeds; empty
    without both."""
    strong = summary[summary["attack"] == STRONG][["dataset", "method", "delta", "accuracy_mean"]]
    certified = robust[robust["attack"] == CERTIFIED][["dataset", "method", "delta", "accuracy_mean"]]
    if strong.empty or certified.empty:
        return pd.DataFrame()
    key = ["dataset", "method", "delta"]
    table = certified.assign(delta=certified["delta"].round(6)).merge(
        strong.assign(delta=strong["delta"].round(6)), on=key, suffixes=("_certified", "_strong"))
    table = table.rename(columns={"accuracy_mean_certified": "certified_pct", "accuracy_mean_strong": "strong_pct"})
    table[["certified_pct", "strong_pct"]] *= 100
    table["gap_points"] = table["strong_pct"] - table["certified_pct"]
    order = {name: i for i, name in enumerate(DATASETS + METHODS)}
    return table.sort_values(key, key=lambda c: c.map(order) if c.name != "delta" else c).reset_index(drop=True)


def bracket_markdown(table: pd.DataFrame, bound: str) -> str:
    """[certified, strong] per (dataset, method) and delta; a gap under 5 points in bold."""
    deltas = sorted(d for d in table["delta"].unique() if d > 0)
    header = ["Dataset", "Method"] + [f"δ={d:g}" for d in deltas]
    rows = []
    for (dataset, method), group in table.groupby(["dataset", "method"], sort=False):
        cells = []
        for d in deltas:
            row = group[group["delta"] == d]
            if row.empty:
                cells.append("—")
                continue
            r = row.iloc[0]
            text = f"[{r.certified_pct:.1f}, {r.strong_pct:.1f}]"
            cells.append(f"**{text}**" if r.gap_points < 5 else text)
        rows.append([DATASET_LABELS.get(dataset, dataset), METHOD_LABELS.get(method, method)] + cells)
    return (f"Robust accuracy (%) bracketed as [certified ({bound}), strong protocol], mean over seeds; in bold "
            "where the two bounds are less than 5 points apart:\n\n" + markdown_table(header, rows))


def protocol_markdown(table: pd.DataFrame) -> str:
    header = ["Dataset", "Method"] + [c for c in table.columns if c not in ("dataset", "method")]
    rows = [[DATASET_LABELS.get(r["dataset"], r["dataset"]), METHOD_LABELS.get(r["method"], r["method"])]
            + [number(r[c], 1) for c in header[2:]] for _, r in table.iterrows()]
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- Markdown


def table1_markdown(t1: pd.DataFrame) -> str:
    header = ["Dataset", "Method", "Seeds", "Means ‖μ̃ − μ‖²", "per-image std", "Sampled ‖z̃ − z‖²", "per-image std",
              "Paper (mean ± per-image std)", "Diff. means", "Diff. sampled"]
    rows = [[DATASET_LABELS.get(r.dataset, r.dataset), METHOD_LABELS.get(r.method, r.method), str(r.seeds),
             plus_minus(r.pair_distance_mean, r.pair_distance_mean_std_over_seeds, 3, "g"),
             number(r.pair_distance_per_image_std, 3, kind="g"),
             plus_minus(r.sampled_pair_distance_mean, r.sampled_pair_distance_mean_std_over_seeds, 3, "g"),
             number(r.sampled_pair_distance_per_image_std, 3, kind="g"), plus_minus(r.paper_mean, r.paper_per_image_std, 2),
             number(r.difference_mean, 3, signed=True, kind="g"), number(r.difference_sampled_mean, 3, signed=True, kind="g")]
            for r in t1.itertuples()]
    return markdown_table(header, rows)


def table2_markdown(t2: pd.DataFrame) -> str:
    header = ["Dataset", "Method", "Seeds", "Accuracy (%)", "Paper", "Diff.", "MSE", "Paper", "Diff.", "FID", "Paper",
              "Diff."]
    rows = []
    for r in t2.itertuples():
        rows.append([DATASET_LABELS.get(r.dataset, r.dataset), METHOD_LABELS.get(r.method, r.method), str(r.seeds),
                     plus_minus(r.accuracy_pct_mean, r.accuracy_pct_std, 2),
                     plus_minus(r.paper_accuracy_pct_mean, r.paper_accuracy_pct_std, 2),
                     number(r.difference_accuracy_pct, 2, signed=True) + band_mark(r.within_paper_2sd_accuracy_pct),
                     plus_minus(r.mse_255_mean, r.mse_255_std, 1), plus_minus(r.paper_mse_255_mean, r.paper_mse_255_std, 1),
                     number(r.difference_mse_255, 1, signed=True) + band_mark(r.within_paper_2sd_mse_255),
                     plus_minus(r.fid_mean, r.fid_std, 3), plus_minus(r.paper_fid_mean, r.paper_fid_std, 3),
                     number(r.difference_fid, 3, signed=True) + band_mark(r.within_paper_2sd_fid)])
    return markdown_table(header, rows)


def spent_markdown(runs: pd.DataFrame) -> str:
    """Per (dataset, method): the epochs each seed trained (best epoch, whose weights were kept), the pack's
    training and batched paper attacks (raven.eval.pack_eval: one wall time for all its seeds), and each
    per-seed evaluation stage's wall time summed over the seeds."""
    header = ["Dataset", "Method", "Epochs trained (best)", "Train (pack)", "Paper PGD (pack)", "Strong",
              "Strong check", "Certified", "FID", "Evaluation (all seeds)"]
    rows = []

    def minutes(value: float) -> str:
        return f"{value / 60:.1f} min" if np.isfinite(value) and value > 0 else "—"

    for (dataset, method), group in runs.groupby(["dataset", "method"], sort=False):
        epochs = ", ".join(f"{e:.0f}" + (f" ({b:.0f})" if np.isfinite(b) else "")
                           for e, b in zip(group["epochs_trained"], group["best_epoch"]))
        # A pack's training and its batched paper attacks are shared by its seeds: every seed's row holds the
        # pack's time. A seed's seconds_attack is that shared time plus its own strong protocol and check.
        own = group[["strong_seconds", "strong_check_seconds"]].fillna(0.0).sum(axis=1)
        paper = (group["paper_attack_seconds"] - own).clip(lower=0.0)
        rows.append([DATASET_LABELS.get(dataset, dataset), METHOD_LABELS.get(method, method), epochs,
                     minutes(group["train_seconds"].max()), minutes(paper.max()),
                     *(minutes(group[c].sum(min_count=1)) for c in ("strong_seconds", "strong_check_seconds",
                                                                    "certified_seconds", "fid_seconds",
                                                                    "eval_seconds"))])
    return markdown_table(header, rows)


def budget_line(repro: Reproduction) -> str:
    return f"**Budget: {repro.budget}**"


def write_report(out: str | os.PathLike = "report", tracking_uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                 data_dir: str | os.PathLike | None = None, parts: list[str | os.PathLike] | None = None) -> Path:
    """Write report.md, the tables and Figure 2's data as CSV, and figure1.png / figure2.png into `out`.

    parts: read a reproduction run in parts (raven.reproduce.parts) from these folders instead of MLflow;
    its parts hold no models, so Figure 1 (t-SNE of the models' encodings) is left out.
    """
    repro = load_parts(parts) if parts else load_reproduction(tracking_uri, experiment, run_id)
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
    robust = robust_reading_summary(repro.runs)
    if not robust.empty:
        robust.to_csv(out / "figure2_robust.csv", index=False)
    plot_figure2(summary, out / "figure2.png", title=repro.budget, runs=repro.runs)
    if not parts:
        plot_figure1(repro, out / "figure1.png", data_dir=data_dir)

    comparison = protocol_table(summary)
    strong_note = ("\nThe last column is the strong protocol (`raven evaluate --protocol strong`, attack `strong` in "
                   "`figure2.csv`): an image counts as correct only if the probe is right at every iterate of every "
                   "attack, AutoAttack on the probe included. It bounds the probe's true robust accuracy from above "
                   "far more tightly than the paper's attacks on the encoder. Accuracy (%), mean over seeds:\n\n"
                   f"{protocol_markdown(comparison)}\n" if not comparison.empty else "")
    brackets = bracket_table(summary, robust)
    if not brackets.empty:
        brackets.to_csv(out / "brackets.csv", index=False)
    bound_column = "params.eval.certified.bound"
    bound = next(iter(repro.runs[bound_column].dropna()), "certified") if bound_column in repro.runs else "certified"
    bracket_note = ("\n### The true robust accuracy, bracketed\n\nThe strong protocol's accuracy bounds the probe's "
                    "true robust accuracy from above; the certified accuracy (bound propagation through the encoder's "
                    "mean head and the probe, `raven evaluate --protocol certified`) bounds it from below, on the same "
                    "images. Figure 2 draws the band between them.\n\n" + bracket_markdown(brackets, bound) + "\n"
                    if not brackets.empty else "")
    robust_note = ("\nFigure 2 draws each attack of the paper in two readings: solid, the robust one (an image counts "
                   "only if the probe is right on the clean image and after the attack, as AutoAttack and RobustBench "
                   "count; `figure2_robust.csv`), and dashed, the paper's (right after the attack, whatever it was "
                   "before; `figure2.csv`).\n" if (not robust.empty and (robust["attack"] != CERTIFIED).any()) else "")
    fid_note = ""
    if t2["fid_mean"].isna().all():
        fid_note = "\nFID was not computed in this reproduction (its budget has no FID), so its columns are empty.\n"
    seeds = int(repro.parent.get("params.budget.seeds") or PAPER_SEEDS)
    if repro.budget.startswith("full") and seeds >= PAPER_SEEDS:
        reduced = ""
    elif repro.budget.startswith("full"):  # each model at the full budget, fewer seeds: comparable, less precise
        reduced = (f"\nEach model was trained and evaluated at the full budget, so its numbers are comparable with the "
                   f"paper's; with {seeds} seeds instead of {PAPER_SEEDS}, a mean and std over seeds are rougher "
                   "estimates than the paper's, and two methods closer than their spread are not separated.\n")
    else:
        reduced = ("\nThis reproduction ran on a reduced budget: its numbers show that the pipeline works end to end "
                   "and are not comparable with the paper's; the differences below are not evidence for or against "
                   "it.\n")
    comparisons = claim_comparisons(repro.runs)
    comparisons.to_csv(out / "claims.csv", index=False)
    hps = "\n".join(f"- {DATASET_LABELS.get(d, d)}: {text}" for d, text in repro.hyperparameters().items())
    status = repro.parent.get("status")
    cells = repro.runs[["dataset", "method"]].drop_duplicates().shape[0]
    source = (f"Reproduction in parts ({status}, {cells} of the full grid's {len(DATASETS) * len(PAPER_METHODS)} "
              f"(dataset, method) cells; `raven report --parts`) from {repro.tracking_uri.removeprefix('parts: ')}"
              if parts else f"Reproduction run `{repro.run_id}` (status {status}) in experiment `{repro.experiment}` at "
              f"`{repro.tracking_uri}`")
    under_way = under_way_markdown(parts_under_way(list(parts))) if parts else ""
    under_way = (f"\n## Parts under way\n\nParts not finished yet, left out of the tables above until all their seeds "
                 f"are in; what each seed has kept (`seeds/`), where a stopped run resumes:\n\n{under_way}\n"
                 if under_way else "")
    figure1 = ("Left out: a reproduction in parts keeps no models (they stay in its work folder)." if parts else
               "The paper shows the VAE (A) and the noise-augmented VAE (B) on MNIST; every method is shown here.\n\n"
               "![Figure 1](figure1.png)")
    text = f"""# RAVEN reproduction report

{budget_line(repro)}

{source}:
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

{BAND_LEGEND}

## Figure 2: adversarial accuracy against the attack budget δ

Linear-probe accuracy on PGD-attacked test images (L∞ ball of radius δ), mean line and ± std band
over seeds. The paper publishes this figure as a plot only; the points are in `figure2.csv`.
{robust_note}{strong_note}{bracket_note}
![Figure 2](figure2.png)

{claims_section(comparisons)}

## Figure 1: t-SNE of clean and noisy test encodings

{figure1}

## Epochs and wall time

Epochs each seed trained (in brackets the best epoch by validation ELBO, whose weights early stopping
keeps), the pack's training and its paper attacks (the seeds' encoders attacked in one batched pass),
and each of the other evaluation stages summed over the seeds; the stages add up to the evaluation's
wall time, t-SNE and the probe aside.

{spent_markdown(runs)}
{under_way}
## Files

`table1.csv`, `table2.csv` (the tables with the paper's numbers, differences and ±2σ marks), `claims.csv`
(every comparison the claims make: means, difference, Welch's p, verdict), `figure2.csv`
(Figure 2's points, the paper's reading, and the strong protocol as attack `strong`), `figure2_robust.csv`
(the robust reading, and the certified accuracy as attack `certified`), `brackets.csv` ([certified, strong]
per δ), `runs.csv` (every run's numbers and run id), `figure1.png`, `figure2.png`; where a run lacks a
protocol, its file is absent.
"""
    path = out / "report.md"
    path.write_text(text)
    return path
