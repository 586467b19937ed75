"""The reading against the paper: Welch's verdicts, the claims' comparisons, the ±2σ band (raven.reproduce.reading)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from raven.reproduce.reading import (
    AGAINST,
    ALPHA,
    CLAIMS,
    HOLDS,
    NOT_SEPARATED,
    UNTESTED,
    claim_comparisons,
    claims_markdown,
    compare,
    measurements,
    within_band,
)
from raven.reproduce.report import Reproduction, table2, table2_markdown


def welch_p(a, b):
    """Welch's two-sided p by hand: t on the unpooled standard error, Welch-Satterthwaite degrees of freedom."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * stats.t.sf(abs(t), df)


@pytest.mark.parametrize("a, b", [([60.0, 61.0, 62.0], [30.0, 31.0, 29.0]), ([60.0, 58.0, 63.0], [59.0, 61.0, 60.5]),
                                  ([50.0, 52.0, 51.0], [47.0, 49.5, 48.0]), ([10.0, 10.5, 30.0], [9.0, 9.5, 10.0])])
def test_a_verdict_follows_welchs_test_at_alpha_in_the_claimed_direction(a, b):
    p = welch_p(a, b)
    verdict, reported = compare(a, b, "higher")
    assert reported == pytest.approx(p, rel=1e-9)
    assert verdict == (HOLDS if p < ALPHA else NOT_SEPARATED)
    # The same pair read the other way round: separated against the claim, or still not separated.
    assert compare(b, a, "higher")[0] == (AGAINST if p < ALPHA else NOT_SEPARATED)
    assert compare(b, a, "lower")[0] == verdict
    # "does not help": holds unless separated above.
    assert compare(a, b, "not higher")[0] == (AGAINST if p < ALPHA else HOLDS)
    assert compare(b, a, "not higher")[0] == HOLDS


def test_seeds_without_spread_separate_exactly_when_the_means_differ_and_one_seed_is_untested():
    assert compare([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], "higher") == (NOT_SEPARATED, 1.0)
    assert compare([1.0, 1.0, 1.0], [0.0, 0.0, 0.0], "higher") == (HOLDS, 0.0)
    assert compare([1.0], [0.0, 0.5], "higher")[0] == UNTESTED


def _runs():
    """3 seeds of four methods on MNIST: RAVEN far ahead of the VAE at delta 0.1 (KL, paper's reading), level with SE,
    behind VAE (noise) under the strong protocol; VAE (noise) separated above the VAE."""
    values = {  # method: (kl at 0.1, strong at 0.1, clean accuracy, MSE)
        "raven": ([0.60, 0.61, 0.62], [0.10, 0.11, 0.12], [0.925, 0.924, 0.926], [795.0, 797.0, 796.0]),
        "vae": ([0.30, 0.31, 0.29], [0.10, 0.12, 0.11], [0.914, 0.915, 0.913], [862.0, 860.0, 864.0]),
        "vae-noise": ([0.40, 0.41, 0.42], [0.20, 0.21, 0.22], [0.918, 0.919, 0.917], [916.0, 915.0, 917.0]),
        "se": ([0.60, 0.58, 0.63], [0.10, 0.12, 0.09], [0.914, 0.916, 0.912], [876.0, 880.0, 870.0]),
    }
    rows = []
    for method, (kl, strong, clean, mse) in values.items():
        for seed in range(3):
            rows.append({"dataset": "mnist", "method": method, "seed": seed, "run_id": f"{method}{seed}",
                         "metrics.adv_acc_kl_delta_0.1": kl[seed], "metrics.robust_acc_delta_0.1": strong[seed],
                         "metrics.clean_accuracy": clean[seed], "metrics.mse_255": mse[seed],
                         "metrics.fid": 21.0 + seed, "params.seed": "x"})
    return pd.DataFrame(rows)


def test_the_claims_are_read_per_comparison_from_every_runs_metrics():
    runs = _runs()
    long = measurements(runs)
    kl = long[(long["measure"] == "kl, paper's reading") & (long["method"] == "raven")]
    assert kl["value"].tolist() == pytest.approx([60.0, 61.0, 62.0]) and (kl["delta"] == 0.1).all()
    table = claim_comparisons(runs).set_index(["claim", "other", "measure", "delta"], drop=False)
    robust, noise = CLAIMS[0].name, CLAIMS[1].name
    row = table.loc[(robust, "vae", "kl, paper's reading", 0.1)]
    assert row["verdict"] == HOLDS and row["difference"] == pytest.approx(31.0)
    assert row["p"] == pytest.approx(welch_p([60, 61, 62], [30, 31, 29]))
    assert table.loc[(robust, "se", "kl, paper's reading", 0.1), "verdict"] == NOT_SEPARATED
    assert table.loc[(robust, "vae-noise", "strong protocol (upper bound)", 0.1), "verdict"] == AGAINST
    assert table.loc[(noise, "vae", "kl, paper's reading", 0.1), "verdict"] == AGAINST
    assert table.loc[(noise, "vae", "strong protocol (upper bound)", 0.1), "verdict"] == AGAINST
    clean = table[(table["claim"] == CLAIMS[2].name) & (table["other"] == "vae")].iloc[0]
    assert clean["verdict"] == HOLDS and clean["difference"] == pytest.approx(1.1, abs=1e-9)
    mse = table[(table["measure"] == "MSE") & (table["other"] == "vae-noise")].iloc[0]
    assert mse["verdict"] == HOLDS and mse["difference"] == pytest.approx(796.0 - 916.0)
    fid = table[table["measure"] == "FID"]
    assert (fid["verdict"] == NOT_SEPARATED).all()  # every method 21, 22, 23
    # Only measured pairs are compared: no certified or W2 numbers, no Table 1 distances, no delta 0.05.
    assert not table["measure"].isin(["certified (lower bound)", "w2, paper's reading", "sampled ‖z̃ − z‖²"]).any()
    assert set(table["delta"].dropna()) == {0.1}
    text = claims_markdown(claim_comparisons(runs))
    assert "| MNIST | VAE | kl, paper's reading | +31.0 pt ✓ |" in text
    assert "| MNIST | SE | kl, paper's reading | +0.7 pt · |" in text
    assert "| MNIST | VAE (noise) | strong protocol (upper bound) | -10.0 pt ✗ |" in text


def test_table2_marks_each_mean_inside_or_outside_the_papers_two_sigma():
    assert within_band(91.0, 91.45, 0.26) == 1.0 and within_band(90.9, 91.45, 0.26) == 0.0
    assert math.isnan(within_band(91.0, float("nan"), float("nan")))
    repro = Reproduction("parts: x", "parts", pd.Series({"run_id": "p"}), _runs())
    t2 = table2(repro).set_index("method")
    # RAVEN: accuracy 92.5 against 92.49 +- 0.51 (inside), MSE 796 against 795.9 +- 6.0 (inside), FID 22 against
    # 20.64 +- 0.49 (outside: 1.36 > 0.98). VAE (noise): MSE 916 against 916.4 +- 5.4 (inside).
    assert t2.loc["raven", ["within_paper_2sd_accuracy_pct", "within_paper_2sd_mse_255",
                            "within_paper_2sd_fid"]].tolist() == [1.0, 1.0, 0.0]
    assert t2.loc["vae", "within_paper_2sd_mse_255"] == 1.0 and t2.loc["se", "within_paper_2sd_mse_255"] == 1.0
    line = next(l for l in table2_markdown(table2(repro)).splitlines() if "| RAVEN |" in l)
    assert "+0.01 ✓" in line and "+1.364 ✗" in line
