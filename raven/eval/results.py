"""The outputs of one evaluation: EvalResult (robustness.json, robustness.csv, flat metrics, curves) and its summary.

robustness.json holds the paper's protocol (`adversarial_accuracy`, per attack and
delta, in the paper's reading, and `adversarial_robust_accuracy`, which counts an image
only if the probe is also right on the clean image), the strong one (`robust_accuracy`,
`robust_accuracy_by_attack`, `checks`) and the certified one (`certified_accuracy`,
`certified_bound`, `latent_shift_bound`), side by side; delta keys are
raven.eval.protocols.delta_key's decimals.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raven.eval.protocols import format_checks

JSON_NAME = "robustness.json"
CSV_NAME = "robustness.csv"
CSV_FIELDS = ["protocol", "attack", "delta", "accuracy", "mean_dissimilarity", "images"]


@dataclass
class EvalResult:
    """Everything one evaluation measured; `to_json()` is the robustness.json format.

    adversarial_accuracy: the paper's protocol ({} when not run), in the paper's reading (right
    after the attack); adversarial_robust_accuracy: the same attacks, an image counting only
    if the probe is right on the clean image too (AutoAttack's and RobustBench's reading;
    {} when not run). certified_accuracy, certified_bound, latent_shift_bound: the certified
    protocol (None when not run). robust_accuracy,
    robust_accuracy_by_attack, autoattack_survivors, checks: the strong protocol (None
    when not run).
    """

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
    robust_accuracy: dict[str, float] | None = None
    robust_accuracy_by_attack: dict[str, dict[str, float]] | None = None
    autoattack_survivors: dict[str, dict[str, int]] | None = None
    checks: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    latent_pair_distance_sampled: dict[str, float] = field(default_factory=dict)
    adversarial_robust_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    certified_accuracy: dict[str, float] | None = None
    certified_bound: str | None = None
    latent_shift_bound: dict[str, dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "protocol": self.settings.get("protocol"),
            "clean_accuracy": self.clean_accuracy,
            "adversarial_accuracy": self.adversarial_accuracy,
            "adversarial_robust_accuracy": self.adversarial_robust_accuracy,
            "attack_dissimilarity": self.attack_dissimilarity,
            "robust_accuracy": self.robust_accuracy,
            "robust_accuracy_by_attack": self.robust_accuracy_by_attack,
            "autoattack_survivors": self.autoattack_survivors,
            "checks": self.checks,
            "certified_accuracy": self.certified_accuracy,
            "certified_bound": self.certified_bound,
            "latent_shift_bound": self.latent_shift_bound,
            "mse": self.mse,
            "fid": self.fid,
            "fid_note": self.fid_note,
            "latent_pair_distance": dict(self.latent_pair_distance),
            "latent_pair_distance_sampled": dict(self.latent_pair_distance_sampled),
            "cluster_accuracy": self.cluster_accuracy,
            "settings": self.settings,
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalResult":
        """The result that to_json wrote (its artifacts, files of the machine that wrote them, are not kept)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"artifacts"}
        return cls(**{k: v for k, v in data.items() if k in names})

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per (protocol, attack, delta); the strong protocol's worst case is attack "all".

        protocol "paper" is the paper's reading, "paper-robust" the same attacks counting only the
        images the probe also gets right clean; "certified" has the bound's name as its attack.
        """
        images = self.settings.get("test_images")
        strong_images = self.settings.get("strong_images") or images
        rows = []
        readings = (("paper", self.adversarial_accuracy), ("paper-robust", self.adversarial_robust_accuracy))
        for protocol, paper_curves in readings:
            for kind, by_delta in paper_curves.items():
                for key, acc in by_delta.items():
                    rows.append({"protocol": protocol, "attack": kind, "delta": key, "accuracy": acc,
                                 "mean_dissimilarity": self.attack_dissimilarity.get(kind, {}).get(key),
                                 "images": images})
        if self.robust_accuracy is not None:
            curves = {"all": self.robust_accuracy, **(self.robust_accuracy_by_attack or {})}
            for kind, by_delta in curves.items():
                for key, acc in by_delta.items():
                    rows.append({"protocol": "strong", "attack": kind, "delta": key, "accuracy": acc,
                                 "mean_dissimilarity": None, "images": strong_images})
        if self.certified_accuracy is not None:
            certified_images = (self.settings.get("certified") or {}).get("images", images)
            for key, acc in self.certified_accuracy.items():
                rows.append({"protocol": "certified", "attack": self.certified_bound, "delta": key, "accuracy": acc,
                             "mean_dissimilarity": None, "images": certified_images})
        return rows

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: adv_acc_{attack}_delta_{key}, adv_robust_acc_{attack}_delta_{key},
        robust_acc_delta_{key}, certified_acc_delta_{key}, latent_shift_bound_{mean,median,q90,max}_delta_{key},
        clean_accuracy, ..."""
        out = {"clean_accuracy": self.clean_accuracy, "mse_255": self.mse,
               "latent_pair_distance_mean": self.latent_pair_distance["mean"],
               "latent_pair_distance_std": self.latent_pair_distance["std"]}
        if self.latent_pair_distance_sampled:
            out["latent_pair_distance_sampled_mean"] = self.latent_pair_distance_sampled["mean"]
            out["latent_pair_distance_sampled_std"] = self.latent_pair_distance_sampled["std"]
        for kind, by_delta in self.adversarial_accuracy.items():
            for key, acc in by_delta.items():
                out[f"adv_acc_{kind}_delta_{key}"] = acc
        for kind, by_delta in self.adversarial_robust_accuracy.items():
            for key, acc in by_delta.items():
                out[f"adv_robust_acc_{kind}_delta_{key}"] = acc
        for key, acc in (self.robust_accuracy or {}).items():
            out[f"robust_acc_delta_{key}"] = acc
        for key, acc in (self.certified_accuracy or {}).items():
            out[f"certified_acc_delta_{key}"] = acc
        for key, stats in (self.latent_shift_bound or {}).items():
            out.update({f"latent_shift_bound_{name}_delta_{key}": value for name, value in stats.items()})
        if self.fid is not None:
            out["fid"] = self.fid
        if self.cluster_accuracy is not None:
            out["cluster_accuracy"] = self.cluster_accuracy
        return out

    def curves(self) -> dict[str, dict[str, float]]:
        """Accuracy-vs-delta curves {metric name: {delta_key: value}}: adv_acc_{attack} and adv_robust_acc_{attack}
        (paper, both readings), robust_acc (strong), certified_acc (certified).

        MLflow logs each at step round(1000 delta), so its chart is accuracy against delta.
        """
        out = {f"adv_acc_{kind}": dict(by_delta) for kind, by_delta in self.adversarial_accuracy.items()}
        out.update({f"adv_robust_acc_{kind}": dict(by_delta)
                    for kind, by_delta in self.adversarial_robust_accuracy.items()})
        if self.robust_accuracy is not None:
            out["robust_acc"] = dict(self.robust_accuracy)
        if self.certified_accuracy is not None:
            out["certified_acc"] = dict(self.certified_accuracy)
        return out

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
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(self.csv_rows())
        os.replace(tmp, csv_path)
        for path in (json_path, csv_path):
            if path not in self.artifacts:
                self.artifacts.insert(0, path)
        return [json_path, csv_path]


class KeptStages:
    """The finished stages of one model's evaluation, each kept in a small JSON file as it finishes.

    The strong protocol's convergence check alone can outlast what is left of a session, so an
    evaluation that is stopped resumes at its first unfinished stage: evaluate_model asks
    `get(stage)` before it runs a stage ("paper": the probe and the paper protocol, "strong",
    "certified", "fid") and `keep`s each one it runs. The file holds `key` (the weights' digest
    and the evaluation config, as JSON gives them back); a file with another key is ignored,
    so stages are reused only for the same weights under the same config. The values are
    the stages' own JSON (numbers), never tensors, each with the seconds it took;
    `earlier_seconds` sums those of the stages an earlier run finished, for the evaluation's
    total time.
    """

    SUFFIX = ".stages.json"  # beside a seed's whole record <cell>.json, as <cell>.stages.json

    def __init__(self, path: str | os.PathLike, key: dict[str, Any]):
        self.path, self.key = Path(path), key
        try:
            held = json.loads(self.path.read_text())
            mine = held.get("key") == key
            self.stages: dict[str, Any] = dict(held["stages"]) if mine else {}
            self.seconds: dict[str, float] = dict(held["seconds"]) if mine else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, partly written or foreign
            self.stages, self.seconds = {}, {}
        self.earlier_seconds = float(sum(self.seconds.values()))

    def get(self, stage: str) -> Any | None:
        return self.stages.get(stage)

    def keep(self, stage: str, value: Any, seconds: float) -> None:
        self.stages[stage], self.seconds[stage] = value, round(float(seconds), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"key": self.key, "stages": self.stages, "seconds": self.seconds}, indent=1))
        os.replace(tmp, self.path)  # the file is either the old whole or the new whole

    def discard(self) -> None:
        """Remove the file once the whole evaluation is kept elsewhere."""
        self.path.unlink(missing_ok=True)


def format_summary(results: list[EvalResult]) -> str:
    """A plain-text table: one block per model, rows = attacks (paper, each in both readings, then strong, then
    the certified bound), columns = deltas; then checks."""
    lines = []
    for result in results:
        extra = f", cluster acc {result.cluster_accuracy:.4f}" if result.cluster_accuracy is not None else ""
        fid_text = f"{result.fid:.3f}" if result.fid is not None else "n/a"
        subset = (result.settings.get("strong_images") or (result.settings.get("certified") or {}).get("images")
                  or result.settings.get("test_images"))
        subset_text = (f", strong/certified on the first {subset}" if subset != result.settings.get("test_images")
                       else "")
        lines.append(f"{result.label}  ({result.settings.get('test_images')} test images{subset_text}; "
                     f"clean acc {result.clean_accuracy:.4f}, MSE(0-255) {result.mse:.1f}, FID {fid_text}, "
                     f"latent pair dist: means {result.latent_pair_distance['mean']:.4g} "
                     f"+- {result.latent_pair_distance['std']:.4g}, sampled z "
                     f"{result.latent_pair_distance_sampled.get('mean', math.nan):.4g} "
                     f"+- {result.latent_pair_distance_sampled.get('std', math.nan):.4g}{extra})")
        rows = []
        for kind, by_delta in result.adversarial_accuracy.items():
            rows.append((f"paper {kind}", by_delta))
            if kind in result.adversarial_robust_accuracy:  # right clean too: AutoAttack's reading
                rows.append((f"paper {kind} robust", result.adversarial_robust_accuracy[kind]))
        if result.robust_accuracy is not None:
            rows.append(("STRONG (all)", result.robust_accuracy))
            rows += [(f"strong {kind}", curve) for kind, curve in (result.robust_accuracy_by_attack or {}).items()]
        if result.certified_accuracy is not None:
            rows.append((f"CERTIFIED ({result.certified_bound.split('-')[0]})", result.certified_accuracy))
        keys: list[str] = []
        for _, by_delta in rows:
            keys += [k for k in by_delta if k not in keys]
        width = max([len(name) for name, _ in rows] + [6])
        lines.append(f"  {'attack':<{width}}" + "".join(f"{'d=' + k:>9}" for k in keys))
        for name, by_delta in rows:
            lines.append(f"  {name:<{width}}" + "".join(f"{by_delta[k]:>9.4f}" if k in by_delta else f"{'':>9}"
                                                       for k in keys))
        if result.checks is not None:
            lines += [f"  {line}" for line in format_checks(result.checks)]
    return "\n".join(lines)
