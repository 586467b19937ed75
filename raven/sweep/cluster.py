"""The Ray connection of sweeps and the reproduction: one `connect`, the resource defaults, remote tasks.

`connect(None)` starts a new local Ray with this machine's resources (never a cluster found on
this machine); `connect("auto")` joins RAY_ADDRESS, else the cluster started on this machine;
`connect("HOST:PORT")` joins that head's GCS port.

Token authentication stays on. A local Ray enables it itself (Ray 2.60) and creates
~/.ray/auth_token when no token is given (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH). Joining a
cluster sends the token from the same places, but Ray 2.60 switches token mode on by itself
only for an address it finds on this machine: an explicit address, and `auto` while RAY_ADDRESS
is set (Ray reads that as an explicit address: the way `ray job submit` and KubeRay pods start
drivers), would connect without the token and be refused. So `connect` switches token mode on
(Ray's own `maybe_enable_token_auth_if_token_available`) whenever it joins a cluster and a token
is available, unless RAY_AUTH_MODE is set already.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

import ray
from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

# Default GPU shares where the cluster has GPUs (fractions pack several small VAEs on one GPU).
TRIAL_GPU_SHARE = 0.25  # a sweep trial, a reproduction task (train + evaluate)
EVAL_GPU_SHARE = 1.0  # a sweep's full evaluation (attacks and FID on the whole test set)


class ClusterError(RuntimeError):
    """Ray cannot be reached or refuses the connection; the message is one line for the user."""


@dataclass(frozen=True)
class ClusterInfo:
    """What a driver joined: the GCS address, total CPUs and GPUs, live nodes."""

    address: str
    cpus: float
    gpus: float
    nodes: int
    node_cpus: float = 0.0  # the most CPUs of one live node (0: unknown): no task may ask for more

    def eval_cpus(self, requested: float | None, per_trial: float, tasks: int) -> float:
        """`requested`, else the CPUs that `tasks` evaluations running at once can each have: the cluster's
        CPUs shared among them, within the largest node, never fewer than a trial's (`per_trial`). A lone
        evaluation on a 2-core laptop gets both cores, not one of them."""
        if requested is not None:
            return float(requested)
        share = math.floor(self.cpus / max(1, tasks))
        if self.node_cpus > 0:
            share = min(share, math.floor(self.node_cpus))
        return float(max(per_trial, share))

    def gpus_per(self, requested: float | None, share: float) -> float:
        """`requested`, else `share` of a GPU when the cluster has GPUs, else 0."""
        if requested is not None:
            return float(requested)
        return share if self.gpus > 0 else 0.0

    def slots(self, cpus: float, gpus: float) -> int:
        """How many tasks of (cpus, gpus) fit on the cluster at once (at least 1)."""
        fits = [self.cpus / cpus] if cpus > 0 else []
        if gpus > 0:
            fits.append(self.gpus / gpus)
        return max(1, math.floor(min(fits))) if fits else 1


def _host_port(address: str) -> tuple[str, int] | None:
    text = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str | None, timeout: float = 5.0) -> str | None:
    """Fail fast (ClusterError) when `address` (or RAY_ADDRESS for 'auto') names an unreachable cluster."""
    if address is None:
        return None
    target = os.environ.get("RAY_ADDRESS") if address == "auto" else address
    if not target or target == "auto":
        return address  # ray.init finds a cluster started on this machine, or says none is running
    host_port = _host_port(target)
    if host_port is None:
        raise ClusterError(f"cannot read the Ray address {target!r}; use HOST:PORT (the head's GCS port) or auto")
    try:
        with socket.create_connection(host_port, timeout=timeout):
            pass
    except OSError as exc:
        source = " (from RAY_ADDRESS)" if address == "auto" else ""
        raise ClusterError(f"cannot reach a Ray cluster at {target}{source}: {exc.strerror or exc}; "
                           "start one with `ray start --head`, or leave --address out to start a local Ray") from None
    return address


def connect(address: str | None, log: Callable[[str], None] | None = None) -> ClusterInfo:
    """ray.init: a new local Ray for None, else join the cluster ('auto' or HOST:PORT); see the module docstring."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    address = check_address(address)
    if address is None:
        if os.environ.pop("RAY_ADDRESS", None):
            log("RAY_ADDRESS ignored (no --address): starting a local Ray; pass --address auto to join that cluster")
    else:
        # Ray's own switch for a cluster found on this machine: token mode when RAY_AUTH_MODE is unset and a
        # token exists. Setting RAY_AUTH_MODE alone is not enough: Ray read its config at import.
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        # "local" always starts a new Ray; None would join a cluster already started on this machine.
        ray.init(address="local" if address is None else address, include_dashboard=False if address is None else None,
                 logging_level=logging.WARNING, log_to_driver=True)
    except ConnectionError as exc:
        raise ClusterError(f"cannot join the Ray cluster ({address}): {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - authentication and similar start-up failures, one line
        if type(exc).__name__ in ("AuthenticationError", "RaySystemError"):
            raise ClusterError(f"Ray refused the connection: {str(exc).splitlines()[0]}") from None
        raise
    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(address=ray.get_runtime_context().gcs_address, cpus=float(resources.get("CPU", 0.0)),
                       gpus=float(resources.get("GPU", 0.0)), nodes=len(alive),
                       node_cpus=max((float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive), default=0.0))


def node_name() -> str:
    """The IP address of the Ray node this runs on (the host name outside Ray)."""
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return socket.gethostname()


def run_tasks(fn: Callable[..., Any], jobs: dict[Hashable, tuple], *, cpus: float, gpus: float,
              max_retries: int = 1, tick: Callable[[], None] | None = None, tick_s: float = 5.0
              ) -> Iterator[tuple[Hashable, Any, BaseException | None]]:
    """Run fn(*args) as one Ray task per job; yield (key, result, None) or (key, None, error) as each ends.

    `tick`, when given, is called about every `tick_s` seconds while tasks run (a progress line).
    """
    task = ray.remote(fn)
    pending = {task.options(num_cpus=cpus, num_gpus=gpus, max_retries=max_retries, name=str(key)).remote(*args): key
               for key, args in jobs.items()}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=tick_s if tick else None)
        if not done:
            tick()
            continue
        key = pending.pop(done[0])
        try:
            outcome = (key, ray.get(done[0]), None)
        except Exception as exc:  # noqa: BLE001 - a crashed task is reported; the others go on
            outcome = (key, None, exc)
        yield outcome
