"""The paper's grid of runs (Section 4): the budget, the (dataset, method, seed) cells, one pack's work.

Torch only (no Ray, no MLflow): a pack runs the same inside a Ray task (raven.reproduce.runner) and in
a local process pool on a machine without either (raven.reproduce.offline).

The seeds of a (dataset, method) are one pack (`group_cells`, `run_pack`): they differ only in
their seed, so they train as one packed model (raven.pack.train_pack: each seed exactly its solo
run, its own early stopping and NaN guard, its own checkpoint in its cell's folder, which
`raven evaluate` and `raven.load_checkpoint` read), then each is evaluated on the test set: the
paper's probe and attacks of all seeds in one batched pass (raven.eval.pack_eval), the rest seed by seed.
Each seed stays its own cell: its own result, MLflow child run and resume unit.

"Until the model converges" (Section 4.1.2) is made concrete as at most `epochs` epochs with
early stopping when the validation ELBO has not improved for `patience` epochs. A Budget below
the full one is stated in every output: the parent's and every child's "budget" param and
raven.budget tag, the console, and the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from raven.config import (DATASETS, DEFAULT_ETA, METHODS, PAPER_ETA, PAPER_SIGMA_AUG, PRECISIONS, ConfigError,
                          TrainConfig)
from raven.data import DataSplits, load_splits
from raven.methods import PAPER_METHODS
from raven.eval.attacks import PAPER_STEPS
from raven.eval.evaluate import (TEST_IMAGES, TRAIN_SPLIT_IMAGES, EvalConfig, EvalResult, KeptStages, evaluate_model,
                                 paper_stage_from_json, paper_stage_json)
from raven.eval.pack_eval import pack_probe_and_attack
from raven.eval.protocols import PROTOCOLS, StrongConfig
from raven.options import flag_field, one_of
from raven.pack import train_pack
from raven.record.provenance import dataset_inputs
from raven.train import CHECKPOINT_NAME, METRICS_NAME, TrainResult, resolve_device

PAPER_SEEDS = 5
CHECKPOINT_ARTIFACTS = "checkpoint"
EVALUATION_CACHE = "evaluation.pkl"  # a seed's finished evaluation, beside its checkpoint (run_pack)


@dataclass(frozen=True)
class Budget:
    """How much of the paper's experiment to run; the defaults are the full reproduction.

    epochs/patience: at most `epochs` epochs, stopping early once val_elbo has not improved
    for `patience` epochs (None: always `epochs`). limit: training images (None: the
    55,000-image training split). eval_limit: test images attacked and measured (None:
    10,000). probe_limit: training images the linear probe is fitted on (None: all). seeds:
    0 .. seeds-1. steps: PGD steps per attack (paper: 50). fid: compute FID (Table 2).
    protocol: the evaluation's protocol (raven evaluate --protocol; "all": the paper's, the
    strong one and the certified bounds side by side). strong_steps: the strong protocol's PGD steps and AutoAttack
    iterations (100 by default, AutoAttack's standard); strong_restarts: its PGD restarts;
    square_queries: Square's queries (standard: 5,000). strong_limit: the strong protocol's
    images, the first N of the evaluated ones (None: all); check_seeds: the seeds whose
    strong protocol runs its convergence check (the first N; the check costs about three
    times the protocol, so the full budget runs it on one seed of each method).
    """

    epochs: int = flag_field(100, "max epochs per model")
    patience: int | None = flag_field(5, "stop after this many epochs without a better val_elbo",
                                      off=("--no-early-stopping", "always train --epochs epochs"))
    limit: int | None = flag_field(None, f"training images (full: all {TRAIN_SPLIT_IMAGES:,})")
    eval_limit: int | None = flag_field(None, f"test images attacked and measured (full: all {TEST_IMAGES:,})")
    probe_limit: int | None = flag_field(None, "training images the linear probe is fitted on (full: all)")
    seeds: int = flag_field(PAPER_SEEDS, "seeds 0..N-1 per method")
    steps: int = flag_field(PAPER_STEPS, "PGD steps per attack (full: 50, the paper's)")
    datasets: tuple[str, ...] = flag_field(DATASETS, f"comma-separated, any of {','.join(DATASETS)}")
    methods: tuple[str, ...] = flag_field(PAPER_METHODS, f"comma-separated, any of {','.join(METHODS)} (full: the "
                                          "paper's five)")
    fid: bool = flag_field(True, "skip FID (the slowest metric on a CPU)")
    protocol: str = flag_field("all", "evaluation protocol: paper, strong, certified, both (paper and strong) or all "
                               "(raven evaluate --protocol)",
                               choices=PROTOCOLS)
    strong_steps: int = flag_field(StrongConfig.steps, "strong protocol: PGD steps and AutoAttack iterations")
    strong_restarts: int = flag_field(StrongConfig.restarts, "strong protocol: PGD restarts")
    square_queries: int = flag_field(StrongConfig.square_queries, "strong protocol: Square attack queries")
    strong_limit: int | None = flag_field(1000, "strong protocol: the first N of the evaluated test images (full: "
                                          "1,000; its worst case over every attack costs ~100x the paper's)",
                                          off=("--strong-all-images", "the strong protocol on every evaluated image"))
    check_seeds: int = flag_field(1, "strong protocol: seeds 0..N-1 of each method run its convergence check "
                                  "(doubled steps and restarts, ~3x the protocol's cost); the others skip it")
    precision: str = flag_field("fp32", "training's matrix products and the PGD attacks' search: fp32 or bf16 "
                                        "(weights, optimiser, every verdict and FID stay fp32)", choices=PRECISIONS)
    smoke: bool = flag_field(False, "the smoke budget (SMOKE_BUDGET): 2 seeds, 2 epochs on 5,000 training images, "
                             "300 test images, 10-step PGD, probe on 5,000 images, no FID, the strong protocol and "
                             "the certified bounds on 100 images, at 5 steps x 1 restart and 50 Square queries (both "
                             "datasets, the paper's five methods)")

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        one_of("precision", self.precision, PRECISIONS)
        for name in ("epochs", "seeds", "steps", "strong_steps", "strong_restarts", "square_queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.check_seeds, bool) or not isinstance(self.check_seeds, int) or self.check_seeds < 0:
            raise ConfigError(f"check_seeds must be an integer >= 0, got {self.check_seeds!r}")
        for name in ("patience", "limit", "eval_limit", "probe_limit", "strong_limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 (or unset), got {value!r}")
        for name, allowed in (("datasets", DATASETS), ("methods", METHODS)):
            values = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            if not values:
                raise ConfigError(f"{name} must name at least one of {', '.join(allowed)}")
            for value in values:
                if value not in allowed:
                    raise ConfigError(f"unknown {name[:-1]} {value!r}; choose from {', '.join(allowed)}")
            if len(set(values)) != len(values):
                raise ConfigError(f"{name} must not repeat, got {','.join(values)}")
            object.__setattr__(self, name, values)

    @property
    def full(self) -> bool:
        """True when nothing is scaled down from the full reproduction (smoke aside)."""
        return dataclasses.replace(self, smoke=False) == FULL_BUDGET

    @property
    def per_model_full(self) -> bool:
        """True when every model it trains and evaluates gets the full budget: at most the number of seeds (2 or
        more, so that a std over seeds exists) and which datasets and methods differ from the full reproduction."""
        cells = dict(seeds=FULL_BUDGET.seeds, datasets=FULL_BUDGET.datasets, methods=FULL_BUDGET.methods)
        return not self.smoke and self.seeds >= 2 and dataclasses.replace(self, **cells) == FULL_BUDGET

    @property
    def kind(self) -> str:
        return "full" if self.full else ("smoke" if self.smoke else "reduced")

    def cells(self) -> list["Cell"]:
        return [Cell(d, m, s) for d in self.datasets for m in self.methods for s in range(self.seeds)]

    def describe(self) -> str:
        """One line: 'full' or what is scaled down, against the full reproduction."""
        full = FULL_BUDGET
        if self.full:
            return (f"full budget: up to {full.epochs} epochs with early stopping (patience {full.patience} on "
                    f"val_elbo), all {TRAIN_SPLIT_IMAGES:,} training images, {TEST_IMAGES:,} test images, probe on "
                    f"all training images, {full.seeds} seeds, {full.steps}-step PGD, FID, both datasets, all "
                    f"methods; the paper's protocol, the certified bounds and the strong protocol ({full.strong_steps}-step PGD x "
                    f"{full.strong_restarts} restarts, AutoAttack's standard set, on the first {full.strong_limit:,} "
                    f"test images; its convergence check on {full.check_seeds} seed of each method)")
        changes = []
        if (self.epochs, self.patience) != (full.epochs, full.patience):
            stop = f"early stopping patience {self.patience}" if self.patience else "no early stopping"
            changes.append(f"{self.epochs} epochs max ({stop}; full: {full.epochs}, patience {full.patience})")
        if self.limit is not None:
            changes.append(f"{self.limit:,} of {TRAIN_SPLIT_IMAGES:,} training images")
        if self.eval_limit is not None:
            changes.append(f"{self.eval_limit:,} of {TEST_IMAGES:,} test images")
        if self.probe_limit is not None:
            changes.append(f"probe on {self.probe_limit:,} of {TRAIN_SPLIT_IMAGES:,} training images")
        if self.seeds != full.seeds:
            changes.append(f"{self.seeds} of the paper's {PAPER_SEEDS} seeds")
        if self.steps != full.steps:
            changes.append(f"{self.steps}-step PGD (paper: {PAPER_STEPS})")
        if not self.fid:
            changes.append("no FID")
        if self.protocol != full.protocol:
            changes.append(f"protocol {self.protocol} (full: {full.protocol})")
        if self.protocol != "paper":
            strong = (self.strong_steps, self.strong_restarts, self.square_queries)
            if strong != (full.strong_steps, full.strong_restarts, full.square_queries):
                changes.append(f"strong protocol at {self.strong_steps} steps x {self.strong_restarts} restart(s), "
                               f"Square {self.square_queries} queries (full: {full.strong_steps} x {full.strong_restarts}, "
                               f"{full.square_queries:,})")
            if self.strong_limit != full.strong_limit:
                changes.append(f"strong protocol on {'all evaluated' if self.strong_limit is None else f'{self.strong_limit:,}'}"
                               f" test images (full: {full.strong_limit:,})")
            if self.check_seeds != full.check_seeds:
                changes.append(f"its convergence check on {self.check_seeds} seed(s) of each method (full: "
                               f"{full.check_seeds})")
        if self.precision != full.precision:
            changes.append(f"{self.precision} training and attacks (full: {full.precision})")
        if self.datasets != DATASETS:
            changes.append("datasets " + ", ".join(self.datasets))
        if self.methods != PAPER_METHODS:
            changes.append("methods " + ", ".join(self.methods))
        if self.per_model_full:  # fewer seeds or cells, each model at the full budget: comparable, cell by cell
            return "full budget for each model; " + "; ".join(changes)
        return f"REDUCED budget{' (--smoke)' if self.smoke else ''}: " + "; ".join(changes)

    def replace(self, **changes: Any) -> "Budget":
        return dataclasses.replace(self, **changes)

    def params(self) -> dict[str, str]:
        """The budget as MLflow params (strings), plus the one-line description under 'budget'."""
        values = dataclasses.asdict(self)
        out = {f"budget.{k}": ",".join(v) if isinstance(v, tuple) else str(v) for k, v in values.items()}
        out["budget"] = self.describe()
        return out


FULL_BUDGET = Budget()
# Sized to finish in a few minutes on 2 CPU cores while still producing every table and
# figure: both datasets, all five methods, 2 seeds (so a std over seeds exists) = 20 tasks.
SMOKE_BUDGET = Budget(epochs=2, patience=None, limit=5000, eval_limit=300, probe_limit=5000, seeds=2, steps=10,
                      fid=False, strong_steps=5, strong_restarts=1, square_queries=50, strong_limit=100, smoke=True)


@dataclass(frozen=True)
class Cell:
    """One (dataset, method, seed) of the reproduction: one MLflow child run, trained in its (dataset, method)'s pack."""

    dataset: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.method}-s{self.seed}"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Hyperparameters:
    """sigma_aug and eta of one dataset, and where they came from."""

    dataset: str
    sigma_aug: float
    eta: float
    source: str


def paper_hyperparameters(dataset: str, why: str) -> Hyperparameters:
    return Hyperparameters(dataset, PAPER_SIGMA_AUG[dataset], PAPER_ETA[dataset], f"paper, Appendix C.2 ({why})")


def default_hyperparameters(dataset: str, why: str) -> Hyperparameters:
    """raven's documented defaults: the paper's sigma_aug, and the eta tuned on validation (README).

    The paper's eta (500 / 5000) collapses the Smooth Encoder under raven's Bernoulli likelihood,
    so it is used only when asked for (--paper-values).
    """
    return Hyperparameters(dataset, PAPER_SIGMA_AUG[dataset], DEFAULT_ETA[dataset],
                           f"raven defaults: sigma_aug of the paper, eta tuned on validation ({why})")


def train_config(cell: Cell, budget: Budget, hp: Hyperparameters) -> TrainConfig:
    """The paper's setting for one cell (RAdam 1e-3, batch 128, d = 10, noise 0.05) under `budget`."""
    return TrainConfig(method=cell.method, dataset=cell.dataset, sigma_aug=hp.sigma_aug, eta=hp.eta,
                       epochs=budget.epochs, patience=budget.patience, seed=cell.seed, limit=budget.limit,
                       precision=budget.precision)


def eval_config(cell: Cell, budget: Budget) -> EvalConfig:
    strong = StrongConfig(steps=budget.strong_steps, restarts=budget.strong_restarts,
                          autoattack_steps=budget.strong_steps, square_queries=budget.square_queries,
                          convergence=cell.seed < budget.check_seeds)
    return EvalConfig(steps=budget.steps, limit=budget.eval_limit, probe_limit=budget.probe_limit, fid=budget.fid,
                      tsne=True, seed=cell.seed, protocol=budget.protocol, strong=strong,
                      strong_limit=budget.strong_limit, precision=budget.precision)


# ----------------------------------------------------------------------------- the task


@dataclass
class CellResult:
    """What a task sends back to the driver: numbers, and its files as bytes (nodes share no disk)."""

    cell: Cell
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    evaluation: EvalResult | None = None  # its artifact paths are local to the worker
    files: dict[str, bytes] = field(default_factory=dict)  # "checkpoint/checkpoint.pt" -> bytes
    inputs: list[dict[str, Any]] = field(default_factory=list)  # raven.record.tracking.dataset_inputs of the data read
    train_seconds: float = 0.0  # the pack's training, which all its pack_size seeds share
    pack_size: int = 1
    pack: tuple[str, ...] = ()  # the cells trained with it in one pack (one process), itself included
    eval_seconds: float = 0.0  # its evaluation, with its share of the pack's batched attacks (pack_stages)
    device: str = ""
    node: str = ""
    error: str | None = None


def group_cells(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    """{(dataset, method): its cells, seeds in order}: the packs of the reproduction, in the cells' order."""
    packs: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        packs.setdefault((cell.dataset, cell.method), []).append(cell)
    return {key: sorted(group, key=lambda c: c.seed) for key, group in packs.items()}


def pack_stages(trained: list[TrainResult], evaluations: list[EvalConfig], splits: DataSplits
                ) -> tuple[dict[int, dict[str, Any]], float]:
    """The probe and paper-protocol attacks of the pack's trained (not diverged) seeds in one batched pass
    (raven.eval.pack_eval), as {index in the pack: its stage} for evaluate_model, and each seed's share of the
    pass's seconds. Empty (each seed then attacked alone) with fewer than two such seeds or where an
    evaluation does not run the paper's protocol."""
    ready = [k for k, member in enumerate(trained) if not member.diverged]
    if len(ready) < 2 or not all(evaluations[k].runs_paper for k in ready):
        return {}, 0.0
    started = time.perf_counter()
    entries = pack_probe_and_attack([trained[k].model for k in ready], splits.train_x, splits.train_y,
                                    splits.test_x, splits.test_y, [evaluations[k] for k in ready])
    return dict(zip(ready, entries)), (time.perf_counter() - started) / len(ready)


def pack_train_seconds(histories: list[list[dict[str, Any]]]) -> float:
    """The pack's training time by its epochs' own measured seconds: every pack epoch is in its longest-trained
    member's history, which also holds the epochs an earlier process ran (a pack resumed from a checkpoint, or
    loaded finished by a later session, whose own wall time misses them)."""
    return max((sum(float(row.get("epoch_seconds", 0.0)) for row in history) for history in histories), default=0.0)


def _weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's weights (not of checkpoint.pt's bytes, which a resumed run writes anew)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _comparable(evaluation: EvalConfig) -> Any:
    """The evaluation config as JSON gives it back, so a kept record compares equal to the live config."""
    return json.loads(json.dumps(dataclasses.asdict(evaluation), default=str))


def _with_defaults(saved: Any, default: Any) -> Any:
    """A kept record's config with the fields it lacks (added to EvalConfig since) at their defaults."""
    if not isinstance(saved, dict) or not isinstance(default, dict):
        return saved
    return {k: _with_defaults(saved[k], default.get(k)) if k in saved else v for k, v in default.items()} | {
        k: v for k, v in saved.items() if k not in default}


def _cached_evaluation(out: Path, evaluation: EvalConfig, model: torch.nn.Module,
                       kept: Path | None = None) -> tuple[EvalResult, float, Path] | None:
    """(result, seconds, where) of an evaluation already made of these weights under `evaluation`, else None:
    the pickle beside the checkpoint, else the committable record `kept` (run_pack's keep_dirs)."""
    digest = _weights_digest(model)
    try:
        with open(out / "evaluation" / EVALUATION_CACHE, "rb") as f:
            saved = pickle.load(f)
        if saved["config"] == evaluation and saved["weights"] == digest:
            return saved["result"], saved["seconds"], out / "evaluation"
    except Exception:  # noqa: BLE001 - absent, partly written or from another version: try the record
        pass
    try:
        saved = json.loads(kept.read_text()) if kept is not None else None
        held = _with_defaults(saved["eval_config"], _comparable(EvalConfig())) if saved else None
        if held == _comparable(evaluation) and saved["weights"] == digest:
            return EvalResult.from_json(saved["result"]), saved["seconds"], kept
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: evaluate again
        pass
    return None


def machine_description() -> str:
    """The host, its CPU model and torch: training and kernels differ in their last bits from one CPU to another."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):  # not Linux: platform's word for it
        pass
    return f"{platform.node()} ({cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def kept_seed(kept: Path | None, config: TrainConfig, evaluation: EvalConfig) -> dict[str, Any] | None:
    """The kept record <cell>.json of a seed trained under `config` and evaluated in whole under `evaluation`,
    else None (absent, unreadable, or written under other configs or before records held their training
    config). A record written before a config field existed compares at that field's default."""
    try:
        saved = json.loads(kept.read_text()) if kept is not None else None
        if not saved or not saved.get("history"):
            return None
        held_eval = _with_defaults(saved["eval_config"], _comparable(EvalConfig()))
        held_train = _with_defaults(saved.get("train_config"), TrainConfig().to_dict())
        if held_eval == _comparable(evaluation) and held_train == config.to_dict():
            return saved
    except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: train and evaluate again
        pass
    return None


def _cache_evaluation(out: Path, evaluation: EvalConfig, model: torch.nn.Module, result: EvalResult,
                      seconds: float, kept: Path | None = None, history: list[dict[str, Any]] | None = None,
                      config: TrainConfig | None = None, train_seconds: float = 0.0,
                      pack: tuple[str, ...] = ()) -> None:
    """Keep a seed's evaluation beside its checkpoint, so that a pack stopped before its last seed was
    evaluated (a session's end, during hours of FID and strong attacks) does not evaluate it again; and,
    with `kept`, as a small JSON record (numbers, the weights' digest, the training config and history,
    the machine) that can be committed, so that a later session reuses it (`kept_seed`)."""
    digest = _weights_digest(model)
    path = out / "evaluation" / EVALUATION_CACHE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"config": evaluation, "weights": digest, "result": result,
                     "seconds": seconds}, f)
    os.replace(tmp, path)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(kept.name + ".tmp")
        tmp.write_text(json.dumps({"eval_config": _comparable(evaluation), "weights": digest,
                                   "train_config": None if config is None else config.to_dict(),
                                   "train_seconds": round(train_seconds, 1), "pack": list(pack),
                                   "machine": machine_description(),
                                   "seconds": round(seconds, 1), "history": history, "result": result.to_json()},
                                  indent=1, default=str))
        os.replace(tmp, kept)


def run_pack(cells: list[Cell], configs: list[TrainConfig], evaluations: list[EvalConfig], data_dir: str | None,
             out_dirs: list[str], threads: int = 1, device: str = "auto",
             log: Callable[[str], None] | None = None, keep_dirs: list[str] | None = None) -> list[CellResult]:
    """Train the cells of one (dataset, method) as one pack into their out_dirs (resuming checkpoints there),
    then evaluate each seed on the test set; one CellResult per cell, in order. The paper protocol's probe and
    attacks of the seeds run as one batched pass (pack_stages; each seed's numbers those of its solo
    evaluation), the rest of each seed's evaluation (strong protocol, MSE, FID, ...) one seed after another.

    Runs inside a Ray worker (or a local process). A seed that diverged comes back with `error` set;
    the others are trained and evaluated as usual. log: one line per epoch and per evaluation stage.
    keep_dirs: where each seed's finished evaluation is also kept as <cell>.json, a committable record
    (numbers, the training and evaluation configs, the epochs' history). A seed whose record matches its
    training and evaluation config is done: a later run (one that lost the checkpoints, maybe on another
    machine) neither trains nor evaluates it again, and trains the pack of the other seeds only. The
    weights are not compared: fp32 training is deterministic on one machine and thread count, not across
    CPUs (another BLAS kernel, another rounding), and each record is one model's whole evaluation, every
    stage on the same weights. A seed's unfinished stages (<cell>.stages.json) are reused only for the
    same weights.
    """
    torch.set_num_threads(max(1, threads))
    device = resolve_device(device)
    first = configs[0]
    results = [CellResult(cell, config.to_dict(), device=str(device), node=platform.node(), pack_size=len(cells))
               for cell, config in zip(cells, configs)]
    # The whole training split: training keeps the first config.limit images, the probe the
    # first probe_limit (the paper's probe sees every training image).
    splits = load_splits(first.dataset, data_dir, device, first.validation_size)
    for result, evaluation in zip(results, evaluations):
        result.inputs = dataset_inputs(first.dataset, data_dir, {
            "train": len(splits.train_x[:first.limit]), "validation": len(splits.val_x),
            "test": len(splits.test_x[:evaluation.limit])}, first.validation_size)
    kept = [None if keep_dirs is None else Path(keep_dirs[k]) / f"{cell.name}.json" for k, cell in enumerate(cells)]
    done = {k: record for k in range(len(cells))
            if (record := kept_seed(kept[k], configs[k], evaluations[k])) is not None}
    todo = [k for k in range(len(cells)) if k not in done]
    for k, record in done.items():
        results[k].history, results[k].evaluation = record["history"], EvalResult.from_json(record["result"])
        results[k].eval_seconds = float(record["seconds"])
        results[k].train_seconds = float(record.get("train_seconds") or pack_train_seconds([record["history"]]))
        results[k].node = record.get("machine") or "unknown (kept before machines were recorded)"
        # A record written before packs were recorded came from a pack of the whole part.
        results[k].pack = tuple(record.get("pack") or (cell.name for cell in cells))
        results[k].pack_size = len(results[k].pack)
        if log:
            log(f"{cells[k].name}: its whole evaluation is kept in {kept[k]}; neither trained nor evaluated again")
    if not todo:
        return results
    started = time.perf_counter()
    trained = dict(zip(todo, train_pack([configs[k] for k in todo], splits=splits, device=device,
                                        out_dirs=[out_dirs[k] for k in todo], progress=False, log=log)))
    # This process's wall time, unless earlier processes trained part of the pack (then its epochs' seconds).
    train_seconds = max(time.perf_counter() - started,
                        pack_train_seconds([member.history for member in trained.values()]))
    cached = {k: None if trained[k].diverged else _cached_evaluation(Path(out_dirs[k]), evaluations[k],
                                                                     trained[k].model, kept[k])
              for k in todo}
    pending = [k for k in todo if cached[k] is None and not trained[k].diverged]
    # Each pending seed's finished stages, beside its kept record (else its checkpoint): an evaluation stopped
    # mid-way (a session's end during the hours of a strong protocol's check) resumes at its unfinished stage.
    kept_stages = {k: KeptStages(kept[k].with_suffix(KeptStages.SUFFIX) if kept[k] is not None
                                 else Path(out_dirs[k]) / "evaluation" / "stages.json",
                                 {"weights": _weights_digest(trained[k].model), "eval_config": _comparable(evaluations[k])})
                   for k in pending}
    fresh = [k for k in pending if kept_stages[k].get("paper") is None]
    stages, stage_share = pack_stages([trained[k] for k in fresh], [evaluations[k] for k in fresh], splits)
    stages = {fresh[j]: stage for j, stage in stages.items()}
    for k, stage in stages.items():  # kept now: the batched pass is the longest stage of most seeds
        kept_stages[k].keep("paper", paper_stage_json(stage), stage_share)
    stages.update({k: paper_stage_from_json(kept_stages[k].get("paper"), device) for k in pending if k not in fresh})
    for k in todo:
        result, member, evaluation, out_dir = results[k], trained[k], evaluations[k], out_dirs[k]
        result.train_seconds, result.pack_size = train_seconds, len(todo)
        result.pack, result.node = tuple(cells[j].name for j in todo), machine_description()
        if member.diverged:
            result.error = f"training diverged: {member.diverged}"
            continue
        out = Path(out_dir)
        result.history = member.history
        if cached[k] is not None:  # evaluated before the pack was interrupted: not redone
            result.evaluation, result.eval_seconds, where = cached[k]
            if log:
                log(f"{result.cell.name}: its evaluation of these weights is in {where}; not redone")
        else:
            started = time.perf_counter()
            result.evaluation = evaluate_model(member.model, splits, evaluation, out_dir=out / "evaluation",
                                               label=result.cell.name, stage=stages.get(k), log=log,
                                               kept=kept_stages[k])
            # Stages an earlier, stopped run finished count at the seconds they took then.
            result.eval_seconds = (time.perf_counter() - started + (stage_share if k in fresh and k in stages else 0.0)
                                   + kept_stages[k].earlier_seconds)
            _cache_evaluation(out, evaluation, member.model, result.evaluation, result.eval_seconds, kept[k],
                              member.history, configs[k], train_seconds, result.pack)
            kept_stages[k].discard()  # the whole evaluation is in the record now
        for path in result.evaluation.artifacts:
            result.files[f"robustness/{Path(path).name}"] = Path(path).read_bytes()
        for name in (CHECKPOINT_NAME, METRICS_NAME):
            result.files[f"{CHECKPOINT_ARTIFACTS}/{name}"] = (out / name).read_bytes()
    return results
