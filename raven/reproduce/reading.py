"""The reading of a reproduction against the paper: which numbers fall within its ±2σ, which claims hold.

Two questions `raven report` answers cell by cell:

* **Within the paper's ±2σ** (Table 2): a measured mean over seeds lies within the paper's mean ± 2
  × its std over 5 runs. Table 1's ± is a spread over test images of one model, not over runs, so
  it has no such band; Figure 2 is published as a plot only, so its points have none either.
* **The paper's claims** (`CLAIMS`), each a comparison between two methods on one measure, tested
  on the seeds with Welch's t-test (two-sided, p < `ALPHA`; unequal variances, since a robust
  method's seeds need not spread like a baseline's). A comparison is "holds" when the difference
  is separated in the claimed direction, "against" when separated the other way, and "not
  separated" when the seeds cannot tell (with 3 seeds, a difference under about three standard
  errors). A "no better" claim (noise augmentation alone does not help) holds unless separated
  the other way. Robustness is read under the paper's protocol (its reading and the robust one),
  the strong protocol (an upper bound on robust accuracy) and the certified bound (a lower one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from raven.eval.plots import DATASET_LABELS
from raven.reproduce.figures import CERTIFIED, METHOD_LABELS, PAPER_READING, ROBUST_READING, STRONG, accuracy_points

ALPHA = 0.05  # Welch's two-sided test; 3 seeds per method make it ask for about 3 standard errors
BAND_SIGMAS = 2.0  # "within the paper's ±2σ"
SEVERE_DELTAS = (0.05, 0.1, 0.2)  # Figure 2's caption: RAVEN ahead "under severe adversarial attacks"
HOLDS, AGAINST, NOT_SEPARATED, UNTESTED = "holds", "against", "not separated", "untested"
SYMBOLS = {HOLDS: "✓", AGAINST: "✗", NOT_SEPARATED: "·", UNTESTED: "—"}

# Per-run metric -> (measure name, scale to the report's unit).
_SCALARS = {"metrics.clean_accuracy": ("clean accuracy (%)", 100.0), "metrics.mse_255": ("MSE", 1.0),
            "metrics.fid": ("FID", 1.0), "metrics.latent_pair_distance_sampled_mean": ("sampled ‖z̃ − z‖²", 1.0)}
# Robustness measures in the order the claims table lists them.
ROBUSTNESS_MEASURES = ("kl, paper's reading", "w2, paper's reading", "kl, robust reading", "w2, robust reading",
                       "strong protocol (upper bound)", "certified (lower bound)")
_CURVE_MEASURES = {PAPER_READING: "{attack}, paper's reading", ROBUST_READING: "{attack}, robust reading",
                   STRONG: "strong protocol (upper bound)", CERTIFIED: "certified (lower bound)"}


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims: `method` against each of `others` on `measures`, in `direction`.

    direction "higher" / "lower": the claim holds when `method` is separated above / below the other;
    "not higher": when it is not separated above it (the claim that something does not help).
    """

    name: str
    source: str  # where the paper says it
    method: str
    others: tuple[str, ...]
    measures: tuple[str, ...]
    direction: str
    deltas: tuple[float, ...] = ()  # robustness claims: the budgets it is read at


CLAIMS = (
    Claim("RAVEN resists attacks better than every baseline", "Sec. 4.2 and Figure 2's caption", "raven",
          ("vae", "vae-noise", "se"), ROBUSTNESS_MEASURES, "higher", SEVERE_DELTAS),
    Claim("noise augmentation alone does not make the VAE more robust", "Sec. 1 and App. C.1", "vae-noise",
          ("vae",), ROBUSTNESS_MEASURES, "not higher", SEVERE_DELTAS),
    Claim("RAVEN's clean probe accuracy is the highest", "Table 2", "raven", ("vae", "vae-noise", "se"),
          ("clean accuracy (%)",), "higher"),
    Claim("RAVEN reconstructs better than every baseline (MSE, FID)", "Table 2 and Sec. 4.2", "raven",
          ("vae", "vae-noise", "se"), ("MSE", "FID"), "lower"),
    Claim("RAVEN keeps noisy pairs closer in the latent space", "Table 1 and Sec. 4.2", "raven", ("vae", "vae-noise"),
          ("sampled ‖z̃ − z‖²",), "lower"),
)


def measurements(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's numbers in long form: dataset, method, seed, measure, delta (NaN for scalars), value.

    `runs` holds one row per (dataset, method, seed) with search_runs metric columns
    (raven.reproduce.report.Reproduction.runs). Accuracies are in percent.
    """
    rows = []
    for _, run in runs.iterrows():
        for column, (measure, scale) in _SCALARS.items():
            number = pd.to_numeric(run.get(column), errors="coerce")
            if pd.notna(number) and np.isfinite(number):
                rows.append({"dataset": run["dataset"], "method": run["method"], "seed": int(run["seed"]),
                             "measure": measure, "delta": np.nan, "value": float(number) * scale})
    points = accuracy_points(runs)
    curves = pd.DataFrame({"dataset": points["dataset"], "method": points["method"],
                           "seed": points["seed"].astype(int),
                           "measure": [_CURVE_MEASURES[reading].format(attack=attack)
                                       for reading, attack in zip(points["reading"], points["attack"])],
                           "delta": points["delta"], "value": points["accuracy"] * 100.0})
    columns = ["dataset", "method", "seed", "measure", "delta", "value"]
    return pd.concat([pd.DataFrame(rows, columns=columns), curves[columns]], ignore_index=True)


def compare(a: np.ndarray, b: np.ndarray, direction: str) -> tuple[str, float]:
    """(verdict, p) for the claim that seeds `a` stand in `direction` ("higher", "lower", "not higher") to seeds `b`.

    Welch's two-sided t-test at ALPHA. Fewer than 2 seeds on a side: untested (p NaN). Both sides
    without spread: separated exactly when the means differ (p 0 or 1).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return UNTESTED, float("nan")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        p = 0.0 if a[0] != b[0] else 1.0
    else:
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    difference = a.mean() - b.mean()
    if p >= ALPHA:
        return (HOLDS if direction == "not higher" else NOT_SEPARATED), p
    above = difference > 0
    if direction == "lower":
        return (HOLDS if not above else AGAINST), p
    if direction == "higher":
        return (HOLDS if above else AGAINST), p
    return (AGAINST if above else HOLDS), p


def claim_comparisons(runs: pd.DataFrame, claims: tuple[Claim, ...] = CLAIMS) -> pd.DataFrame:
    """One row per (claim, dataset, other method, measure, delta) both methods measured.

    Columns: claim, source, dataset, method, other, measure, delta, direction, seeds, other_seeds,
    mean, other_mean, difference (method minus other, in the measure's unit), p, verdict.
    """
    long = measurements(runs)
    columns = ["claim", "source", "dataset", "method", "other", "measure", "delta", "direction", "seeds",
               "other_seeds", "mean", "other_mean", "difference", "p", "verdict"]
    rows = []
    for claim in claims:
        for dataset in long["dataset"].unique():
            here = long[long["dataset"] == dataset]
            for other in claim.others:
                for measure in claim.measures:
                    for delta in claim.deltas or (np.nan,):
                        pick = (here["measure"] == measure) & (
                            here["delta"].isna() if np.isnan(delta) else np.isclose(here["delta"], delta))
                        a = here[pick & (here["method"] == claim.method)].sort_values("seed")["value"].to_numpy()
                        b = here[pick & (here["method"] == other)].sort_values("seed")["value"].to_numpy()
                        if not len(a) or not len(b):
                            continue
                        verdict, p = compare(a, b, claim.direction)
                        rows.append([claim.name, claim.source, dataset, claim.method, other, measure, delta,
                                     claim.direction, len(a), len(b), a.mean(), b.mean(), a.mean() - b.mean(), p,
                                     verdict])
    return pd.DataFrame(rows, columns=columns)


def within_band(mean: float, paper_mean: float, paper_std: float, sigmas: float = BAND_SIGMAS) -> float:
    """1.0 when `mean` lies within paper_mean ± sigmas × paper_std, 0.0 outside, NaN without a paper number."""
    if not (np.isfinite(mean) and np.isfinite(paper_mean) and np.isfinite(paper_std)):
        return float("nan")
    return float(abs(mean - paper_mean) <= sigmas * paper_std)


def plus_minus(mean: float, std: float, digits: int, kind: str = "f") -> str:
    """"mean ± std" in a report's table ("—" without a mean, the mean alone without a std)."""
    if not np.isfinite(mean):
        return "—"
    return f"{mean:.{digits}{kind}} ± {std:.{digits}{kind}}" if np.isfinite(std) else f"{mean:.{digits}{kind}}"


def number(value: float, digits: int, signed: bool = False, kind: str = "f") -> str:
    """A number in a report's table ("—" when missing)."""
    if not np.isfinite(value):
        return "—"
    return f"{value:+.{digits}{kind}}" if signed else f"{value:.{digits}{kind}}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


BAND_LEGEND = f"""After each difference: ✓ the mean lies within the paper's ±{BAND_SIGMAS:g}σ (its mean ± {BAND_SIGMAS:g} × its std over
5 runs), ✗ outside it. Table 1's ± is a spread over the test images of one model and Figure 2 is
published as a plot only, so neither has such a band."""


def band_mark(within: float) -> str:
    """Table 2's mark after a difference: " ✓" inside the paper's band, " ✗" outside, "" without a paper number."""
    return "" if not np.isfinite(within) else (" ✓" if within else " ✗")


def _cell(row: pd.Series) -> str:
    unit = "" if row["measure"] in ("MSE", "FID", "sampled ‖z̃ − z‖²") else " pt"
    digits = 3 if row["measure"] == "sampled ‖z̃ − z‖²" else 1
    return f"{row['difference']:+.{digits}f}{unit} {SYMBOLS[row['verdict']]}"


def claims_markdown(comparisons: pd.DataFrame) -> str:
    """The claims, each with its tally and a table: one row per (dataset, other, measure), deltas as columns.

    A cell is the difference (the claim's method minus the other) and its verdict's symbol.
    """
    if comparisons.empty:
        return "No claim could be tested: the runs hold no two of the methods the claims compare."
    legend = (f"Each cell: the difference of means over seeds (the claim's method minus the other; accuracy in "
              f"points), then {SYMBOLS[HOLDS]} the claim holds (Welch's t-test, p < {ALPHA:g}, in the claimed "
              f"direction), {SYMBOLS[AGAINST]} separated against it, {SYMBOLS[NOT_SEPARATED]} the seeds cannot "
              "separate the two (for a \"does not help\" claim, not separated counts as holding).")
    blocks = [legend]
    for name, group in comparisons.groupby("claim", sort=False):
        tally = group["verdict"].value_counts()
        first = group.iloc[0]
        counts = ", ".join(f"{label} {int(tally.get(verdict, 0))}" for verdict, label in
                           ((HOLDS, "holds"), (AGAINST, "against"), (NOT_SEPARATED, "not separated"))
                           if tally.get(verdict, 0) or verdict == HOLDS)
        method = METHOD_LABELS.get(first["method"], first["method"])
        blocks.append(f"**{name}** ({first['source']}; {method}): {counts}, of {len(group)} comparisons.")
        deltas = sorted(d for d in group["delta"].dropna().unique())
        header = ["Dataset", "Against", "Measure"] + ([f"δ={d:g}" for d in deltas] if deltas else ["Difference"])
        rows = []
        for (dataset, other, measure), cells in group.groupby(["dataset", "other", "measure"], sort=False):
            by_delta = {(None if np.isnan(d) else round(d, 6)): _cell(r) for d, (_, r) in
                        zip(cells["delta"], cells.iterrows())}
            values = [by_delta.get(round(d, 6), "—") for d in deltas] if deltas else [by_delta.get(None, "—")]
            rows.append([DATASET_LABELS.get(dataset, dataset), METHOD_LABELS.get(other, other), measure] + values)
        blocks.append(markdown_table(header, rows))
    return "\n\n".join(blocks)


def claims_section(comparisons: pd.DataFrame) -> str:
    """The report's section on the paper's claims: heading, what was compared and how, the tables."""
    return f"""## The paper's claims, tested

Each claim the paper makes by comparing methods, tested per dataset on the seeds here
(`raven.reproduce.reading`; `claims.csv`). Robustness is read under the paper's protocol (its
reading and the robust one), the strong protocol (an upper bound on the true robust accuracy) and
the certified bound (a lower one), at the budgets Figure 2's caption calls severe.

{claims_markdown(comparisons)}"""
