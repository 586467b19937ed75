"""How a sweep scores and chooses configurations: the validation objective, objectives with a direction, Pareto ranking.

* `validation_objective(model, splits, settings)`: val_robust_accuracy, computed on the
  VALIDATION split only: a linear probe fitted on training-split encodings (first
  `probe_limit` images), then PGD attacks (kl and w2, `steps` steps, delta in {0.05, 0.1,
  0.2}) on the first `val_limit` validation images; the objective is the probe's accuracy on
  the adversarial images averaged over attacks and deltas (maximised). The test set is touched
  only by the final evaluation. With `protocol="strong"` (`--objective strong`) it is
  raven.eval.protocols.strong_validation_objective instead: val_strong_robust_accuracy, APGD-CE on
  the probe end to end at delta in {0.025, 0.05, 0.1}, the objective that ranks models as the
  strong protocol does (README: "What the strong protocol shows"). With `protocol="certified"`
  (`--objective certified`) it is raven.eval.protocols.certified_validation_objective:
  val_certified_accuracy, the probe's CROWN-certified accuracy (float32) at delta in {0.01,
  0.025}, the lower edge of robust accuracy, which no attack can lower (the deltas' choice:
  CertifiedObjectiveSettings).
* `Objective`: a metric the trial reports at its last epoch and a direction, written
  `val_robust_accuracy:max`. A sweep has one (Optuna's TPE on that value) or several
  (multi-objective TPE, and the configurations on the Pareto front are the candidates).
* `seed_statistics`: a trial trains the seeds of its configuration as one pack (raven.pack) and
  reports, for every metric of the models, the mean over its seeds under the metric's own name
  (what the searcher, ASHA and the ranking see; with several objectives, each one's mean), and
  with more than one seed the std over seeds (`<metric>_std`) and each seed's value
  (`<metric>_seed<S>`).
* `rank_configurations`: the trials' seeds grouped by searched value, each configuration flagged
  Pareto-optimal or not, best first: the Pareto front ordered by the first objective, then the
  rest. With one objective that is simply best value first.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from raven.config import ConfigError
from raven.data import DataSplits
from raven.eval.evaluate import EvalConfig, probe_and_attack
from raven.eval.protocols import (
    CERTIFIED_OBJECTIVE,
    STRONG_OBJECTIVE,
    CertifiedObjectiveSettings,
    StrongObjectiveSettings,
    certified_validation_objective,
    strong_validation_objective,
)

OBJECTIVE = "val_robust_accuracy"
# The selection protocols: the paper's attacks on the encoder, APGD-CE on the probe end to end, or the certified
# bound (no attack, no steps: its entry in PROTOCOL_STEPS is the paper's, which only the sweep clock reads).
PROTOCOLS = ("paper", "strong", "certified")
PROTOCOL_OBJECTIVE = {"paper": OBJECTIVE, "strong": STRONG_OBJECTIVE, "certified": CERTIFIED_OBJECTIVE}
PROTOCOL_STEPS = {"paper": 10, "strong": StrongObjectiveSettings.steps, "certified": 10}
# Validation metrics of raven.train every epoch reports, besides the objective's own.
TRAIN_METRICS = ("val_elbo", "val_loss", "val_mse_255")
# Metrics of a model (one per seed of a trial), as opposed to the trial's own (epoch, timings).
MODEL_METRIC_PREFIXES = ("train_", "val_")
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class Objective:
    """A reported metric and whether the search maximises or minimises it."""

    metric: str
    mode: str = "max"

    @classmethod
    def parse(cls, text: str) -> "Objective":
        name, _, mode = text.strip().partition(":")
        mode = mode or "max"
        if not _NAME.match(name) or mode not in ("max", "min"):
            raise ConfigError(f"an objective is METRIC:max or METRIC:min, got {text!r}")
        return cls(name, mode)

    def __str__(self) -> str:
        return f"{self.metric}:{self.mode}"


def parse_objectives(texts: Iterable[str]) -> tuple[Objective, ...]:
    objectives = tuple(Objective.parse(t) for t in texts)
    if not objectives:
        raise ConfigError("--objectives needs at least one METRIC:max or METRIC:min")
    if len({o.metric for o in objectives}) != len(objectives):
        raise ConfigError(f"--objectives names a metric twice: {','.join(map(str, objectives))}")
    return objectives


@dataclass(frozen=True)
class ObjectiveSettings:
    """The cheap validation-robustness objective (see the module docstring).

    protocol "paper": `attacks` x `deltas` PGD of `steps` steps on the encoder; "strong": APGD-CE
    of `steps` iterations on the probe at StrongObjectiveSettings' deltas; "certified": CROWN's
    certified accuracy at CertifiedObjectiveSettings' deltas (`attacks` and `deltas` are the
    paper protocol's only, `steps` the paper's and the strong one's).
    """

    attacks: tuple[str, ...] = ("kl", "w2")
    deltas: tuple[float, ...] = (0.05, 0.1, 0.2)
    steps: int = PROTOCOL_STEPS["paper"]
    val_limit: int = 1000
    probe_limit: int = 10000
    every: int = 0  # 0: only at the last epoch
    seed: int = 0
    batch_size: int = 1000
    protocol: str = "paper"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"--objective must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")

    @property
    def objective(self) -> str:
        """The metric the objective averages into: val_robust_accuracy, val_strong_robust_accuracy or
        val_certified_accuracy."""
        return PROTOCOL_OBJECTIVE[self.protocol]

    def strong_settings(self) -> StrongObjectiveSettings:
        return StrongObjectiveSettings(steps=self.steps, val_limit=self.val_limit, probe_limit=self.probe_limit,
                                       seed=self.seed, batch_size=self.batch_size)

    def certified_settings(self) -> CertifiedObjectiveSettings:
        return CertifiedObjectiveSettings(val_limit=self.val_limit, probe_limit=self.probe_limit,
                                          batch_size=self.batch_size)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(attacks=tuple(self.attacks), deltas=tuple(self.deltas), steps=self.steps,
                          limit=self.val_limit, probe_limit=self.probe_limit, fid=False, tsne=False,
                          seed=self.seed, batch_size=self.batch_size)

    def due(self, epoch: int, epochs: int, last: bool = False) -> bool:
        return last or epoch >= epochs or (self.every > 0 and epoch % self.every == 0)

    def metrics(self) -> tuple[str, ...]:
        """Every metric `validation_objective` reports with these settings."""
        if self.protocol == "strong":
            keys = EvalConfig(deltas=self.strong_settings().deltas).to_dict()["deltas"]
            return (STRONG_OBJECTIVE, "val_clean_accuracy", *(f"val_strong_acc_delta_{key}" for key in keys))
        if self.protocol == "certified":
            keys = EvalConfig(deltas=self.certified_settings().deltas).to_dict()["deltas"]
            return (CERTIFIED_OBJECTIVE, "val_clean_accuracy", *(f"val_certified_acc_delta_{key}" for key in keys))
        parts = tuple(f"val_adv_acc_{kind}_delta_{key}" for kind in self.attacks
                      for key in self.eval_config().to_dict()["deltas"])
        return (OBJECTIVE, "val_clean_accuracy", *parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validation_objective(model, splits: DataSplits, settings: ObjectiveSettings) -> dict[str, float]:
    """val_robust_accuracy (mean probe accuracy over attacks x deltas on validation images) and its parts.

    The probe is fitted on the first `probe_limit` training-split images, the attacks run on
    the first `val_limit` validation images; the test split is never read. Under the strong
    protocol: raven.eval.protocols.strong_validation_objective; under the certified one,
    raven.eval.protocols.certified_validation_objective.
    """
    if settings.protocol == "strong":
        return strong_validation_objective(model, splits, settings.strong_settings())
    if settings.protocol == "certified":
        return certified_validation_objective(model, splits, settings.certified_settings())
    out = probe_and_attack(model, splits.train_x, splits.train_y, splits.val_x, splits.val_y,
                           settings.eval_config())
    metrics = {"val_clean_accuracy": float(out["clean_accuracy"])}
    values = []
    for kind, by_delta in out["adversarial_accuracy"].items():
        for key, acc in by_delta.items():
            metrics[f"val_adv_acc_{kind}_delta_{key}"] = float(acc)
            values.append(float(acc))
    metrics[OBJECTIVE] = sum(values) / len(values)
    return metrics


def seed_key(metric: str, seed: int) -> str:
    """The name of one seed's value of `metric` in a trial of several seeds: val_elbo_seed3."""
    return f"{metric}_seed{seed}"


def seed_statistics(members: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """{metric: mean over seeds} for every model metric of `members` ({seed: metrics}), and with more
    than one seed {metric}_std (the sample std, ddof 1, as the ranking's) and {metric}_seed<S>.

    A metric counts the seeds that report it (a seed that diverged reports nothing more); its std
    needs two of them.
    """
    names = dict.fromkeys(k for m in members.values() for k in m if k.startswith(MODEL_METRIC_PREFIXES))
    out: dict[str, float] = {}
    for name in names:
        values = {seed: float(m[name]) for seed, m in members.items() if name in m}
        out[name] = float(np.mean(list(values.values())))
        if len(members) > 1:
            if len(values) > 1:
                out[f"{name}_std"] = float(np.std(list(values.values()), ddof=1))
            out.update({seed_key(name, seed): value for seed, value in values.items()})
    return out


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Rows of `values` (n x k) that no other row dominates (at least as good in all k, better in one)."""
    signed = np.asarray(values, dtype=float) * np.array([1.0 if m == "max" else -1.0 for m in modes])
    keep = np.ones(len(signed), dtype=bool)
    for i, row in enumerate(signed):
        dominated = np.all(signed >= row, axis=1) & np.any(signed > row, axis=1)
        keep[i] = not dominated.any()
    return keep


def rank_configurations(table: pd.DataFrame, param: str, objectives: Sequence[Objective]) -> pd.DataFrame:
    """Completed trials grouped by searched value: `<metric>_mean`, `<metric>_std` per objective, `count`,
    `pareto`; the Pareto front first (ordered by the first objective), then the others (same order).

    A configuration counts only when every objective has a value in each of its trials.
    """
    names = [o.metric for o in objectives]
    done = table[table["status"] == "TERMINATED"] if "status" in table else table
    done = done.dropna(subset=[n for n in names if n in done]) if all(n in done for n in names) else done.iloc[0:0]
    columns = [f"{n}_{stat}" for n in names for stat in ("mean", "std")] + ["count", "pareto"]
    if done.empty:
        return pd.DataFrame(columns=columns, index=pd.Index([], name=param, dtype=float))
    grouped = done.groupby(param)
    ranked = pd.DataFrame({f"{n}_{stat}": getattr(grouped[n], stat)() for n in names for stat in ("mean", "std")})
    ranked["count"] = grouped.size()
    ranked["pareto"] = pareto_mask(ranked[[f"{n}_mean" for n in names]].to_numpy(), [o.mode for o in objectives])
    first = objectives[0]
    return ranked.sort_values(["pareto", f"{first.metric}_mean"], ascending=[False, first.mode == "min"],
                              kind="stable")


def candidates(ranked: pd.DataFrame, top: int, objectives: Sequence[Objective]) -> list[float]:
    """The searched values to evaluate on the test set: the best `top`; with several objectives, from the
    Pareto front only (at most `top` of it)."""
    pool = ranked[ranked["pareto"].astype(bool)] if len(objectives) > 1 else ranked
    return [float(v) for v in pool.index[:max(0, top)]]
