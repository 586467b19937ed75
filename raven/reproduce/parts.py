"""The reproduction in parts: one (dataset, method) pack at a time, each exported as a small committable folder.

For a long run on one machine (`python sweeps/reproduce.py --parts DIR`): each part is a
(dataset, method) pack (raven.reproduce.grid.run_pack: its seeds trained as one pack, then
evaluated), written when it finishes as DIR/<dataset>-<method>/part.json. A part holds
numbers only (each seed's config, epoch history, record metrics and robustness.json),
never checkpoints: those stay in the work folder, where an interrupted part resumes its
training. A part whose part.json exists is done and never rerun, so a stopped run loses at
most the part in progress and continues with the same command. Within a part, each seed's
evaluation is kept as it finishes in DIR/<part>/seeds/<cell>.json (numbers, its training
config and history, the machine), small enough to commit: a later session that has lost the
work folder, on this machine or another, takes each kept seed as done and trains and
evaluates only the others, as a pack of those seeds (run_pack). A part may so hold seeds
trained on different machines; each seed's record says where, and each is one model
evaluated in whole.

`load_parts` reads parts from one or more folders (runs that ran on different machines or
days) into the same Reproduction that raven.reproduce.report reads from MLflow, so
`raven report --parts DIR [DIR ...]` writes the same tables and figures. Torch only: no
Ray and no MLflow are needed to run or to read parts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from raven.config import DATASETS, METHODS, ConfigError
from raven.eval.results import KeptStages
from raven.progress import duration
from raven.record.provenance import git_version
from raven.record.tracking import flatten
from raven.reproduce.grid import (FULL_BUDGET, Budget, CellResult, Hyperparameters, eval_config, group_cells,
                                  kept_seed, machine_description, pack_train_seconds, run_pack,
                                  train_config)

PART_NAME = "part.json"
PART_FORMAT = 1
SEEDS_DIR = "seeds"  # DIR/<part>/seeds/<cell>.json: each seed's evaluation as it finishes (run_pack's keep_dirs)
# Params that say which parts a run chose: parts of one budget may come from runs that chose differently.
SELECTION = ("budget", "budget.datasets", "budget.methods")


def part_name(dataset: str, method: str) -> str:
    return f"{dataset}-{method}"


def record_metrics(result: CellResult) -> dict[str, float]:
    """The flat metrics of one finished cell, as its MLflow child run holds them (raven.reproduce.runner.log_cell)."""
    if result.error or result.evaluation is None:
        return {}
    best = max(result.history, key=lambda row: row["val_elbo"])
    stages = {f"seconds_{k.removesuffix('_seconds')}": v for k, v in result.evaluation.timings.items()
              if isinstance(v, (int, float))}
    return {**result.evaluation.metrics(), "epochs_trained": len(result.history), "best_epoch": best["epoch"],
            "best_val_elbo": best["val_elbo"], "train_seconds": result.train_seconds,
            "eval_seconds": result.eval_seconds, **stages}


def parts_train_seconds(results: list[CellResult]) -> float:
    """The part's training time: the sum over the packs its seeds were trained in (one, unless a later
    session trained the seeds an earlier one had not finished), each pack's time that of its members."""
    packs: dict[tuple[str, ...], float] = {}
    for r in results:
        key = r.pack or (r.cell.name,)
        packs[key] = max(packs.get(key, 0.0), r.train_seconds)
    return sum(packs.values())


def part_record(results: list[CellResult], budget: Budget, hp: Hyperparameters, started: float,
                seconds: float) -> dict[str, Any]:
    """part.json's content: where and how the part ran, and each seed's numbers (no checkpoint)."""
    first = results[0]
    return {
        "format": PART_FORMAT,
        "dataset": first.cell.dataset,
        "method": first.cell.method,
        "budget": budget.params(),
        "budget_fields": dataclasses.asdict(budget),
        "budget_kind": budget.kind,
        "hyperparameters": {"sigma_aug": hp.sigma_aug, "eta": hp.eta, "source": hp.source},
        "commit": git_version(),
        "machine": machine_description(),  # the one that finished the part; each cell names its own
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "train_seconds": round(parts_train_seconds(results), 1),
        "cells": [{"name": r.cell.name, "seed": r.cell.seed, "config": r.config, "device": r.device,
                   "machine": r.node, "pack": list(r.pack),
                   "error": r.error, "history": r.history, "metrics": record_metrics(r),
                   "eval_seconds": round(r.eval_seconds, 1),
                   "evaluation": r.evaluation.to_json() if r.evaluation is not None else None}
                  for r in results],
    }


def same_budget(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two budgets' params (Budget.params) differ at most in which datasets and methods they ran; a
    field that one of them lacks (a part written before the field existed) counts at its default."""
    defaults = FULL_BUDGET.params()

    def strip(params: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in {**defaults, **params}.items() if k not in SELECTION}

    return strip(a) == strip(b)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # a part is either whole or absent


def run_parts(budget: Budget, hps: dict[str, Hyperparameters], root: str | os.PathLike, work_dir: str | os.PathLike,
              data_dir: str | os.PathLike | None, device: str = "auto", threads: int | None = None,
              log: Callable[[str], None] = print) -> tuple[list[str], list[str], list[str]]:
    """Run every (dataset, method) part of `budget` not yet in `root`, one after another, in this process.

    Returns (parts written, parts already there, parts with a failed seed). Checkpoints go to
    work_dir/<dataset>-<method>-s<seed>, where an interrupted part resumes its training.
    """
    root, work = Path(root), Path(work_dir).resolve()
    threads = threads or torch.get_num_threads()
    packs = group_cells(budget.cells())
    written: list[str] = []
    present: list[str] = []
    failed: list[str] = []
    for (dataset, method), _ in packs.items():
        path = root / part_name(dataset, method) / PART_NAME
        if path.is_file():
            held = json.loads(path.read_text()).get("budget")
            if not held or not same_budget(held, budget.params()):
                raise ConfigError(f"{path} was run with another budget ({held.get('budget') if held else '?'}); "
                                  "give another folder, or the same flags")
            present.append(part_name(dataset, method))
    todo = [key for key in packs if part_name(*key) not in present]
    log(f"raven reproduce (parts in {root}): {budget.describe()}")
    log(f"{len(packs)} parts (one per dataset and method): {len(present)} already done"
        + (f" ({', '.join(present)}), not rerun" if present else "") + f"; {len(todo)} to run, one at a time, "
        f"{threads} thread(s); checkpoints in {work}")
    walls: list[float] = []
    for index, (dataset, method) in enumerate(todo):
        group, name = packs[(dataset, method)], part_name(dataset, method)
        hp = hps[dataset]
        configs, evaluations = [train_config(c, budget, hp) for c in group], [eval_config(c, budget) for c in group]
        kept = sum(kept_seed(root / name / SEEDS_DIR / f"{c.name}.json", t, e) is not None
                   for c, t, e in zip(group, configs, evaluations))
        log(f"[part {index + 1}/{len(todo)}] {name}: {len(group)} seeds" + (
            f", {kept} kept whole from an earlier run, {len(group) - kept} to train as one pack" if kept
            else " as one pack") + f" (sigma_aug {hp.sigma_aug:g}, eta {hp.eta:g})")
        started, wall = time.time(), time.perf_counter()
        results = run_pack(group, configs, evaluations,
                           None if data_dir is None else str(data_dir), [str(work / c.name) for c in group],
                           threads, device, log=lambda line, name=name: log(f"  {name} {line}"),
                           keep_dirs=[str(root / name / SEEDS_DIR)] * len(group))
        seconds = time.perf_counter() - wall
        _write_json(root / name / PART_NAME, part_record(results, budget, hp, started, seconds))
        walls.append(seconds)
        written.append(name)
        if any(r.error for r in results):
            failed.append(name)
        left = len(todo) - index - 1
        eta = f"; ~{duration(left * sum(walls) / len(walls))} left ({left} parts)" if left else ""
        summary = ", ".join(f"s{r.cell.seed} " + (f"FAILED ({r.error})" if r.error else
                                                  f"{len(r.history)} epochs, clean acc {r.evaluation.clean_accuracy:.4f}")
                            for r in results)
        log(f"[part {index + 1}/{len(todo)}] {name} done in {duration(seconds)} (train {duration(results[0].train_seconds)}): "
            f"{summary}; wrote {root / name / PART_NAME}{eta}")
    return written, present, failed


# ----------------------------------------------------------------------------- reading parts


def _in_part_folders(folder: Path, name: str) -> list[Path]:
    """`name` in every folder a part may be: `folder` itself, or one or two levels down."""
    return sorted({*folder.glob(name), *folder.glob(f"*/{name}"), *folder.glob(f"*/*/{name}")})


def read_parts(folders: list[str | os.PathLike]) -> list[tuple[Path, dict[str, Any]]]:
    """Every part.json under `folders` (the folder itself or one or two levels down), with its path."""
    found: list[tuple[Path, dict[str, Any]]] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"no parts folder at {folder}")
        paths = _in_part_folders(folder, PART_NAME)
        if not paths:
            raise ConfigError(f"no {PART_NAME} under {folder}; run python sweeps/reproduce.py --parts {folder} first")
        for path in paths:
            data = json.loads(path.read_text())
            if data.get("format") != PART_FORMAT:
                raise ConfigError(f"{path} has part format {data.get('format')!r}; this raven reads {PART_FORMAT}")
            found.append((path, data))
    return found


def parts_under_way(folders: list[str | os.PathLike]) -> list[dict[str, Any]]:
    """What the parts not yet finished (a seeds/ folder, no part.json beside it) have kept so far, one row per seed:
    part, seed, and either its whole evaluation (seeds/<cell>.json) or the stages kept of it (<cell>.stages.json),
    each with the seconds it took. The report's tables leave these parts out until every seed is in."""
    rows: list[dict[str, Any]] = []
    for folder in map(Path, folders):
        for seeds in _in_part_folders(folder, SEEDS_DIR):
            if (seeds.parent / PART_NAME).is_file():
                continue
            cells: dict[str, dict[str, Any]] = {}
            for path in sorted(seeds.glob("*.json")):
                try:
                    held = json.loads(path.read_text())
                except ValueError:  # a file being replaced is read next time
                    continue
                staged = path.name.endswith(KeptStages.SUFFIX)
                cell = path.name.removesuffix(KeptStages.SUFFIX if staged else ".json")
                row = cells.setdefault(cell, {"part": seeds.parent.name, "cell": cell, "stages": {}, "evaluated": None})
                if staged:  # KeptStages writes each stage's seconds as it finishes, so in the order they ran
                    row["stages"] = {stage: float(seconds) for stage, seconds in held.get("seconds", {}).items()}
                else:
                    row["evaluated"] = float(held.get("seconds") or 0.0)
            rows.extend(cells.values())
    return rows


def under_way_markdown(rows: list[dict[str, Any]]) -> str:
    """parts_under_way's rows as a Markdown table (empty string when every part is finished)."""
    if not rows:
        return ""
    lines = ["| Part | Seed | Kept so far |", "|---|---|---|"]
    for row in rows:
        kept = (f"its whole evaluation ({duration(row['evaluated'])})" if row["evaluated"] is not None else
                ", ".join(f"{stage} ({duration(sec)})" for stage, sec in row["stages"].items()) or "nothing")
        seed = row["cell"].rsplit("-s", 1)[-1]
        lines.append(f"| {row['part']} | {seed} | {kept} |")
    return "\n".join(lines)


def parts_frames(folders: list[str | os.PathLike]) -> tuple[pd.Series, pd.DataFrame, list[dict[str, Any]]]:
    """(parent, runs, parts) in the columns raven.reproduce.report reads from MLflow: one row per finished seed,
    "metrics.*", "params.*" and "tags.raven.*" columns; parent holds the budget's and hyperparameters' params."""
    parts = read_parts(folders)
    first = parts[0][1]
    for path, data in parts[1:]:
        if not same_budget(first["budget"], data["budget"]):
            raise ConfigError(f"the parts ran with different budgets ({first['budget'].get('budget', '?')} in "
                              f"{parts[0][0]} | {data['budget'].get('budget', '?')} in {path}); merge parts of one budget")
    # The merged run's budget: the parts' own, over every dataset and method they hold.
    datasets = tuple(d for d in DATASETS if any(data["dataset"] == d for _, data in parts))
    methods = tuple(m for m in METHODS if any(data["method"] == m for _, data in parts))
    merged = Budget(**{**first["budget_fields"], "datasets": datasets, "methods": methods})
    seen: dict[str, Path] = {}
    rows = []
    for path, data in parts:
        # A part whose pack was resumed or loaded finished may hold only its last process's training time;
        # one trained in several packs (seeds a later session finished) holds their sum.
        packs: dict[tuple[str, ...], float] = {}
        for cell in data["cells"]:
            key = tuple(cell.get("pack") or ())  # a part written before packs were recorded: one pack
            packs[key] = max(packs.get(key, 0.0), float(cell["metrics"].get("train_seconds", 0.0)))
        trained = max(pack_train_seconds([cell["history"] or [] for cell in data["cells"]]), sum(packs.values()))
        for cell in data["cells"]:
            if cell["name"] in seen:
                raise ConfigError(f"{cell['name']} is in two parts: {seen[cell['name']]} and {path}")
            seen[cell["name"]] = path
            if cell.get("error"):
                continue
            row: dict[str, Any] = {"run_id": cell["name"], "status": "FINISHED", "tags.raven.dataset": data["dataset"],
                                   "tags.raven.method": data["method"], "tags.raven.seed": str(cell["seed"]),
                                   "dataset": data["dataset"], "method": data["method"], "seed": int(cell["seed"]),
                                   "part": str(path.parent)}
            row.update({f"metrics.{k}": v for k, v in cell["metrics"].items()})
            row["metrics.train_seconds"] = max(float(cell["metrics"].get("train_seconds", 0.0)), trained)
            row.update({f"params.{k}": str(v) for k, v in cell["config"].items()})
            # The evaluation's settings as its MLflow run holds them (the certified bound's name, ...).
            settings = {k: v for k, v in (cell["evaluation"] or {}).get("settings", {}).items()
                        if k not in ("train_config", "eval_config")}
            row.update({f"params.{k}": v for k, v in flatten("eval", settings).items()})
            rows.append(row)
    parent: dict[str, Any] = {"run_id": f"parts:{','.join(str(f) for f in folders)}",
                              "status": f"{len(parts)} parts", **{f"params.{k}": v for k, v in merged.params().items()}}
    for _, data in parts:
        hp = data["hyperparameters"]
        parent.update({f"params.sigma_aug.{data['dataset']}": str(hp["sigma_aug"]),
                       f"params.eta.{data['dataset']}": str(hp["eta"]),
                       f"params.hyperparameters.{data['dataset']}": hp["source"]})
    runs = pd.DataFrame(rows)
    if runs.empty:
        raise ConfigError(f"the parts under {', '.join(map(str, folders))} hold no finished seed")
    order = {name: i for i, name in enumerate(DATASETS + METHODS)}
    runs = runs.sort_values(["dataset", "method", "seed"], key=lambda s: s.map(order) if s.name != "seed" else s)
    return pd.Series(parent), runs.reset_index(drop=True), [data for _, data in parts]
