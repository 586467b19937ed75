"""The reproduction without Ray or MLflow: cells in a local process pool, results exported to a file.

For a machine that has torch but neither Ray nor MLflow (a lent GPU box). The export is a pickle
stream, a header {budget, hyperparameters} then one CellResult per cell, so whatever finished
survives an interruption; `raven.reproduce.import_results` (sweeps/reproduce.py --import) records
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
from raven.reproduce_grid import (CHECKPOINT_ARTIFACTS, Budget, Cell, CellResult, Hyperparameters, eval_config,
                                  default_hyperparameters, run_cell, train_config)


def export(budget: Budget, workers: int, data_dir: str | os.PathLike | None, work_dir: str | os.PathLike,
           device: str, path: str | os.PathLike, log: Callable[[str], None]) -> tuple[list[Cell], dict[Cell, str]]:
    """Run every cell of `budget` on `workers` local processes; append each result to `path` as it arrives."""
    hps = {d: default_hyperparameters(d, "offline export") for d in budget.datasets}
    log(f"raven reproduce (offline export): {budget.describe()}")
    cells, out_root = budget.cells(), Path(work_dir).resolve() / "offline"
    finished: list[Cell] = []
    failed: dict[Cell, str] = {}
    started = time.monotonic()
    # spawn: CUDA cannot be used in a forked child.
    with open(path, "wb") as sink, ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pickle.dump({"budget": budget, "hyperparameters": hps}, sink)
        futures = {pool.submit(run_cell, cell, train_config(cell, budget, hps[cell.dataset]), eval_config(cell, budget),
                               None if data_dir is None else str(data_dir), str(out_root / cell.name), 1, device): cell
                   for cell in cells}
        log(f"{len(cells)} cells on {workers} local processes, device {device}; results -> {path}")
        for future in as_completed(futures):
            cell = futures[future]
            try:
                result = future.result()
            except Exception as exc:  # noqa: BLE001 - a crashed cell is recorded and the rest go on
                result = CellResult(cell, train_config(cell, budget, hps[cell.dataset]).to_dict(),
                                    error=f"{type(exc).__name__}: {exc}")
            result.files = {k: v for k, v in result.files.items() if not k.startswith(CHECKPOINT_ARTIFACTS + "/")
                            or k.endswith("metrics.json")}
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
                    f"{result.evaluation.clean_accuracy:.4f} ({result.train_seconds:.0f}s train, "
                    f"{result.eval_seconds:.0f}s eval){left}")
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
