"""Figure 2's readings: the robust reading of the paper's attacks solid, the paper's dashed, in `raven evaluate`'s
plot and the reproduction report's figure; results without the robust reading fall back to the paper's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raven.eval import plots
from raven.eval.plots import READING_LABELS, accuracy_curve_data, plot_accuracy_curves
from raven.reproduce.figures import plot_figure2, robust_reading_summary

DELTAS = ["0", "0.1", "0.2"]


def run(paper, robust=None, strong=None):
    out = {"adversarial_accuracy": {"kl": dict(zip(DELTAS, paper))}}
    if robust is not None:
        out["adversarial_robust_accuracy"] = {"kl": dict(zip(DELTAS, robust))}
    if strong is not None:
        out["robust_accuracy"] = dict(zip(DELTAS, strong))
    return out


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot_accuracy_curves draws, kept open instead of saved."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def lines(ax):
    """{linestyle: [y data in %]} of the lines on a panel."""
    out = {}
    for line in ax.get_lines():
        out.setdefault(line.get_linestyle(), []).append(list(np.round(line.get_ydata(), 9)))
    return out


def test_evaluate_plot_draws_the_robust_reading_solid_and_the_papers_dashed(drawn, tmp_path):
    runs = [run([0.9, 0.6, 0.3], [0.9, 0.5, 0.2], [0.9, 0.1, 0.0]), run([0.8, 0.4, 0.1], [0.8, 0.3, 0.1])]
    deltas, mean, _ = accuracy_curve_data(runs, "kl", "robust")
    np.testing.assert_allclose(mean, [0.85, 0.4, 0.15])
    plot_accuracy_curves([("raven", r) for r in runs], tmp_path / "curves.png")
    kl, strong = drawn[0].axes
    assert lines(kl) == {"-": [[85.0, 40.0, 15.0]], "--": [[85.0, 50.0, 20.0]]}
    legend = [t.get_text() for t in kl.get_legend().get_texts()]
    assert legend == ["raven (n=2)", READING_LABELS["robust"], READING_LABELS["paper"]]
    # The strong panel reads robust_accuracy (one run has it: the others' keys are not shared, nothing drawn).
    assert strong.get_title() == plots.STRONG_TITLE


def test_evaluate_plot_falls_back_to_the_papers_reading_for_old_results(drawn, tmp_path):
    old = run([0.9, 0.6, 0.3])  # a robustness.json written before adversarial_robust_accuracy existed
    assert accuracy_curve_data([old], "kl", "robust")[0].size == 0
    plot_accuracy_curves([("vae", old)], tmp_path / "curves.png")
    (kl,) = drawn[0].axes
    assert lines(kl) == {"-": [[90.0, 60.0, 30.0]]}
    assert [t.get_text() for t in kl.get_legend().get_texts()] == ["vae, paper's reading"]


def test_figure2_draws_the_robust_reading_from_the_runs_and_the_papers_dashed(tmp_path):
    summary = pd.DataFrame([
        {"dataset": "mnist", "method": method, "attack": "kl", "delta": d, "seeds": 2, "accuracy_mean": a,
         "accuracy_std": 0.0} for method in ("vae", "raven") for d, a in ((0.0, 0.9), (0.1, 0.5))])
    runs = pd.DataFrame([  # vae logged the robust reading; raven's runs are older
        {"dataset": "mnist", "method": "vae", "seed": seed, "metrics.adv_robust_acc_kl_delta_0": 0.9,
         "metrics.adv_robust_acc_kl_delta_0.1": value, "metrics.adv_acc_kl_delta_0.1": 0.5}
        for seed, value in ((0, 0.3), (1, 0.4))] + [{"dataset": "mnist", "method": "raven", "seed": 0}])
    robust = robust_reading_summary(runs).set_index("delta")
    assert robust.loc[0.1, "accuracy_mean"] == pytest.approx(0.35) and robust.loc[0.1, "seeds"] == 2
    assert robust.loc[0.1, "accuracy_std"] == pytest.approx(np.std([0.3, 0.4], ddof=1))
    figure = plot_figure2(summary, tmp_path / "figure2.png", runs=runs)
    (ax,) = figure.axes
    drawn = {line.get_label(): (line.get_linestyle(), list(np.round(line.get_ydata(), 9))) for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    assert drawn == {"VAE (n=2)": ("-", [90.0, 35.0]), "RAVEN (n=2), paper's reading": ("-", [90.0, 50.0])}
    dashed = [list(np.round(line.get_ydata(), 9)) for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert dashed == [[90.0, 50.0]]  # vae's paper reading, beside its robust one
    assert READING_LABELS["paper"] in [t.get_text() for t in ax.get_legend().get_texts()]
    assert (tmp_path / "figure2.png").stat().st_size > 1000


def band(ax):
    """(label, sorted y values in %) of the hatched band on a panel."""
    (gap,) = [c for c in ax.collections if c.get_hatch() == "//"]
    return gap.get_label(), sorted({round(float(v), 9) for v in gap.get_paths()[0].vertices[:, 1]})


def test_evaluate_plot_bands_the_gap_from_certified_to_strong(drawn, tmp_path):
    runs = [{**run([0.9, 0.6, 0.3], [0.9, 0.5, 0.2], [0.9, 0.4, 0.1]),
             "certified_accuracy": dict(zip(DELTAS, [0.9, 0.2, 0.0])), "certified_bound": "crown-fp32"}]
    plot_accuracy_curves([("raven", r) for r in runs], tmp_path / "curves.png")
    _, strong = drawn[0].axes
    assert strong.get_title() == plots.GAP_TITLE
    assert band(strong) == ("raven: open between crown-fp32 and strong", [0.0, 10.0, 20.0, 40.0, 90.0])
    dotted = [list(line.get_ydata()) for line in strong.get_lines() if line.get_linestyle() == ":"]
    assert dotted == [[90.0, 20.0, 0.0]]
    # The certified protocol alone still gets its panel, without a band.
    drawn.clear()
    plot_accuracy_curves([("raven", {"certified_accuracy": {"0": 0.9, "0.1": 0.2}})], tmp_path / "alone.png")
    (alone,) = drawn[0].axes
    assert [c for c in alone.collections if c.get_hatch() == "//"] == []
    assert [t.get_text() for t in alone.get_legend().get_texts()] == ["raven: certified (certified)"]


def test_figure2_bands_the_gap_from_certified_to_strong(tmp_path):
    summary = pd.DataFrame([{"dataset": "mnist", "method": "vae", "attack": "strong", "delta": d, "seeds": 2,
                             "accuracy_mean": a, "accuracy_std": 0.0} for d, a in ((0.0, 0.9), (0.01, 0.5))])
    runs = pd.DataFrame([{"dataset": "mnist", "method": "vae", "seed": seed,
                          "params.eval.certified.bound": "crown-fp32", "metrics.certified_acc_delta_0": 0.9,
                          "metrics.certified_acc_delta_0.01": value}
                         for seed, value in ((0, 0.1), (1, 0.3))])
    figure = plot_figure2(summary, tmp_path / "figure2.png", runs=runs)
    (ax,) = figure.axes
    assert band(ax) == ("VAE: open between crown-fp32 and strong", [20.0, 50.0, 90.0])
    # Certified runs without the strong protocol still get the strong panel, with their dotted line.
    figure = plot_figure2(summary.iloc[:0], runs=runs)
    (ax,) = figure.axes
    assert [list(np.round(line.get_ydata(), 9)) for line in ax.get_lines()] == [[90.0, 20.0]]
