"""The reproduction without Ray or MLflow: packs in a local process pool, results exported to a file.

As on Ray, each (dataset, method) is one job that trains its seeds as one pack
(raven.reproduce.grid.run_pack) and evaluates each of them.

For a machine that has torch but neither Ray nor MLflow (a lent GPU box). The export is a pickle
stream, a header {budget, hyperparameters} then one CellResult per cell, so whatever finished
survives an interruption; `raven.reproduce.runner.import_results` (sweeps/reproduce.py --import) records
it in MLflow elsewhere. Checkpoints stay on the machine that trained (they are not exported).
The paper's sigma_aug and eta are used: no tracking store here to look the sweeps up in.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

from raven.progress import duration
from raven.reproduce.grid import (
    CHECKPOINT_ARTIFACTS,
    Budget,
    Cell,
    CellResult,
    Hyperparameters,
    default_hyperparameters,
    eval_config,
    group_cells,
    run_pack,
    train_config,
)


def export(budget: Budget, workers: int, data_dir: str | os.PathLike | None, work_dir: str | os.PathLike,
           device: str, path: str | os.PathLike, log: Callable[[str], None]) -> tuple[list[Cell], dict[Cell, str]]:
    """Run every (dataset, method) of `budget` as one pack on `workers` local processes; append each cell's
    result to `path` as its pack finishes."""
    hps = {d: default_hyperparameters(d, "offline export") for d in budget.datasets}
    log(f"raven reproduce (offline export): {budget.describe()}")
    cells, out_root = budget.cells(), Path(work_dir).resolve() / "offline"
    packs = group_cells(cells)
    finished: list[Cell] = []
    failed: dict[Cell, str] = {}
    started = time.monotonic()
    # spawn: CUDA cannot be used in a forked child.
    with open(path, "wb") as sink, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pickle.dump({"budget": budget, "hyperparameters": hps}, sink)
        futures = {pool.submit(run_pack, group, [train_config(c, budget, hps[c.dataset]) for c in group],
                               [eval_config(c, budget) for c in group], None if data_dir is None else str(data_dir),
                               [str(out_root / c.name) for c in group], 1, device): key
                   for key, group in packs.items()}
        log(f"{len(cells)} cells in {len(packs)} packs (one per dataset and method) on {workers} local processes, "
            f"device {device}; results -> {path}")
        for future in as_completed(futures):
            group = packs[futures[future]]
            try:
                results = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed pack is recorded and the rest go on
                results = [CellResult(c, train_config(c, budget, hps[c.dataset]).to_dict(), pack_size=len(group),
                                      error=f"{type(exc).__name__}: {exc}") for c in group]
            for result in results:
                cell = result.cell
                result.files = {k: v for k, v in result.files.items()
                                if not k.startswith(CHECKPOINT_ARTIFACTS + "/") or k.endswith("metrics.json")}
                pickle.dump(result, sink)
                sink.flush()
                if result.error:
                    failed[cell] = result.error
                else:
                    finished.append(cell)
                done = len(finished) + len(failed)
                left = f"; ~{duration((time.monotonic() - started) / done * (len(cells) - done))} left" \
                    if done < len(cells) else ""
                if result.error:
                    log(f"[{done}/{len(cells)}] {cell.name} FAILED: {result.error}{left}")
                else:
                    log(f"[{done}/{len(cells)}] {cell.name}: {len(result.history)} epochs, clean accuracy "
                        f"{result.evaluation.clean_accuracy:.4f} ({result.train_seconds:.0f}s train for the pack "
                        f"of {len(group)}, {result.eval_seconds:.0f}s eval){left}")
    return finished, failed


def read_export(path: str | os.PathLike) -> tuple[Budget, dict[str, Hyperparameters], list[CellResult]]:
    """The header and every complete CellResult of an export (a truncated last record is dropped)."""
    results = []
    with open(path, "rb") as source:
        header = pickle.load(source)
        while True:
            try:
                results.append(pickle.load(source))
            except (EOFError, pickle.UnpicklingError):
                break
    return header["budget"], header["hyperparameters"], results
