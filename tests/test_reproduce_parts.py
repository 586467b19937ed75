"""A reproduction in parts (sweeps/reproduce.py --parts, raven.reproduce.parts): parts written as they finish,
never rerun, merged from several folders by `raven report --parts`, with the numbers the runs measured."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raven.config import ConfigError
from raven.eval.results import KeptStages
from raven.reproduce.grid import Budget, pack_train_seconds
from raven.reproduce.parts import PART_NAME, parts_frames, parts_under_way
from raven.reproduce.report import write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small enough for seconds per part; the paper protocol only (the strong one has its own tests).
TINY = ["--epochs", "2", "--patience", "1", "--limit", "256", "--eval-limit", "40", "--probe-limit", "256",
        "--seeds", "2", "--steps", "2", "--no-fid", "--protocol", "paper", "--datasets", "mnist",
        "--paper-values", "--threads", "1"]


def reproduce(args: list[str], cwd: Path, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAVEN_DATA_DIR": str(data_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "sweeps" / "reproduce.py"), *TINY, *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory, data_dir):
    """VAE parts in one folder, RAVEN parts in another (as two machines or two days would write them)."""
    base = tmp_path_factory.mktemp("parts")
    first = reproduce(["--methods", "vae", "--parts", str(base / "a"), "--work-dir", str(base / "work")], base, data_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = reproduce(["--methods", "raven", "--parts", str(base / "b"), "--work-dir", str(base / "work")], base,
                       data_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    return base, first, second


def test_each_part_is_written_with_every_seed_and_no_checkpoint(two_folders):
    base, first, _ = two_folders
    part = base / "a" / "mnist-vae"
    assert sorted(p.name for p in part.iterdir()) == [PART_NAME, "seeds"]
    assert sorted(p.name for p in (part / "seeds").iterdir()) == ["mnist-vae-s0.json", "mnist-vae-s1.json"]
    data = json.loads((part / PART_NAME).read_text())
    assert [c["name"] for c in data["cells"]] == ["mnist-vae-s0", "mnist-vae-s1"]
    for cell in data["cells"]:
        assert cell["error"] is None and len(cell["history"]) == cell["metrics"]["epochs_trained"] <= 2
        # The record's numbers are the evaluation's own.
        assert cell["metrics"]["clean_accuracy"] == cell["evaluation"]["clean_accuracy"]
        assert cell["metrics"]["adv_acc_kl_delta_0.1"] == cell["evaluation"]["adversarial_accuracy"]["kl"]["0.1"]
        # The checkpoint stays in the work folder, where an interrupted part resumes.
        assert (base / "work" / cell["name"] / "checkpoint.pt").is_file()
    assert data["budget"]["budget.methods"] == "vae" and data["hyperparameters"]["sigma_aug"] > 0
    assert "[part 1/1] mnist-vae done" in first.stderr


def test_a_part_already_done_is_not_rerun(two_folders, data_dir):
    base, _, _ = two_folders
    path = base / "a" / "mnist-vae" / PART_NAME
    before = path.stat().st_mtime_ns
    again = reproduce(["--methods", "vae", "--parts", str(base / "a"), "--work-dir", str(base / "work")], base, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "1 already done (mnist-vae), not rerun; 0 to run" in again.stderr
    assert "0 parts written, 1 already there" in again.stdout
    assert path.stat().st_mtime_ns == before


def test_a_part_of_another_budget_is_refused_in_one_line(two_folders, data_dir):
    base, _, _ = two_folders
    other = reproduce(["--methods", "vae", "--parts", str(base / "a"), "--work-dir", str(base / "work2"),
                       "--strong-limit", "7"], base, data_dir)
    assert other.returncode == 2 and "was run with another budget" in other.stderr
    assert "Traceback" not in other.stderr


def test_report_merges_parts_from_two_folders(two_folders):
    base, _, _ = two_folders
    out = base / "report"
    proc = subprocess.run([sys.executable, "-m", "raven.cli", "report", "--parts", str(base / "a"), str(base / "b"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert sorted(r["run_id"] for r in runs) == ["mnist-raven-s0", "mnist-raven-s1", "mnist-vae-s0", "mnist-vae-s1"]
    for row in runs:
        method = row["run_id"].split("-")[1]
        part = json.loads((base / ("a" if method == "vae" else "b") / f"mnist-{method}" / PART_NAME).read_text())
        cell = next(c for c in part["cells"] if c["name"] == row["run_id"])
        assert float(row["clean_accuracy"]) == pytest.approx(cell["evaluation"]["clean_accuracy"])
        assert float(row["epochs_trained"]) == len(cell["history"])
    report = (out / "report.md").read_text()
    assert "4 of 4 runs" in report and "Reproduction in parts" in report and "## Epochs and wall time" in report
    assert (out / "figure2.png").is_file() and not (out / "figure1.png").exists()


def test_a_pack_trained_over_several_processes_counts_every_epoch_s_time(two_folders, tmp_path):
    """A process that loads a finished pack (or resumes one) measures seconds of training: the report takes the
    epochs' own measured seconds, summed over the longest-trained seed's history (every pack epoch is in it)."""
    base, _, _ = two_folders
    data = json.loads((base / "a" / "mnist-vae" / PART_NAME).read_text())
    for cell, seconds in zip(data["cells"], ([50.0, 60.0, 70.0], [50.0, 60.0])):
        cell["metrics"]["train_seconds"] = 0.2  # as a part whose pack a later session loaded finished holds it
        cell["history"] = [{**row, "epoch_seconds": s} for row, s in zip(cell["history"] * 3, seconds)]
    loaded = tmp_path / "loaded" / "mnist-vae"
    loaded.mkdir(parents=True)
    (loaded / PART_NAME).write_text(json.dumps(data))
    _, runs, _ = parts_frames([tmp_path / "loaded"])
    assert list(runs["metrics.train_seconds"]) == [180.0, 180.0]
    # A pack trained in one process keeps that process's wall time, which its epochs' seconds do not exceed.
    written = json.loads((base / "a" / "mnist-vae" / PART_NAME).read_text())
    _, runs, _ = parts_frames([base / "a"])
    assert list(runs["metrics.train_seconds"]) == [c["metrics"]["train_seconds"] for c in written["cells"]]
    assert pack_train_seconds([c["history"] for c in written["cells"]]) <= written["train_seconds"] + 0.1


def test_parts_that_hold_one_cell_twice_or_differ_in_budget_are_refused(two_folders, tmp_path):
    base, _, _ = two_folders
    with pytest.raises(ConfigError, match="mnist-vae-s0 is in two parts"):
        parts_frames([base / "a", base / "a"])
    changed = tmp_path / "c" / "mnist-vae"
    changed.mkdir(parents=True)
    data = json.loads((base / "a" / "mnist-vae" / PART_NAME).read_text())
    data["budget"]["budget.epochs"] = "3"
    (changed / PART_NAME).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="different budgets"):
        parts_frames([base / "b", tmp_path / "c"])


def test_strong_limit_and_check_seeds_reach_the_evaluation():
    from raven.reproduce.grid import Cell, eval_config

    budget = Budget(strong_limit=300, check_seeds=1)
    assert [eval_config(Cell("mnist", "vae", s), budget).strong.convergence for s in range(3)] == [True, False, False]
    assert eval_config(Cell("mnist", "vae", 0), budget).strong_limit == 300
    assert "strong protocol on 300 test images (full: 1,000)" in budget.describe()
    with pytest.raises(ConfigError, match="strong_limit must be an integer >= 1"):
        Budget(strong_limit=0)


def test_a_part_stopped_after_its_seeds_were_evaluated_does_not_evaluate_them_again(two_folders, data_dir):
    base, _, _ = two_folders
    path = base / "b" / "mnist-raven" / PART_NAME
    before = json.loads(path.read_text())
    path.unlink()  # as if the session ended between the last evaluation and the part's file
    again = reproduce(["--methods", "raven", "--parts", str(base / "b"), "--work-dir", str(base / "work")], base,
                      data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    for seed in (0, 1):
        record = base / "b" / "mnist-raven" / "seeds" / f"mnist-raven-s{seed}.json"
        assert f"mnist-raven-s{seed}: its whole evaluation is kept in {record}" in again.stderr
    after = json.loads(path.read_text())
    assert [c["evaluation"] for c in after["cells"]] == [c["evaluation"] for c in before["cells"]]


def _without_timings(part):  # the same training, epoch by epoch (its timings aside)
    return [[{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
             for row in c["history"]] for c in part["cells"]]


def _vae_part_without_its_file(base: Path, tmp_path: Path) -> tuple[Path, dict, Path]:
    """A copy of the VAE part as a session's end leaves it (seed records, no part.json): (part.json's path, the
    part as it was, the seeds folder)."""
    shutil.copytree(base / "a", tmp_path / "a")
    path = tmp_path / "a" / "mnist-vae" / PART_NAME
    before = json.loads(path.read_text())
    path.unlink()
    return path, before, tmp_path / "a" / "mnist-vae" / "seeds"


def test_a_later_session_on_another_machine_trains_only_the_seeds_not_kept(two_folders, data_dir, tmp_path):
    """A session's end loses the work folder, not the committed seed records, and the next session may run on another
    CPU, whose retrained weights differ in their last bits. A seed whose record holds its training and evaluation
    config is done whatever the weights' digest: it is neither trained nor evaluated again, and the seeds without a
    record train as a pack of their own. The part names each seed's pack and sums the packs' training times."""
    path, before, seeds = _vae_part_without_its_file(two_folders[0], tmp_path)
    kept = json.loads((seeds / "mnist-vae-s0.json").read_text())
    assert kept["train_config"]["seed"] == 0 and kept["pack"] == ["mnist-vae-s0", "mnist-vae-s1"]
    (seeds / "mnist-vae-s0.json").write_text(json.dumps({**kept, "weights": "0" * 64, "machine": "elsewhere"}))
    (seeds / "mnist-vae-s1.json").unlink()  # seed 1 was not finished
    again = reproduce(["--methods", "vae", "--parts", str(tmp_path / "a"), "--work-dir", str(tmp_path / "work")],
                      tmp_path, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "mnist-vae: 2 seeds, 1 kept whole from an earlier run, 1 to train as one pack" in again.stderr
    assert f"mnist-vae-s0: its whole evaluation is kept in {seeds / 'mnist-vae-s0.json'}" in again.stderr
    assert not (tmp_path / "work" / "mnist-vae-s0").exists()  # not trained
    assert (tmp_path / "work" / "mnist-vae-s1" / "checkpoint.pt").is_file()
    after = json.loads(path.read_text())
    assert after["cells"][0]["evaluation"] == before["cells"][0]["evaluation"]
    assert after["cells"][0]["history"] == before["cells"][0]["history"]
    assert after["cells"][0]["machine"] == "elsewhere" and after["cells"][1]["pack"] == ["mnist-vae-s1"]
    # Seed 1 alone trains as it did in the pack of two: its own generator, its own batches.
    alone, in_pack = _without_timings(after)[1], _without_timings(before)[1]
    assert len(alone) == len(in_pack)
    for epoch_alone, epoch_in_pack in zip(alone, in_pack):  # approx compares flat dicts, not lists of them
        assert epoch_alone == pytest.approx(epoch_in_pack, rel=1e-4)
    own = json.loads((seeds / "mnist-vae-s1.json").read_text())
    assert after["train_seconds"] == pytest.approx(kept["train_seconds"] + own["train_seconds"], abs=0.2)


def test_a_record_without_its_training_config_is_taken_only_for_the_same_weights(two_folders, data_dir, tmp_path):
    """Records written before they held their training config, or under another one, do not make a seed done:
    the seed trains again, and its evaluation is taken only where the weights' digest matches; a record under
    another training config is evaluated again."""
    path, before, seeds = _vae_part_without_its_file(two_folders[0], tmp_path)
    old = json.loads((seeds / "mnist-vae-s0.json").read_text())
    del old["train_config"]  # as a record of the first sessions was written
    (seeds / "mnist-vae-s0.json").write_text(json.dumps(old))
    other = json.loads((seeds / "mnist-vae-s1.json").read_text())
    other["train_config"]["lr"] = 0.5
    other["weights"] = "0" * 64
    (seeds / "mnist-vae-s1.json").write_text(json.dumps(other))
    again = reproduce(["--methods", "vae", "--parts", str(tmp_path / "a"), "--work-dir", str(tmp_path / "work")],
                      tmp_path, data_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "whole evaluation is kept" not in again.stderr
    assert f"mnist-vae-s0: its evaluation of these weights is in {seeds}" in again.stderr  # same digest
    assert "mnist-vae-s1: its evaluation of these weights" not in again.stderr  # evaluated again
    after = json.loads(path.read_text())
    assert _without_timings(after) == _without_timings(before)  # both trained again, as one pack, as before
    assert after["cells"][0]["evaluation"] == before["cells"][0]["evaluation"]
    assert {**after["cells"][1]["evaluation"], "timings": None} == {**before["cells"][1]["evaluation"], "timings": None}
    assert json.loads((seeds / "mnist-vae-s1.json").read_text())["train_config"]["lr"] == 0.001  # rewritten


def test_the_report_brackets_robust_accuracy_between_certified_and_strong():
    """bracket_table: certified (lower) and strong (upper) per delta, from the runs' metrics, and the gap."""
    import pandas as pd

    from raven.reproduce.report import bracket_markdown, bracket_table, curve_summary, robust_reading_summary

    runs = pd.DataFrame([
        {"dataset": "mnist", "method": "vae", "seed": s, "metrics.certified_acc_delta_0.01": c,
         "metrics.robust_acc_delta_0.01": r} for s, c, r in ((0, 0.50, 0.60), (1, 0.54, 0.56))])
    points = pd.DataFrame([{"dataset": "mnist", "method": "vae", "seed": s, "attack": "strong", "delta": 0.01,
                            "accuracy": r} for s, r in ((0, 0.60), (1, 0.56))])
    table = bracket_table(curve_summary(points), robust_reading_summary(runs))
    row = table.iloc[0]
    assert (row.certified_pct, row.strong_pct) == pytest.approx((52.0, 58.0))
    assert row.gap_points == pytest.approx(6.0)
    assert "[52.0, 58.0]" in bracket_markdown(table, "crown-fp32") and "**[" not in bracket_markdown(table, "x")


def test_the_report_lists_what_unfinished_parts_have_kept(two_folders, tmp_path):
    """A part still running (seeds/ but no part.json) is left out of the tables and listed with what each seed kept:
    a whole evaluation, or the stages KeptStages wrote so far, with their times."""
    base, _, _ = two_folders
    shutil.copytree(base / "a", tmp_path / "parts")
    seeds = tmp_path / "parts" / "mnist-raven" / "seeds"
    seeds.mkdir(parents=True)
    whole = json.loads((base / "b" / "mnist-raven" / "seeds" / "mnist-raven-s0.json").read_text())
    (seeds / "mnist-raven-s0.json").write_text(json.dumps({**whole, "seconds": 5400.0}))
    kept = KeptStages(seeds / "mnist-raven-s1.stages.json", {"weights": "abc"})
    kept.keep("paper", {"clean": 0.9}, 150.0)
    kept.keep("strong", {"robust": 0.5}, 1260.0)
    assert [(r["part"], r["cell"]) for r in parts_under_way([tmp_path / "parts"])] == [
        ("mnist-raven", "mnist-raven-s0"), ("mnist-raven", "mnist-raven-s1")]
    report = write_report(tmp_path / "report", parts=[tmp_path / "parts"]).read_text()
    assert "2 of 2 runs" in report  # the unfinished part is not in the tables
    assert "| mnist-raven | 0 | its whole evaluation (1.5 h) |" in report
    assert "| mnist-raven | 1 | paper (2 min), strong (21 min) |" in report
    assert "| mnist-vae |" not in report.split("## Parts under way")[1]
    # Once every part is finished, the section is gone.
    shutil.rmtree(tmp_path / "parts" / "mnist-raven")
    assert "Parts under way" not in write_report(tmp_path / "report", parts=[tmp_path / "parts"]).read_text()
