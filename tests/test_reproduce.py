"""`sweeps/reproduce.py --smoke` end to end on a local Ray, its MLflow record, --resume, and the budget.

The smoke store (a sigma_aug smoke sweep, then the smoke reproduction, in one temporary
folder) is made once per test session and shared with tests/test_report.py and
tests/test_notebooks.py through `smoke_store` (cached on disk, so each module's copy of the
fixture finds the first one's store).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from raven import load_checkpoint
from raven.config import DATASETS, ConfigError
from raven.methods import PAPER_METHODS as METHODS  # the reproduction's methods
from raven.eval.protocols import StrongConfig
from raven.reproduce.grid import Cell, default_hyperparameters, eval_config, group_cells, run_pack, train_config
from raven.reproduce.runner import FULL_BUDGET, SMOKE_BUDGET, Budget

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_TIMEOUT = 900


@dataclass(frozen=True)
class SmokeStore:
    cwd: Path
    tracking_uri: str
    data_dir: Path
    stdout: str
    stderr: str
    seconds: dict[str, float]

    def env(self) -> dict[str, str]:
        return {**os.environ, "RAVEN_DATA_DIR": str(self.data_dir), "MLFLOW_TRACKING_URI": self.tracking_uri}


def run_script(args: list[str], cwd: Path, env: dict[str, str], timeout: float = SMOKE_TIMEOUT
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def make_smoke_store(base: Path, data_dir: Path) -> SmokeStore:
    """Run the sigma_aug smoke sweep and the smoke reproduction into base/ once per session."""
    marker = base / "smoke.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        return SmokeStore(base, saved["tracking_uri"], data_dir, saved["stdout"], saved["stderr"], saved["seconds"])
    base.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{base / 'mlflow.db'}"
    env = {**os.environ, "RAVEN_DATA_DIR": str(data_dir)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    seconds = {}
    started = time.perf_counter()
    sweep = run_script([str(REPO_ROOT / "sweeps" / "sigma_aug.py"), "--smoke", "--tracking-uri", tracking_uri],
                       base, env)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    seconds["sigma_aug_smoke"] = time.perf_counter() - started
    started = time.perf_counter()
    proc = run_script([str(REPO_ROOT / "sweeps" / "reproduce.py"), "--smoke", "--tracking-uri", tracking_uri],
                      base, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    seconds["reproduce_smoke"] = time.perf_counter() - started
    marker.write_text(json.dumps({"tracking_uri": tracking_uri, "stdout": proc.stdout, "stderr": proc.stderr,
                                  "seconds": seconds}))
    return SmokeStore(base, tracking_uri, data_dir, proc.stdout, proc.stderr, seconds)


@pytest.fixture(scope="session")
def smoke_store(tmp_path_factory, data_dir) -> SmokeStore:
    return make_smoke_store(tmp_path_factory.getbasetemp() / "raven-smoke-store", data_dir)


def _client(store: SmokeStore):
    from mlflow import MlflowClient

    return MlflowClient(store.tracking_uri)


def _children(client, parent_id: str) -> list:
    experiment = client.get_experiment_by_name("raven-reproduction")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)


def _parent(client):
    experiment = client.get_experiment_by_name("raven-reproduction")
    return client.search_runs([experiment.experiment_id], filter_string="tags.`raven.role` = 'reproduction'",
                              order_by=["attributes.start_time DESC"])[0]


# ----------------------------------------------------------------------------- the budget (no Ray)


def test_full_budget_is_the_paper_protocol_and_says_so():
    assert FULL_BUDGET.full and FULL_BUDGET.kind == "full"
    assert (FULL_BUDGET.seeds, FULL_BUDGET.steps, FULL_BUDGET.fid) == (5, 50, True)
    # Every protocol, the strong one at its own defaults (AutoAttack's standard budget) on 1,000 images.
    strong = eval_config(Cell("mnist", "vae", 0), FULL_BUDGET)
    assert strong.protocol == "all" and strong.strong == StrongConfig() and strong.strong_limit == 1000
    assert FULL_BUDGET.datasets == DATASETS and FULL_BUDGET.methods == METHODS
    assert FULL_BUDGET.describe().startswith("full budget")
    assert len(FULL_BUDGET.cells()) == 2 * 5 * 5


def test_reduced_budget_names_every_reduction():
    text = SMOKE_BUDGET.describe()
    assert SMOKE_BUDGET.kind == "smoke" and not SMOKE_BUDGET.full
    for part in ("REDUCED", "--smoke", "2 epochs", "5,000 of 55,000 training images", "300 of 10,000 test images",
                 "2 of the paper's 5 seeds", "10-step PGD", "no FID", "strong protocol at 5 steps x 1 restart(s)",
                 "strong protocol on 100 test images (full: 1,000)"):
        assert part in text, part
    partial = FULL_BUDGET.replace(seeds=3, methods=("vae", "raven"))
    assert partial.kind == "reduced"
    assert "3 of the paper's 5 seeds" in partial.describe() and "methods vae, raven" in partial.describe()
    assert partial.params()["budget"] == partial.describe() and partial.params()["budget.methods"] == "vae,raven"


def test_fewer_seeds_or_cells_at_the_full_budget_per_model_are_not_called_reduced():
    # Issue 19's run: 3 seeds, each model trained and evaluated at the full budget, parts of the grid.
    for budget in (FULL_BUDGET.replace(seeds=3), FULL_BUDGET.replace(seeds=3, methods=("vae",))):
        assert budget.per_model_full and not budget.full
        assert budget.describe().startswith("full budget for each model; 3 of the paper's 5 seeds")
        assert "REDUCED" not in budget.describe()
    # Anything scaled down inside a model, or a single seed (no std over seeds), is reduced.
    for budget in (FULL_BUDGET.replace(seeds=3, epochs=20), FULL_BUDGET.replace(strong_limit=100),
                   FULL_BUDGET.replace(seeds=1), FULL_BUDGET.replace(precision="bf16"), SMOKE_BUDGET):
        assert not budget.per_model_full and budget.describe().startswith("REDUCED")


@pytest.mark.parametrize("change, message", [
    ({"seeds": 0}, "seeds must be an integer >= 1"),
    ({"datasets": ("cifar10",)}, "unknown dataset 'cifar10'"),
    ({"methods": ("vae", "vae")}, "methods must not repeat"),
    ({"eval_limit": -5}, "eval_limit must be an integer >= 1"),
    ({"protocol": "strongest"}, "protocol must be one of paper, strong, both"),
    ({"strong_limit": 0}, "strong_limit must be an integer >= 1"),
    ({"check_seeds": -1}, "check_seeds must be an integer >= 0"),
    ({"strong_steps": 0}, "strong_steps must be an integer >= 1"),
])
def test_bad_budget_is_rejected_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        Budget(**change)


def test_bad_flag_fails_before_any_work(tmp_path):
    proc = run_script([str(REPO_ROOT / "sweeps" / "reproduce.py"), "--smoke", "--datasets", "cifar10",
                       "--tracking-uri", f"sqlite:///{tmp_path / 'never.db'}"], tmp_path, dict(os.environ), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "reproduce: error: unknown dataset 'cifar10'; choose from mnist, fashion-mnist"
    assert "Traceback" not in proc.stderr


def test_the_grid_is_one_pack_per_dataset_and_method():
    packs = group_cells(list(reversed(FULL_BUDGET.cells())))
    assert sorted(packs) == sorted((d, m) for d in DATASETS for m in METHODS)
    assert all([c.seed for c in group] == [0, 1, 2, 3, 4] and {(c.dataset, c.method) for c in group} == {key}
               for key, group in packs.items())


def test_a_pack_task_gives_each_seed_its_solo_model_checkpoint_and_evaluation(tmp_path, data_dir):
    """run_pack on 2 seeds: each seed's checkpoint in its cell's folder is its solo train() run (1e-5), loads
    with raven.load_checkpoint, and its evaluation is evaluate_model's of that checkpoint."""
    import torch

    from raven.data import load_splits
    from raven.eval.evaluate import evaluate_model
    from raven.train import train

    budget = Budget(epochs=1, patience=None, limit=256, eval_limit=40, probe_limit=256, seeds=2, steps=2, fid=False,
                    datasets=("mnist",), methods=("raven",))
    cells = budget.cells()
    hp = default_hyperparameters("mnist", "test")
    configs = [train_config(c, budget, hp) for c in cells]
    evaluations = [replace(eval_config(c, budget), tsne=False) for c in cells]
    results = run_pack(cells, configs, evaluations, str(data_dir), [str(tmp_path / c.name) for c in cells])
    splits = load_splits("mnist", data_dir, "cpu")
    for cell, config, evaluation, result in zip(cells, configs, evaluations, results):
        assert result.cell == cell and result.error is None and result.pack_size == 2
        folder = tmp_path / cell.name
        model = load_checkpoint(folder)
        assert result.files["checkpoint/checkpoint.pt"] == (folder / "checkpoint.pt").read_bytes()
        solo = train(config, splits=splits, device="cpu", progress=False)
        for name, value in solo.model.state_dict().items():
            assert torch.allclose(value, model.state_dict()[name], atol=1e-5, rtol=0), (cell, name)
        assert [h["val_elbo"] for h in result.history] == pytest.approx([h["val_elbo"] for h in solo.history])
        again = evaluate_model(model, splits, evaluation)
        assert result.evaluation.clean_accuracy == again.clean_accuracy
        assert result.evaluation.mse == pytest.approx(again.mse, rel=1e-6)
        assert result.evaluation.metrics() == pytest.approx(again.metrics(), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- the smoke reproduction


def test_smoke_reproduction_records_every_run_in_mlflow(smoke_store):
    client = _client(smoke_store)
    parent = _parent(client)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raven.budget"] == "smoke"
    assert parent.data.params["budget"] == SMOKE_BUDGET.describe()
    assert parent.data.params["budget.seeds"] == "2" and parent.data.tags["raven.failed_runs"] == "0"
    # MNIST's sigma_aug comes from the smoke sweep; nothing was swept for the rest: raven's defaults, loudly.
    assert parent.data.params["hyperparameters.mnist"].startswith("sigma_aug: smoke sweep sigma-aug-mnist-")
    assert "eta: raven defaults: sigma_aug of the paper, eta tuned on validation (no sweep found)" in \
        parent.data.params["hyperparameters.mnist"]
    assert float(parent.data.params["sigma_aug.fashion-mnist"]) == 0.04
    assert "WARNING: no finished sigma_aug sweep for fashion-mnist" in smoke_store.stderr
    assert "REDUCED budget (--smoke)" in smoke_store.stdout
    assert "10 Ray tasks submitted, one per (dataset, method)" in smoke_store.stderr  # the 2 seeds of each: a pack

    assert client.get_experiment_by_name("raven-reproduction").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    children = _children(client, parent.info.run_id)
    cells = {(r.data.tags["raven.dataset"], r.data.tags["raven.method"], r.data.tags["raven.seed"]) for r in children}
    assert cells == {(d, m, str(s)) for d in DATASETS for m in METHODS for s in range(2)}
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["raven.complete"] == "true"
        assert run.data.tags["raven.role"] == "reproduction-run" and run.data.tags["raven.budget"] == "smoke"
        assert run.data.params["budget"] == SMOKE_BUDGET.describe()
        assert run.data.params["method"] == run.data.tags["raven.method"] and run.data.params["limit"] == "5000"
        assert run.data.params["pack_size"] == "2"
        # Every seed's ordinary checkpoint, as `raven evaluate` reads it, in its cell's work folder.
        folder = smoke_store.cwd / "runs" / "reproduce" / parent.info.run_id / run.info.run_name
        assert load_checkpoint(folder).config.seed == int(run.data.tags["raven.seed"])
        metrics = run.data.metrics
        assert 0.0 <= metrics["clean_accuracy"] <= 1.0 and 0.0 < metrics["mse_255"] < 255.0**2
        assert {"adv_acc_kl_delta_0.1", "adv_acc_w2_delta_0.3", "latent_pair_distance_mean"} <= set(metrics)
        # The strong protocol beside the paper's: no image it counts at delta 0.1 is wrong when clean.
        assert 0.0 <= metrics["robust_acc_delta_0.1"] <= metrics["clean_accuracy"]
        assert "fid" not in metrics  # the smoke budget has no FID
        dataset = run.data.tags["raven.dataset"]
        inputs = {d.dataset.name: json.loads(d.dataset.profile)["images"] for d in run.inputs.dataset_inputs}
        assert inputs == {f"{dataset}-train": 5000, f"{dataset}-validation": 5000, f"{dataset}-test": 300}
    vae = next(r for r in children if r.info.run_name == "mnist-vae-s0")
    assert [m.step for m in client.get_metric_history(vae.info.run_id, "val_elbo")] == [1, 2]
    assert [m.step for m in client.get_metric_history(vae.info.run_id, "adv_acc_kl")][-1] == 300
    artifacts = {a.path for folder in ("robustness", "checkpoint")
                 for a in client.list_artifacts(vae.info.run_id, folder)}
    assert {"robustness/robustness.json", "robustness/tsne.png", "robustness/reconstructions.png",
            "checkpoint/checkpoint.pt", "checkpoint/metrics.json"} <= artifacts


def test_resume_reruns_only_what_the_store_lacks(smoke_store, tmp_path):
    # A copy of the store with one run marked incomplete (as when the driver died while logging it).
    shutil.copy(smoke_store.cwd / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _client(SmokeStore(tmp_path, uri, smoke_store.data_dir, "", "", {}))
    parent = _parent(client)
    broken = next(r for r in _children(client, parent.info.run_id) if r.info.run_name == "mnist-raven-s1")
    client.set_tag(broken.info.run_id, "raven.complete", "false")
    env = {**smoke_store.env(), "MLFLOW_TRACKING_URI": uri}
    script = str(REPO_ROOT / "sweeps" / "reproduce.py")

    other = run_script([script, "--smoke", "--seeds", "1", "--resume"], smoke_store.cwd, env, timeout=120)
    assert other.returncode == 2 and "ran with another budget" in other.stderr

    # Same folder as the smoke run: its checkpoint is found and training resumes past its last epoch.
    proc = run_script([script, "--smoke", "--resume"], smoke_store.cwd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming: 19 of 20 runs already recorded" in proc.stderr
    assert "1 Ray task submitted" in proc.stderr and "[1/1] mnist-raven-s1" in proc.stderr
    children = _children(client, parent.info.run_id)
    assert len(children) == 20 and all(r.data.tags.get("raven.complete") == "true" for r in children)
    assert broken.info.run_id not in {r.info.run_id for r in children}
    again = run_script([script, "--smoke", "--resume"], smoke_store.cwd, env, timeout=120)
    assert again.returncode == 0 and "resuming: 20 of 20" in again.stderr and "Ray task" not in again.stderr


def _reproduce_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_script", REPO_ROOT / "sweeps" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_flags_are_the_budget_fields():
    """sweeps/reproduce.py's budget flags come from Budget's fields: no flag gives the full budget, --smoke the
    smoke one, and a flag for every field sets exactly that field (--no-fid, --no-early-stopping included)."""
    script = _reproduce_script()
    budget = lambda *argv: script.budget_from_args(script.parse_args(list(argv)))  # noqa: E731
    assert budget() == FULL_BUDGET and budget("--smoke") == SMOKE_BUDGET
    wanted = Budget(epochs=7, patience=2, limit=100, eval_limit=50, probe_limit=60, seeds=3, steps=4,
                    datasets=("mnist",), methods=("vae", "raven"), fid=False, protocol="paper", strong_steps=9,
                    strong_restarts=3, square_queries=11)
    assert budget("--epochs", "7", "--patience", "2", "--limit", "100", "--eval-limit", "50", "--probe-limit", "60",
                  "--seeds", "3", "--steps", "4", "--datasets", "mnist", "--methods", "vae,raven", "--no-fid",
                  "--protocol", "paper", "--strong-steps", "9", "--strong-restarts", "3",
                  "--square-queries", "11") == wanted
    assert budget("--smoke", "--no-early-stopping", "--patience", "3").patience is None
    assert budget("--smoke", "--seeds", "4") == replace(SMOKE_BUDGET, seeds=4)


def test_budget_help_shows_each_fields_full_value(capsys):
    with pytest.raises(SystemExit):
        _reproduce_script().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"max epochs per model (full: {FULL_BUDGET.epochs})" in text
    assert f"strong protocol: PGD restarts (full: {FULL_BUDGET.strong_restarts})" in text


def test_a_bad_budget_flag_is_one_line():
    script = _reproduce_script()
    with pytest.raises(ConfigError, match=r"^--datasets expects comma-separated names, got ','$"):
        script.budget_from_args(script.parse_args(["--datasets", ","]))
