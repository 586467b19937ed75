"""The MLflow UI, served by `mlflow server` over the store of a real smoke sweep, shows the sweep to a browser.

A smoke sweep of the Smooth Encoder's eta (`sweeps/se_eta.py --smoke`, local Ray) writes
sqlite:///mlflow.db and ./mlruns in a temporary folder; `mlflow server` serves that store on
a free port; headless Chromium (Debian's `chromium` package) loads the pages and the test
reads the DOM after the app has rendered: the experiment's landing page (its training runs),
the runs page, the compare view of the trials (parallel coordinates of eta against the metrics)
and the evaluation run's page.

Skipped where Chromium is not installed (`apt-get install -y chromium`).
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ray_cluster import free_port, stop_session

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, data_dir):
    """A finished `se_eta.py --smoke` in its own folder: (folder, experiment id, run ids by role)."""
    work = tmp_path_factory.mktemp("ui-sweep")
    short = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    token = short / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAVEN_DATA_DIR=str(data_dir), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_TMPDIR=str(short), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    try:
        proc = subprocess.run([sys.executable, str(REPO / "sweeps" / "se_eta.py"), "--smoke"], env=env, cwd=work,
                              capture_output=True, text=True, timeout=480, start_new_session=True)
        assert proc.returncode == 0, proc.stderr[-6000:]
        (work / "sweep.out").write_text(proc.stdout)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raven-se-eta")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        runs.setdefault(run.data.tags.get("raven.role"), []).append(run)
    return work, experiment.experiment_id, runs


@pytest.fixture(scope="module")
def ui(sweep_store):
    """`mlflow server` over the sweep's store on a free port; yields its base URL."""
    work, _, _ = sweep_store
    port = free_port()
    log = open(work / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not come up: {(work / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_session(proc.pid)
        proc.wait(timeout=30)
        log.close()


def page_text(url: str, budget_ms: int = 15000) -> str:
    """The rendered page's visible text, from headless Chromium's --dump-dom."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
            capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", proc.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


def rendered(url: str, *expected: str) -> str:
    """Page text once every expected string is in it (one slower retry for a busy machine)."""
    text = ""
    for budget in (15000, 40000):
        text = page_text(url, budget)
        if all(e in text for e in expected):
            return text
    missing = [e for e in expected if e not in text]
    raise AssertionError(f"{url}: {missing} not in the rendered page: {text[:3000]}")


@pytest.mark.slow
def test_experiment_is_marked_model_development_and_opens_on_its_runs(ui, sweep_store):
    """raven tags its experiments mlflow.experimentKind = custom_model_development; MLflow 3.17's UI chooses
    the landing page from its GenAI / Model training switch, which the link raven prints selects."""
    work, experiment_id, runs = sweep_store
    from mlflow import MlflowClient

    experiment = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_experiment(experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    text = rendered(f"{ui}/#/experiments/{experiment_id}?workflowType=machine_learning",
                    f"Runs - Experiment {experiment_id}", "matching runs")
    assert runs["sweep"][0].info.run_name in text and "Token Usage" not in text  # not the GenAI overview


@pytest.mark.slow
def test_runs_page_shows_the_sweep(ui, sweep_store):
    _, experiment_id, runs = sweep_store
    parent = runs["sweep"][0]
    text = rendered(f"{ui}/#/experiments/{experiment_id}/runs", "raven-se-eta", parent.info.run_name)
    total = sum(len(v) for v in runs.values())
    assert f"{total} matching runs" in text  # the parent with its trial and evaluation children


@pytest.mark.slow
def test_compare_view_plots_eta_against_the_objective(ui, sweep_store):
    work, experiment_id, runs = sweep_store
    trials = runs["trial"]
    # The sweep prints the link to this view: every trial run of the sweep, and nothing else.
    (line,) = [line for line in (work / "sweep.out").read_text().splitlines() if line.startswith("Compare the trials")]
    assert "log10_eta on X, val_robust_accuracy on Y" in line  # the smoke sweep's eta is log-uniform
    link = line[line.index("/#/compare-runs"):]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link.removeprefix("/#")).query)
    assert sorted(json.loads(query["runs"][0])) == sorted(r.info.run_id for r in trials)
    assert json.loads(query["experiments"][0]) == [experiment_id]
    text = rendered(f"{ui}{link}", "Parallel Coordinates Plot", "Scatter Plot", *[r.info.run_name for r in trials])
    assert f"Comparing {len(trials)} Runs" in text
    assert "Parameters: eta" in text and "val_clean_accuracy" in text
    # The compare tables render only the rows in view, so the objective is read on a trial's own page.
    trial = trials[0]
    page = rendered(f"{ui}/#/experiments/{experiment_id}/runs/{trial.info.run_id}",
                    trial.info.run_name, "val_robust_accuracy", "raven.checkpoint")
    assert f"val_robust_accuracy {trial.data.metrics['val_robust_accuracy']}"[:26] in page


@pytest.mark.slow
def test_evaluation_run_page_shows_metrics_tags_and_model(ui, sweep_store):
    _, experiment_id, runs = sweep_store
    evaluation = runs["evaluation"][0]
    text = rendered(f"{ui}/#/experiments/{experiment_id}/runs/{evaluation.info.run_id}",
                    evaluation.info.run_name, "clean_accuracy", "adv_acc_kl_delta_0.1", "adv_acc_w2_delta_0.2",
                    "raven.trial_id")
    assert evaluation.data.tags["raven.trial_id"] in text
    assert "Logged models (1)" in text
    artifacts = rendered(f"{ui}/#/experiments/{experiment_id}/runs/{evaluation.info.run_id}/artifacts",
                         "robustness", "checkpoint")
    assert evaluation.info.run_name in artifacts
