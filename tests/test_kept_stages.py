"""An evaluation stopped mid-way resumes at its first unfinished stage (raven.eval.results.KeptStages).

A seed's strong protocol with its convergence check can outlast a session; the stages it
finished (probe and paper protocol, strong, certified, FID) are kept beside its committable
record, so a later session that trains the pack again only runs the stages left, and
measures the same numbers as an evaluation that was never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import raven.eval.evaluate as evaluate
import raven.reproduce.grid as grid
from raven.eval.results import KeptStages
from raven.reproduce.grid import Budget, eval_config, paper_hyperparameters, run_pack, train_config

BUDGET = Budget(epochs=2, patience=1, limit=256, eval_limit=40, probe_limit=256, seeds=2, steps=2, fid=False,
                protocol="all", strong_steps=2, strong_restarts=1, square_queries=20, strong_limit=12, check_seeds=0,
                datasets=("mnist",), methods=("vae",))


class SessionEnded(Exception):
    pass


def run(base: Path, data_dir: Path, work: str, keep: str):
    cells = BUDGET.cells()
    hp = paper_hyperparameters("mnist", "test")
    return run_pack(cells, [train_config(c, BUDGET, hp) for c in cells], [eval_config(c, BUDGET) for c in cells],
                    str(data_dir), [str(base / work / c.name) for c in cells], threads=1, device="cpu",
                    keep_dirs=[str(base / keep)] * len(cells))


def test_kept_stages_hold_only_for_their_key(tmp_path):
    path = tmp_path / "cell.stages.json"
    kept = KeptStages(path, {"weights": "a", "eval_config": {"steps": 2}})
    kept.keep("strong", {"robust_accuracy": {"0.1": 0.25}}, 12.0)
    kept.keep("fid", {"value": 3.5, "note": "n", "seconds": 4.0}, 4.0)
    again = KeptStages(path, {"weights": "a", "eval_config": {"steps": 2}})
    assert again.get("strong") == {"robust_accuracy": {"0.1": 0.25}} and again.earlier_seconds == 16.0
    for other in ({"weights": "b", "eval_config": {"steps": 2}}, {"weights": "a", "eval_config": {"steps": 3}}):
        foreign = KeptStages(path, other)  # other weights or another config: nothing is reused
        assert foreign.get("strong") is None and foreign.earlier_seconds == 0.0
    path.write_text('{"key": {"weights": "a"')  # a partly written file is ignored, not an error
    assert KeptStages(path, {"weights": "a"}).get("strong") is None
    again.discard()
    assert not path.exists()


def test_a_stopped_evaluation_resumes_at_its_unfinished_stage_with_the_same_numbers(tmp_path, data_dir,
                                                                                      monkeypatch):
    reference = run(tmp_path, data_dir, "work-ref", "keep-ref")

    certified, strong = evaluate.certified_protocol, evaluate.strong_protocol

    def stop(*args, **kwargs):
        raise SessionEnded

    # The first session ends in seed 0's certified stage: the pack's paper stage and seed 0's strong stage are done.
    monkeypatch.setattr(evaluate, "certified_protocol", stop)
    with pytest.raises(SessionEnded):
        run(tmp_path, data_dir, "work-1", "keep")
    held = {p.name: json.loads(p.read_text()) for p in (tmp_path / "keep").glob("*.stages.json")}
    assert sorted(held) == ["mnist-vae-s0.stages.json", "mnist-vae-s1.stages.json"]
    assert sorted(held["mnist-vae-s0.stages.json"]["stages"]) == ["paper", "strong"]
    assert sorted(held["mnist-vae-s1.stages.json"]["stages"]) == ["paper"]
    assert not list((tmp_path / "keep").glob("mnist-vae-s?.json"))  # no seed's whole evaluation finished

    # The next session has lost the work folder: it trains again and runs only what is left.
    strong_seeds: list[int] = []

    def counted_strong(*args, seed, **kwargs):
        strong_seeds.append(seed)
        return strong(*args, seed=seed, **kwargs)

    monkeypatch.setattr(evaluate, "certified_protocol", certified)
    monkeypatch.setattr(evaluate, "strong_protocol", counted_strong)
    monkeypatch.setattr(evaluate, "paper_protocol", stop)
    monkeypatch.setattr(grid, "pack_probe_and_attack", stop)
    resumed = run(tmp_path, data_dir, "work-2", "keep")
    assert strong_seeds == [1]  # seed 0's strong stage was kept

    for a, b in zip(resumed, reference):
        assert {**a.evaluation.to_json(), "timings": None} == {**b.evaluation.to_json(), "timings": None}
        # The stages the first session ran count in the evaluation's time.
        assert a.eval_seconds > 0 and a.evaluation.timings["strong_seconds"] > 0
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["mnist-vae-s0.json", "mnist-vae-s1.json"]
