"""Test helpers: Ray clusters and servers started on this machine and stopped by their own process session.

Every process a test starts (`ray start` for a head or a worker node, `mlflow server`,
PostgreSQL, a sweep driver) runs in a session of its own (start_new_session), and is stopped
through that session id, never by name: other Ray clusters on the same machine (other
people's, other test runs') are left alone, and `ray stop` is never called.

Ray's token authentication stays on: `base_env` writes a token into the test's own folder
and points RAY_AUTH_TOKEN_PATH at it (RAY_AUTH_MODE=token), so nothing reads or writes
~/.ray/auth_token.

`RayCluster` runs a multi-node cluster on one machine: a head and any number of worker
nodes, each a separate raylet (`ray start --address HEAD`) with its own free ports and its
own session, so one node can be killed (SIGKILL to its whole session) while the others run on.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIGMA_SCRIPT = REPO / "sweeps" / "sigma_aug.py"

# The smallest sweep that still trains, reports and checkpoints every epoch and computes the
# objective: 500 training images, the objective on 50 validation images with 2 PGD steps and a
# probe fitted on 300 images, no final evaluation (the tests that want one ask for it).
LEAN_SWEEP_FLAGS = ["--smoke", "--limit", "500", "--objective-images", "50", "--objective-steps", "2",
                    "--objective-probe-images", "300", "--evaluate-top", "0"]


# ----------------------------------------------------------------------------- ports and sessions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of `count` consecutive free ports (Ray's worker port range)."""
    for _ in range(200):
        base = 20000 + secrets.randbelow(30000)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


def session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
            except OSError:
                pass
    return members


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def live_members(sid: int) -> list[int]:
    return [p for p in session_members(sid) if not _zombie(p)]


def stop_session(sid: int, grace: float = 5.0) -> None:
    """SIGTERM every process of the session this test started, SIGKILL what is left after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        members = live_members(sid)
        if not members:
            return
        for pid in members:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not live_members(sid):
                return
            time.sleep(0.2)


def kill_session(sid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of the session at once (a machine that dies), and wait until they are gone."""
    for pid in live_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while live_members(sid) and time.monotonic() < deadline:
        time.sleep(0.1)


def short_tmpdir(prefix: str = "rt") -> Path:
    """A short /tmp folder (Ray's Unix socket paths must stay under 108 characters)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def base_env(data_dir: Path, token_dir: Path) -> dict[str, str]:
    """The environment of a Ray or sweep subprocess: its own Ray token, no inherited cluster address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
    token = token_dir / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    env.update(RAVEN_DATA_DIR=str(data_dir), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- a Ray cluster


@dataclass
class RayNode:
    """One raylet started by `ray start` in its own session (sid = the pid of `ray start`)."""

    role: str  # "head" or "worker"
    sid: int
    node_manager_port: int
    num_cpus: int
    node_id: str | None = None
    log: str = ""

    def alive(self) -> bool:
        return bool(live_members(self.sid))


@dataclass
class RayCluster:
    """A head and worker nodes on this machine, each a separate raylet with its own free ports.

    All nodes share one short temporary folder (`tmp`): the Ray session lives in tmp/ray,
    the token in tmp/auth_token.
    """

    data_dir: Path
    tmp: Path = field(default_factory=short_tmpdir)
    nodes: list[RayNode] = field(default_factory=list)
    port: int = 0
    object_store_bytes: int = 400 * 1024 * 1024
    fast_failure_detection: bool = True

    @property
    def env(self) -> dict[str, str]:
        return base_env(self.data_dir, self.tmp)

    def _node_env(self) -> dict[str, str]:
        env = self.env
        if self.fast_failure_detection:
            # The GCS declares a silent node dead after 2 failed health checks 1 s apart (default:
            # 5 checks 3 s apart), so a killed worker's trial is restarted within seconds.
            env.update(RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="1000",
                       RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="2")
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def head(self) -> RayNode:
        return next(n for n in self.nodes if n.role == "head")

    @property
    def workers(self) -> list[RayNode]:
        return [n for n in self.nodes if n.role == "worker"]

    def _start(self, role: str, num_cpus: int, attempts: int = 2) -> RayNode:
        """`ray start` one node on fresh free ports; tried again once (a port taken in between)."""
        for attempt in range(attempts):
            try:
                return self._start_once(role, num_cpus)
            except RuntimeError:
                if attempt + 1 == attempts:
                    raise
                stop_session(self.nodes.pop().sid)
        raise AssertionError("unreachable")

    def _start_once(self, role: str, num_cpus: int) -> RayNode:
        workers = free_port_range(30)
        node_manager_port = free_port()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start",
               "--node-ip-address", "127.0.0.1",
               "--node-manager-port", str(node_manager_port), "--object-manager-port", str(free_port()),
               "--min-worker-port", str(workers), "--max-worker-port", str(workers + 29),
               "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--num-cpus", str(num_cpus), "--num-gpus", "0",
               "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats"]
        if role == "head":
            self.port = free_port()
            cmd += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--temp-dir", str(self.tmp / "ray")]
        else:
            cmd += ["--address", self.address, "--temp-dir", str(self.tmp / "ray")]
        proc = subprocess.Popen(cmd, env=self._node_env(), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        node = RayNode(role, proc.pid, node_manager_port, num_cpus)
        self.nodes.append(node)  # stopped by stop() even when it fails to come up
        try:
            node.log, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            node.log, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"`ray start` of a {role} node failed (rc {proc.returncode}):\n{node.log[-3000:]}")
        return node

    def start_head(self, num_cpus: int = 0) -> RayNode:
        return self._start("head", num_cpus)

    def add_worker(self, num_cpus: int = 1) -> RayNode:
        node = self._start("worker", num_cpus)
        self.refresh_node_ids()
        return node

    def ray_nodes(self) -> list[dict]:
        """ray.nodes() of this cluster, read by a short-lived driver in a subprocess."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
                "print('NODES' + json.dumps([{k: n[k] for k in ('NodeID', 'Alive', 'NodeManagerPort', 'Resources')} "
                "for n in ray.nodes()]))") % self.address
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120,
                             start_new_session=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("NODES")), None)
        if line is None:
            raise RuntimeError(f"cannot list the nodes of {self.address}: {out.stderr[-2000:]}")
        return json.loads(line[len("NODES"):])

    def refresh_node_ids(self) -> None:
        by_port = {n["NodeManagerPort"]: n["NodeID"] for n in self.ray_nodes() if n["Alive"]}
        for node in self.nodes:
            if node.node_id is None and node.node_manager_port in by_port:
                node.node_id = by_port[node.node_manager_port]

    def node_by_id(self, node_id: str) -> RayNode:
        found = [n for n in self.nodes if n.node_id == node_id]
        if not found:
            raise KeyError(f"node {node_id} is not one of this cluster's ({[n.node_id for n in self.nodes]})")
        return found[0]

    def kill_node(self, node: RayNode) -> None:
        """SIGKILL the node's raylet, its agents and its workers (its whole session): a lost machine."""
        assert node.role == "worker", "only worker nodes are killed"
        kill_session(node.sid)

    def ensure_workers(self, count: int, num_cpus: int = 1) -> None:
        """Start replacement worker nodes until `count` of them are alive."""
        while sum(1 for n in self.workers if n.alive()) < count:
            self.add_worker(num_cpus)

    def stop(self) -> None:
        """Stop every node this cluster started (workers first), each through its own session."""
        for node in sorted(self.nodes, key=lambda n: n.role == "head"):
            stop_session(node.sid)
        leftover = [p for n in self.nodes for p in live_members(n.sid)]
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert not leftover, f"processes of this cluster still alive: {leftover}"

    @classmethod
    def start(cls, data_dir: Path, workers: int = 2, head_cpus: int = 0, worker_cpus: int = 1) -> "RayCluster":
        cluster = cls(data_dir)
        try:
            cluster.start_head(head_cpus)
            for _ in range(workers):
                cluster._start("worker", worker_cpus)
            cluster.refresh_node_ids()
            missing = [n for n in cluster.nodes if n.node_id is None]
            if missing:
                raise RuntimeError(f"nodes did not register with the head: {missing}")
        except BaseException:
            cluster.stop()
            raise
        return cluster


# ----------------------------------------------------------------------------- an MLflow server


@dataclass
class MlflowServer:
    """`mlflow server` in its own session on a fixed local port; stop() and start() again on the same port."""

    backend_store_uri: str
    artifacts: Path
    port: int = field(default_factory=free_port)
    env: dict[str, str] | None = None
    sid: int | None = None
    log_path: Path | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]
        log = open(self.log_path, "a") if self.log_path else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, env=self.env or dict(os.environ), start_new_session=True, stdout=log,
                                stderr=subprocess.STDOUT)
        if log is not subprocess.DEVNULL:
            log.close()
        self.sid = proc.pid

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}"
                                   + (f": {self.log_path.read_text()[-3000:]}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_for(healthy, timeout, interval=0.3, what=f"mlflow server on {self.uri}")

    def stop(self, kill: bool = False) -> None:
        if self.sid is not None:
            if kill:
                kill_session(self.sid)
            else:
                stop_session(self.sid)
            leftover = live_members(self.sid)
            assert not leftover, f"mlflow server processes still alive: {leftover}"
            self.sid = None


# ----------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """The newest PostgreSQL server bin folder (Debian: /usr/lib/postgresql/<major>/bin), else one on PATH."""
    candidates = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            major = path.parent.name
            candidates.append((int(major) if major.isdigit() else 0, path))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").is_file():
        return Path(initdb).parent
    return None


def postgres_unavailable() -> str | None:
    """Why a throw-away PostgreSQL cannot run here (None when it can)."""
    if postgres_bindir() is None:
        return ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
                "install them with: apt-get install -y postgresql")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the PostgreSQL server as"
    return None


@dataclass
class PostgresServer:
    """A throw-away PostgreSQL cluster in a temporary folder, on a free loopback port, in its own session.

    PostgreSQL refuses to run as root; as root the server runs as the `postgres` user (the
    folder is handed to it). Authentication is `trust` for the loopback only: a test fixture,
    not a configuration to copy.
    """

    tmp: Path = field(default_factory=lambda: short_tmpdir("pg"))
    port: int = field(default_factory=free_port)
    user: str = "mlflow"
    sid: int | None = None

    def _as_owner(self) -> dict:
        if os.geteuid() != 0:
            return {}
        import pwd

        entry = pwd.getpwnam("postgres")
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _run(self, *args: str) -> None:
        out = subprocess.run([str(postgres_bindir() / args[0]), *args[1:]], cwd=self.tmp, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "LC_ALL": "C"}, **self._as_owner())
        if out.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")

    def start(self, database: str = "mlflow", timeout: float = 60.0) -> str:
        """initdb, start, create `database`; returns its URI (postgresql+psycopg2://USER@127.0.0.1:PORT/DATABASE)."""
        (self.tmp / "sock").mkdir()
        if os.geteuid() == 0:
            owner = self._as_owner()
            for path in (self.tmp, self.tmp / "sock"):
                os.chown(path, owner["user"], owner["group"])
        self._run("initdb", "-D", str(self.tmp / "data"), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        log = open(self.tmp / "postgres.log", "w")
        proc = subprocess.Popen([str(postgres_bindir() / "postgres"), "-D", str(self.tmp / "data"), "-p", str(self.port),
                                 "-h", "127.0.0.1", "-k", str(self.tmp / "sock"), "-c", "fsync=off",
                                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                                cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "LC_ALL": "C"}, **self._as_owner())
        log.close()
        self.sid = proc.pid
        import psycopg2

        def ready():
            if proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {proc.returncode}: "
                                   f"{(self.tmp / 'postgres.log').read_text()[-3000:]}")
            try:
                psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                                 connect_timeout=2).close()
                return True
            except psycopg2.OperationalError:
                return False

        wait_for(ready, timeout, 0.2, f"PostgreSQL on port {self.port}")
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
        conn.close()
        # The driver named explicitly: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2.
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), then whatever is left of its session; the folder goes."""
        if self.sid is not None:
            try:
                os.kill(self.sid, signal.SIGINT)
                wait_for(lambda: not live_members(self.sid), 20, 0.1, "PostgreSQL to shut down")
            except (OSError, TimeoutError):
                pass
            stop_session(self.sid)
            leftover = live_members(self.sid)
            assert not leftover, f"PostgreSQL processes still alive: {leftover}"
            self.sid = None
        shutil.rmtree(self.tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- reading a sweep back


def trial_children(client, experiment: str) -> tuple[object, list]:
    """(parent run, trial runs) of the only sweep in the experiment."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("raven.role") == "sweep"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    trials = [r for r in runs if r.data.tags.get("raven.role") == "trial"]
    return parents[0], trials


def assert_every_epoch_once(client, run, epochs: int, names=("epoch", "train_loss", "val_elbo", "val_mse_255",
                                                              "val_loss")) -> None:
    """Each per-epoch metric holds exactly the steps 1..epochs, once each; the objective once, at the last."""
    for name in names:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, name))
        assert steps == list(range(1, epochs + 1)), (run.info.run_name, name, steps)
    objective = client.get_metric_history(run.info.run_id, "val_robust_accuracy")
    assert [m.step for m in objective] == [epochs], (run.info.run_name, [m.step for m in objective])


def assert_one_run_per_trial(client, experiment: str, trial_ids, epochs: int):
    """Exactly one FINISHED child run per Tune trial, each epoch's metrics present exactly once."""
    parent, trials = trial_children(client, experiment)
    ids = [r.data.tags["raven.trial_id"] for r in trials]
    assert sorted(ids) == sorted(trial_ids), (ids, trial_ids)
    for run in trials:
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags.get("raven.trial_status") == "TERMINATED", (run.info.run_name, tags)
        assert tags.get("raven.checkpoint") and tags.get("raven.node_id"), (run.info.run_name, tags)
        assert tags["raven.node_id"] == tags["raven.node_ids"].split(",")[-1], tags
        assert "sigma_aug" in run.data.params and "seed" in run.data.params, run.data.params
        assert_every_epoch_once(client, run, epochs)
    return parent, trials


def tune_trial_ids(experiment_dir: Path) -> list[str]:
    return sorted(p.name.removeprefix("trial_") for p in experiment_dir.glob("trial_*") if p.is_dir())


def checkpoint_reports(trial_dir: Path) -> list[dict]:
    """The newest complete reported.json of the trial's checkpoint folders in storage ([] when none)."""
    best: list[dict] = []
    for folder in trial_dir.glob("checkpoint_*"):
        try:
            history = json.loads((folder / "reported.json").read_text())
        except (OSError, ValueError):
            continue
        # A trial's checkpoint holds a seed-S/ folder per seed of its pack (raven.sweep.tune).
        if any(folder.glob("seed-*/checkpoint.pt")) and len(history) > len(best):
            best = history
    return best


def load_logged_model(tracking_uri: str, model_uri: str):
    """The model a run logged, loaded from the store at `tracking_uri`.

    A models:/ URI resolves against the global tracking store, which an earlier test may
    have set; it is pointed at this store for the load and restored after.
    """
    import mlflow
    import mlflow.pytorch

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
