"""Everything that defines a sweep: `SweepSpec`, its full and smoke presets, and the flags made from it.

Each field that is a flag carries its help, its command-line group and its `--smoke` value in
the field's metadata (`flag(...)`); `add_arguments` turns the fields into argparse flags, so a
new flag is one new field. The defaults are the full budget; `--smoke` swaps in the smoke
values, and flags given explicitly win over either. The spec is validated once, at
construction (ConfigError naming the flag), before Ray or MLflow start, and saved as
raven_sweep.json in the sweep's Tune folder, where `--resume` reads it back.

The entry scripts (sweeps/*.py) add what they choose: `kind`, `method`, the search `space` (a
raven.sweep.space.SearchSpace: the searched field, its range or grid, the values evaluated first),
and fixed training settings (`train_extra`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from raven.config import DATASETS, PRECISIONS, ConfigError, TrainConfig
from raven.eval.evaluate import EvalConfig
from raven.eval.protocols import PROTOCOLS as EVAL_PROTOCOLS
from raven.record.provenance import git_version
from raven.record.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri
from raven.record.write_queue import write_atomic
from raven.sweep.selection import PROTOCOL_STEPS, PROTOCOLS, TRAIN_METRICS, ObjectiveSettings, parse_objectives
from raven.sweep.space import SearchSpace

SPEC_NAME = "raven_sweep.json"
STUDY_NAME = "optuna.db"  # the default Optuna storage, beside the sweep in its Tune folder
# The config key of Ray's tune.search.Repeater, with which an earlier raven ran each seed of a
# configuration as its own trial: such a sweep cannot be continued as packed trials.
REPEATER_INDEX = "__trial_index__"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SAME = object()  # a field whose --smoke value is its default
SMOKE_HELP = ("a budget that finishes in about two minutes on a 2-core CPU machine: 2 trials, 1 epoch on "
              "1000 images; objective on 200 validation images with 5 PGD steps (probe on 1000); evaluation of "
              "the best trial on 200 test images, 10 steps, delta in {0, 0.1, 0.2}, probe on 1000 images, t-SNE "
              "of 100 points and no FID. Explicit flags still win")


class SweepError(RuntimeError):
    """A sweep cannot start or continue; the message is shown as is (exit status 2)."""


def flag(default: Any, help: str, group: str, *, smoke: Any = _SAME, low: float | None = None,
         choices: Sequence[str] | None = None, metavar: str | None = None) -> Any:
    """A SweepSpec field that is also a command-line flag (--field-name)."""
    return field(default=default, metadata={"help": help, "group": group, "smoke": smoke, "low": low,
                                            "choices": choices, "metavar": metavar})


CLUSTER, BUDGET, RESOURCES = "cluster and storage", "budget", "resources"
SELECTION, EVALUATION = "selection objective (validation split)", "final evaluation (test split)"
# The final evaluation measures what the search selected on: the strong protocol beside the paper's, and the
# certified bound with both.
EVAL_PROTOCOL_AFTER = {"paper": "paper", "strong": "both", "certified": "all"}


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: what is searched, the budget, resources, where it is recorded (see the module docstring)."""

    # Chosen by the entry script.
    kind: str  # the entry script's name: sweeps/<kind>.py
    method: str
    space: SearchSpace
    train_extra: dict[str, Any] = field(default_factory=dict)  # fixed TrainConfig fields

    # Flags.
    name: str = flag("", "sweep name (Tune experiment, MLflow parent run, Optuna study); default "
                     "KIND-DATASET-TIMESTAMP. With --resume: the sweep to continue (default: the latest in "
                     "--storage-path)", CLUSTER)
    storage_path: str = flag("ray_results", "Tune results folder (default ./ray_results)", CLUSTER)
    tracking_uri: str = flag(DEFAULT_TRACKING_URI, "MLflow tracking URI (default sqlite:///mlflow.db in this "
                             "folder, artifacts in ./mlruns)", CLUSTER)
    experiment: str = flag("raven-sweeps", "MLflow experiment", CLUSTER)
    tracking_wait: float = flag(300.0, "seconds the end of the sweep waits for an unreachable MLflow tracking "
                                "store to take the writes queued meanwhile; what it has not taken then stays in "
                                "<Tune folder>/mlflow_pending.json for --resume (default 300; also taken with "
                                "--resume)", CLUSTER, low=0, metavar="SECONDS")
    study_storage: str = flag("", "Optuna study storage, an RDB URL such as postgresql+psycopg2://USER@HOST/DB "
                              "(password in PGPASSWORD; default sqlite:///<Tune folder>/optuna.db); "
                              "`optuna-dashboard URL` opens it", CLUSTER, metavar="URL")
    dataset: str = flag("mnist", "data set", BUDGET, choices=DATASETS)
    num_samples: int = flag(20, "configurations to try (default 20)", BUDGET, smoke=2, low=1)
    seeds: int = flag(1, "training seeds per configuration, trained together as one packed trial (raven.pack); "
                      "the searcher sees their mean (default 1)", BUDGET, low=1)
    epochs: int = flag(20, "epochs per trial (default 20)", BUDGET, smoke=1, low=1)
    limit: int | None = flag(None, "train on the first N training images (default all)", BUDGET, smoke=1000, low=1)
    seed: int = flag(0, "base training seed and Optuna sampler seed (default 0)", BUDGET, low=0)
    asha: bool = flag(False, "ASHA early stopping on the objective (computed every epoch)", BUDGET)
    grace_period: int = flag(1, "ASHA: epochs before a trial can be stopped", BUDGET, low=1)
    precision: str = flag("fp32", "training's matrix products and the final evaluation's PGD search: fp32 or bf16 "
                          "(weights, optimiser and every verdict stay fp32; default fp32)", BUDGET, choices=PRECISIONS)
    smoke: bool = flag(False, SMOKE_HELP, BUDGET)
    max_concurrent: int | None = flag(None, "trials at once (default: as resources allow)", RESOURCES, smoke=2, low=1)
    cpus_per_trial: float = flag(1.0, "CPUs per trial (default 1)", RESOURCES, low=0)
    gpus_per_trial: float | None = flag(None, "GPUs per trial; fractions share one GPU between trials (default "
                                        "0.25 on a cluster with GPUs, else 0)", RESOURCES, low=0)
    max_failures: int = flag(3, "restarts of a failed trial (a lost node, a crashed worker) from its last "
                             "checkpoint, on any node (default 3; 0: a failure ends the trial)", RESOURCES, low=0)
    objective: str = flag("paper", "the robustness objective on validation: 'paper' (val_robust_accuracy: the "
                          "paper's KL and W2 PGD on the encoder), 'strong' (val_strong_robust_accuracy: APGD-CE on "
                          "the probe end to end, delta in {0.025, 0.05, 0.1}, which ranks models as the strong "
                          "protocol does) or 'certified' (val_certified_accuracy: the probe's CROWN-certified "
                          "accuracy, delta in {0.01, 0.025}); default paper", SELECTION, choices=PROTOCOLS)
    objectives: tuple[str, ...] = flag((), "what the search optimises: METRIC:max|min, "
                                       "comma-separated; several make a multi-objective search whose Pareto front "
                                       "is evaluated (default val_robust_accuracy:max, or "
                                       "val_strong_robust_accuracy:max with --objective strong, "
                                       "val_certified_accuracy:max with --objective certified)", SELECTION,
                                       metavar="METRIC:MODE,...")
    objective_images: int = flag(1000, "validation images attacked (default 1000)", SELECTION, smoke=200, low=1)
    objective_steps: int | None = flag(None, f"PGD steps (default {PROTOCOL_STEPS['paper']}; APGD-CE iterations "
                                       f"with --objective strong, default {PROTOCOL_STEPS['strong']}; unused by "
                                       "--objective certified)", SELECTION,
                                       smoke=5, low=1)
    objective_probe_images: int = flag(10000, "training images for the probe (default 10000)", SELECTION,
                                       smoke=1000, low=1)
    objective_every: int | None = flag(None, "compute the objective every K epochs (default: last epoch only; "
                                       "1 with --asha)", SELECTION, low=0)
    evaluate_top: int = flag(1, "evaluate the best K configurations (all their seeds) in full; with several "
                             "objectives, K of the Pareto front (default 1; 0: none)", EVALUATION, low=0)
    eval_limit: int | None = flag(None, "test images (default all 10000)", EVALUATION, smoke=200, low=1)
    eval_steps: int = flag(50, "PGD steps (default 50)", EVALUATION, smoke=10, low=1)
    eval_deltas: tuple[float, ...] | None = flag(None, "attack budgets (default the paper's grid)", EVALUATION,
                                                 smoke=(0.0, 0.1, 0.2))
    eval_protocol: str | None = flag(None, "the protocol of the final evaluation: paper, strong, both, certified "
                                     "or all (raven evaluate --protocol; default paper, both with --objective "
                                     "strong, all with --objective certified)", EVALUATION,
                                     choices=EVAL_PROTOCOLS)
    eval_strong_limit: int | None = flag(1000, "test images of the strong and certified protocols, the first N "
                                         "of those evaluated (default 1000, as the reproduction: on a 2-core CPU "
                                         "the strong protocol costs ~0.1 s per image and budget, its "
                                         "convergence check 3-4 times that)", EVALUATION,
                                         low=1)
    eval_probe_images: int | None = flag(None, "training images for the probe (default all)", EVALUATION,
                                         smoke=1000, low=1)
    eval_gpus: float | None = flag(None, "GPUs per evaluation task (default 1 if any)", EVALUATION, low=0)
    eval_cpus: float | None = flag(None, "CPUs per evaluation task (default: the cluster's CPUs shared "
                                   "among the evaluations, within one node, at least --cpus-per-trial)", EVALUATION, low=0)
    fid: bool = flag(True, "FID of the reconstructions", EVALUATION, smoke=False)
    tsne: bool = flag(True, "the t-SNE plot", EVALUATION)
    tsne_points: int = flag(1000, "test images in the t-SNE (default 1000)", EVALUATION, smoke=100, low=2)

    # Recorded at creation.
    code_version: str = "unknown"
    created: str = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(SweepSpec)
        for f in dataclasses.fields(self):
            value, low = getattr(self, f.name), f.metadata.get("low")
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            if low is None or value is None:
                continue
            integral = int in typing.get_args(hints[f.name]) or hints[f.name] is int
            wrong_type = isinstance(value, bool) or not isinstance(value, int if integral else (int, float))
            if wrong_type or not math.isfinite(value) or value < low or (f.name == "cpus_per_trial" and value <= 0):
                bound = "> 0" if f.name == "cpus_per_trial" else f">= {low:g}"
                raise ConfigError(f"--{f.name.replace('_', '-')} must be {bound}, got {value!r}")
        if self.name and not _NAME.match(self.name):
            raise ConfigError(f"--name may hold letters, digits, '.', '_' and '-' only, got {self.name!r}")
        if self.objective not in PROTOCOLS:
            raise ConfigError(f"--objective must be one of {', '.join(PROTOCOLS)}, got {self.objective!r}")
        if not self.objectives:  # the default follows the protocol
            object.__setattr__(self, "objectives", (f"{self.objective_settings.objective}:max",))
        objectives = parse_objectives(self.objectives)
        known = (*self.objective_settings.metrics(), *TRAIN_METRICS)
        for objective in objectives:
            if objective.metric not in known:
                raise ConfigError(f"--objectives: unknown metric {objective.metric!r}; choose from {', '.join(known)}")
        if self.asha and len(objectives) > 1:
            raise ConfigError("--asha stops trials on one metric; it takes a single --objectives entry")
        # Fail here, in one line, on any bad training or evaluation value.
        for value in (*self.space.ends, *self.initial):
            self.train_config(value)
        self.eval_config

    # ------------------------------------------------------------------ derived settings

    @property
    def param(self) -> str:
        """The searched TrainConfig field."""
        return self.space.param

    @property
    def initial(self) -> tuple[float, ...]:
        """The values evaluated before the sampler's own proposals."""
        return self.space.initial

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def objective_list(self):
        return parse_objectives(self.objectives)

    @property
    def objective_settings(self) -> ObjectiveSettings:
        every = self.objective_every if self.objective_every is not None else (1 if self.asha else 0)
        steps = self.objective_steps if self.objective_steps is not None else PROTOCOL_STEPS[self.objective]
        return ObjectiveSettings(val_limit=self.objective_images, steps=steps, protocol=self.objective,
                                 probe_limit=self.objective_probe_images, every=every, seed=self.seed)

    @property
    def evaluation(self) -> dict[str, Any]:
        """The EvalConfig fields of the final evaluation (the smoke preset narrows the delta grid)."""
        values = {"steps": self.eval_steps, "limit": self.eval_limit, "strong_limit": self.eval_strong_limit,
                  "probe_limit": self.eval_probe_images,
                  "fid": self.fid, "tsne": self.tsne, "tsne_points": self.tsne_points, "seed": self.seed}
        if self.eval_deltas is not None:
            values["deltas"] = list(self.eval_deltas)
        values["protocol"] = self.eval_protocol or EVAL_PROTOCOL_AFTER.get(self.objective, "paper")
        values["precision"] = self.precision
        return values

    @property
    def eval_config(self) -> EvalConfig:
        return EvalConfig(**self.evaluation)

    @property
    def validation_size(self) -> int:
        return int(self.train_extra.get("validation_size", TrainConfig.validation_size))

    @property
    def train(self) -> dict[str, Any]:
        """The fixed TrainConfig fields of every trial."""
        return {"epochs": self.epochs, "limit": self.limit, "precision": self.precision, **self.train_extra}

    def train_config(self, value: float, repeat: int = 0) -> TrainConfig:
        """The TrainConfig of one seed of a trial: fixed settings, the searched value, seed = base seed + repeat."""
        return TrainConfig.from_dict({**self.train, "method": self.method, "dataset": self.dataset,
                                      self.param: float(value), "seed": int(self.seed) + int(repeat)})

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The training seeds of every trial: base seed .. base seed + seeds - 1."""
        return tuple(int(self.seed) + k for k in range(self.seeds))

    def train_configs(self, value: float) -> list[TrainConfig]:
        """The TrainConfigs a trial trains as one pack: one per seed of `seed_list`."""
        return [self.train_config(value, k) for k in range(self.seeds)]

    # ------------------------------------------------------------------ files and the record

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "space": self.space.to_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SweepSpec":
        """`to_dict`'s form, or that of raven before raven.sweep.space (param, space dict and initial side by side)."""
        if "train" in values:  # the nested layout of raven before SweepSpec held one field per flag
            raise SweepError(f"sweep {values.get('name')!r} was saved by an earlier raven (nested "
                             f"{SPEC_NAME}); continue it with the version that started it")
        known = {f.name for f in dataclasses.fields(cls)}
        space = SearchSpace.from_dict(values["space"], values.get("param"), values.get("initial"))
        return cls(**{k: v for k, v in values.items() if k in known and k != "space"}, space=space)

    def save(self) -> Path:
        return write_atomic(self.experiment_dir / SPEC_NAME, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, experiment_dir: str | os.PathLike) -> "SweepSpec":
        spec = cls.from_dict(json.loads((Path(experiment_dir) / SPEC_NAME).read_text()))
        if spec.seeds > 1 and any(REPEATER_INDEX in path.read_text()
                                  for path in Path(experiment_dir).glob("trial_*/params.json")):
            raise SweepError(f"sweep {spec.name!r} ran each of its --seeds as its own trial (an earlier raven, "
                             f"before packed trials); continue it with the version that started it, or start a "
                             f"new sweep")
        return spec

    def mlflow_params(self) -> dict[str, Any]:
        """The parent run's parameters: search space, objectives, budget, fixed settings, code version."""
        objectives = self.objective_list
        params: dict[str, Any] = {
            "sweep.kind": self.kind, "method": self.method, "dataset": self.dataset,
            "search.param": self.param, "search.sampler": f"optuna TPE (seed {self.seed})",
            "search.initial": list(self.initial) or "none", "search.objectives": ",".join(map(str, objectives)),
            "search.study_storage": hide_password(self.study_storage),
            "budget.num_samples": self.num_samples, "budget.seeds": self.seeds,
            "budget.trials": self.num_samples, "budget.models": self.num_samples * self.seeds,
            "budget.asha": self.asha,
            "budget.max_concurrent": self.max_concurrent or "auto",
            "resources.cpus_per_trial": self.cpus_per_trial,
            "resources.gpus_per_trial": "auto" if self.gpus_per_trial is None else self.gpus_per_trial,
            "evaluate_top": self.evaluate_top, "smoke": self.smoke, "code_version": self.code_version,
            "selection_metric": objectives[0].metric, "selection_split": "validation",
        }
        for prefix, values in (("search.space", self.space.describe()), ("train", self.train),
                               ("objective", self.objective_settings.to_dict()), ("evaluation", self.evaluation)):
            params.update({f"{prefix}.{key}": value for key, value in values.items()})
        return params


def hide_password(url: str) -> str:
    """An RDB URL as it may be shown and logged (a password in it replaced by ***)."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


# ----------------------------------------------------------------------------- flags


def _parser_for(hint: Any):
    """argparse `type` for a field's type hint: int, float, str, or comma-separated tuples of them."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]

        def parse_list(text: str) -> tuple:
            try:
                return tuple(item(v.strip()) for v in text.split(",") if v.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, "
                                                 f"got {text!r}") from None
        return parse_list
    return base


def add_arguments(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """A flag for every flag field of SweepSpec (plus --address, --data-dir, --resume), in its group.

    Every flag defaults to None, so that `spec_from_args` can tell an explicit value from the
    preset's; `defaults` overrides a field's default for this entry script (e.g. experiment).
    """
    hints = typing.get_type_hints(SweepSpec)
    groups: dict[str, argparse._ArgumentGroup] = {}
    g = groups[CLUSTER] = parser.add_argument_group(CLUSTER)
    g.add_argument("--address", default=None,
                   help="Ray cluster to join: 'auto' (RAY_ADDRESS, else a cluster started on this machine) or "
                        "HOST:PORT; absent: start a local Ray with this machine's resources")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume from "
                        "their checkpoints, the MLflow runs and the Optuna study are reused; the saved settings "
                        "of that sweep apply")
    g.add_argument("--data-dir", default=None, help="data root (default: $RAVEN_DATA_DIR, else ~/.cache/raven/data)")
    for f in dataclasses.fields(SweepSpec):
        if "help" not in f.metadata:
            continue
        meta, hint = f.metadata, hints[f.name]
        default = defaults.get(f.name, f.default)
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        text = meta["help"] if default in (None, "", True, False) or "default" in meta["help"] \
            else f"{meta['help']} (default {default})"
        name = "--" + f.name.replace("_", "-")
        if hint is bool:
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(name, type=_parser_for(hint), default=None, choices=meta["choices"],
                               metavar=meta["metavar"], help=text)
    parser.set_defaults(_spec_defaults=defaults)


def spec_from_args(args: argparse.Namespace, *, kind: str, method: str, space: SearchSpace,
                   train_extra: dict[str, Any] | None = None) -> SweepSpec:
    """A new SweepSpec: the full preset (or the smoke one), the script's defaults, then the flags given."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(SweepSpec):
        if "help" not in f.metadata:
            continue
        value = getattr(args, f.name, None)
        if value is None:
            value = args._spec_defaults.get(f.name, f.default)
            if args.smoke and f.metadata["smoke"] is not _SAME:
                value = f.metadata["smoke"]
        values[f.name] = value
    dataset = values["dataset"]
    values["name"] = values["name"] or f"{kind.replace('_', '-')}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    values["storage_path"] = str(Path(values["storage_path"]).resolve())
    values["tracking_uri"] = resolve_tracking_uri(values["tracking_uri"])
    values["study_storage"] = values["study_storage"] or \
        f"sqlite:///{Path(values['storage_path']) / values['name'] / STUDY_NAME}"
    return SweepSpec(kind=kind, method=method, space=space, train_extra=dict(train_extra or {}), code_version=git_version(),
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **values)


def find_resumable(storage_path: str | os.PathLike, kind: str, name: str | None) -> SweepSpec:
    """The saved spec of the sweep to continue: --name, else the newest `kind` sweep under storage_path."""
    root = Path(storage_path).resolve()
    if name is not None:
        if not (root / name / SPEC_NAME).is_file():
            raise SweepError(f"no sweep {name!r} to resume in {root} (expected {root / name / SPEC_NAME})")
        spec = SweepSpec.load(root / name)
        if spec.kind != kind:
            raise SweepError(f"sweep {name!r} in {root} is a {spec.kind} sweep; resume it with sweeps/{spec.kind}.py")
    else:
        candidates = []
        for path in root.glob(f"*/{SPEC_NAME}") if root.is_dir() else []:
            try:
                found = SweepSpec.load(path.parent)
            except (OSError, ValueError, TypeError, SweepError):
                continue
            if found.kind == kind:
                candidates.append((path.stat().st_mtime, found))
        if not candidates:
            raise SweepError(f"no {kind} sweep to resume in {root}; start one without --resume")
        spec = max(candidates, key=lambda c: c[0])[1]
    return dataclasses.replace(spec, storage_path=str(root))  # the folder may have moved

