"""`raven report` on the smoke reproduction: every table and figure, the paper's numbers, the budget line."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
from test_reproduce import smoke_store  # noqa: F401  (the session's shared store)

from raven.config import DATASETS
from raven.methods import PAPER_METHODS as METHODS  # the reproduction's methods
from raven.reproduce.report import PAPER_TABLE1, PAPER_TABLE2
from raven.reproduce.runner import SMOKE_BUDGET
from raven.sweep.report import load_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(smoke_store, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("report")
    proc = subprocess.run([sys.executable, "-m", "raven.cli", "report", "--tracking-uri", smoke_store.tracking_uri,
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=smoke_store.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SMOKE_BUDGET.describe() in proc.stdout and f"wrote {out / 'report.md'}" in proc.stdout
    return out


def test_paper_reference_numbers_are_the_published_tables():
    assert PAPER_TABLE2["mnist"]["raven"] == {"accuracy": (92.49, 0.51), "mse": (795.946, 6.01), "fid": (20.636, 0.49)}
    assert PAPER_TABLE2["fashion-mnist"]["se"]["mse"] == (963.828, 19.64)
    assert PAPER_TABLE1["mnist"] == {"vae": (0.89, 1.29), "vae-noise": (3.24, 5.12), "raven": (0.53, 0.36)}
    for dataset in DATASETS:
        assert set(PAPER_TABLE2[dataset]) == {"vae", "vae-noise", "se", "raven"}


def test_report_writes_every_table_and_figure(report_dir):
    for name in ("report.md", "table1.csv", "table2.csv", "figure2.csv", "runs.csv", "claims.csv"):
        assert (report_dir / name).stat().st_size > 100, name
    for name in ("figure1.png", "figure2.png"):
        data = (report_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name


def test_report_starts_with_the_budget_and_holds_both_tables(report_dir):
    lines = (report_dir / "report.md").read_text().splitlines()
    assert lines[0] == "# RAVEN reproduction report"
    assert lines[2] == f"**Budget: {SMOKE_BUDGET.describe()}**"
    text = "\n".join(lines)
    assert "20 of 20 runs" in text and "not comparable with the paper's" in text
    for heading in ("## Table 1", "## Table 2", "## Figure 2", "## The paper's claims, tested", "## Figure 1"):
        assert heading in text
    assert "| MNIST | RAVEN | 2 | " in text and "| 92.49 ± 0.51 |" in text and "| 0.53 ± 0.36 |" in text
    assert "![Figure 2](figure2.png)" in text and "![Figure 1](figure1.png)" in text


def test_table2_has_a_row_per_method_with_numbers_in_range(report_dir):
    table = pd.read_csv(report_dir / "table2.csv")
    assert list(zip(table["dataset"], table["method"])) == [(d, m) for d in DATASETS for m in METHODS]
    assert (table["seeds"] == 2).all()
    assert table["accuracy_pct_mean"].between(10, 100).all() and table["accuracy_pct_std"].ge(0).all()
    assert table["mse_255_mean"].between(50, 255.0**2).all()
    assert table["fid_mean"].isna().all()  # no FID in the smoke budget
    for row in table.itertuples():
        paper = PAPER_TABLE2[row.dataset].get(row.method)
        if paper is None:  # RAVEN-GMM: not in the paper
            assert math.isnan(row.paper_accuracy_pct_mean)
            continue
        assert (row.paper_accuracy_pct_mean, row.paper_mse_255_mean, row.paper_fid_mean) == \
            (paper["accuracy"][0], paper["mse"][0], paper["fid"][0])
        assert row.difference_accuracy_pct == pytest.approx(row.accuracy_pct_mean - paper["accuracy"][0])


def test_table1_averages_over_seeds_next_to_the_paper(report_dir):
    table = pd.read_csv(report_dir / "table1.csv")
    runs = pd.read_csv(report_dir / "runs.csv")
    assert len(table) == len(DATASETS) * len(METHODS) and len(runs) == 20
    row = table[(table["dataset"] == "mnist") & (table["method"] == "vae")].iloc[0]
    seeds = runs[(runs["dataset"] == "mnist") & (runs["method"] == "vae")]
    assert row["pair_distance_mean"] == pytest.approx(seeds["pair_distance_mean"].mean())
    assert row["pair_distance_per_image_std"] == pytest.approx(seeds["pair_distance_std"].mean())
    assert (row["paper_mean"], row["paper_per_image_std"]) == (0.89, 1.29)
    assert table["pair_distance_mean"].ge(0).all()
    assert table[table["dataset"] == "fashion-mnist"]["paper_mean"].isna().all()


def test_figure2_data_has_every_attack_delta_and_method(report_dir):
    points = pd.read_csv(report_dir / "figure2.csv")
    # The paper's two attacks and, from the smoke budget's strong protocol, its worst case.
    assert set(points["attack"]) == {"kl", "w2", "strong"} and set(points["method"]) == set(METHODS)
    assert sorted(points["delta"].unique()) == [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3]
    assert len(points) == 2 * 5 * 3 * 9 and (points["seeds"] == 2).all()
    assert points["accuracy_mean"].between(0, 1).all() and points["accuracy_std"].ge(0).all()
    clean = points[points["delta"] == 0].set_index(["dataset", "method", "attack"])["accuracy_mean"]
    largest = points[points["delta"] == 0.3].set_index(["dataset", "method", "attack"])["accuracy_mean"]
    assert (largest <= clean + 1e-9).all()  # a larger budget never helps the probe
    # At delta 0 every protocol reads the clean accuracy of its own images: the paper's attacks all 300, the
    # strong protocol the first 100 (the smoke budget's strong_limit), so the two may differ, but not the attacks.
    assert (clean.xs("w2", level="attack") - clean.xs("kl", level="attack")).abs().max() < 1e-9


def test_sigma_sweep_is_read_back_for_the_results_notebook(smoke_store):  # noqa: F811
    sweep = load_sweep("sigma_aug", "mnist", tracking_uri=smoke_store.tracking_uri)
    assert sweep is not None and sweep.dataset == "mnist" and sweep.paper_value == 0.01
    assert len(sweep.trials) == 2 and sweep.trials["val_robust_accuracy"].between(0, 1).all()
    assert sweep.best in set(sweep.trials["sigma_aug"])
    assert load_sweep("sigma_aug", "fashion-mnist", tracking_uri=smoke_store.tracking_uri) is None


def test_report_without_a_reproduction_fails_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raven.cli", "report", "--tracking-uri",
                           f"sqlite:///{tmp_path / 'empty.db'}", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no MLflow experiment 'raven-reproduction'" in errors[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_figure2_reads_the_strong_protocol_beside_the_paper(tmp_path):
    from raven.reproduce.report import (
        Reproduction,
        curve_summary,
        curves,
        plot_figure2,
        protocol_markdown,
        protocol_table,
    )

    rows = []
    for method, seed, paper, strong in (("vae", 0, 0.40, 0.05), ("vae", 1, 0.50, 0.07), ("raven", 0, 0.70, 0.20)):
        rows.append({"dataset": "mnist", "method": method, "seed": seed, "run_id": f"{method}{seed}",
                     "metrics.adv_acc_kl_delta_0": 0.9, "metrics.adv_acc_kl_delta_0.1": paper,
                     "metrics.adv_acc_w2_delta_0.1": paper - 0.1, "metrics.robust_acc_delta_0": 0.9,
                     "metrics.robust_acc_delta_0.1": strong})
    repro = Reproduction("sqlite:///none", "raven-reproduction", pd.Series({"run_id": "p"}), pd.DataFrame(rows))
    summary = curve_summary(curves(repro))
    strong = summary[(summary["attack"] == "strong") & (summary["delta"] == 0.1)].set_index("method")
    assert strong.loc["vae", "accuracy_mean"] == pytest.approx(0.06) and strong.loc["vae", "seeds"] == 2
    table = protocol_table(summary, deltas=(0.1,))
    assert list(table.columns) == ["dataset", "method", "kl δ=0.1", "w2 δ=0.1", "strong δ=0.1"]
    assert list(table["method"]) == ["vae", "raven"] and table["strong δ=0.1"].tolist() == pytest.approx([6.0, 20.0])
    assert "| MNIST | RAVEN | 70.0 | 60.0 | 20.0 |" in protocol_markdown(table)
    figure = plot_figure2(summary, tmp_path / "figure2.png")
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 3 and titles[-1] == "(c) MNIST, strong protocol (worst case)"
    assert protocol_table(summary[summary["attack"] != "strong"]).empty


def test_the_wall_time_table_counts_a_packs_batched_paper_attacks_once():
    from raven.reproduce.report import spent_markdown

    # Two seeds of one pack: the batched paper attacks took 600 s for both; each seed's seconds_attack adds its
    # own strong protocol (and, on seed 0, the strong check). The stages must add up to the evaluation's wall time.
    runs = pd.DataFrame({
        "dataset": ["mnist", "mnist"], "method": ["vae", "vae"], "epochs_trained": [10, 12], "best_epoch": [5, 7],
        "train_seconds": [300.0, 300.0], "paper_attack_seconds": [600.0 + 120 + 60, 600.0 + 180],
        "strong_seconds": [120.0, 180.0], "strong_check_seconds": [60.0, float("nan")],
        "certified_seconds": [30.0, 30.0], "fid_seconds": [240.0, 240.0],
        "eval_seconds": [600.0 / 2 + 120 + 60 + 30 + 240, 600.0 / 2 + 180 + 30 + 240]})
    row = spent_markdown(runs).splitlines()[2].split(" | ")
    # Dataset, Method, Epochs, Train (pack), Paper PGD (pack), Strong, Strong check, Certified, FID, Evaluation
    assert row[2:] == ["10 (5), 12 (7)", "5.0 min", "10.0 min", "5.0 min", "1.0 min", "1.0 min", "8.0 min",
                       "25.0 min |"]  # 10 + 5 + 1 + 1 + 8: the stages add up to the evaluation
