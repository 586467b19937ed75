"""An ordered queue of writes to a remote store that may go away: persisted, retried with backoff.

Knows nothing of what it writes. A write is a JSON-serialisable dict; `apply(op)` performs
it, and `classify(exc)` sorts a failure into "unreachable" (no answer: refused, reset, timed
out), "server" (the store answered with an overload or internal error) or None (the store
rejected the write: retrying will not help).

* Order: writes are applied first in, first out. A write that fails with "unreachable" (or
  "server", up to `server_attempts` times) stays at the head of the queue, and later writes
  wait behind it; a rejected write is reported and dropped.
* Backoff: after a failure the next flush is tried only once the backoff has passed (0.5 s
  doubling to 15 s), so an outage costs the caller one failed request per backoff step, not
  one per write.
* Persistence: while writes wait they are also saved to `path` (a JSON list), which
  `load_pending` puts back at the head of a new queue: a process that dies during an outage
  loses nothing. `op["attempts"]` counts failed tries, so `apply` knows that a retried write
  may have reached the store already (its answer lost) and can check before writing again.
* Outages: the queue knows when the store is down (`down`, from the first failed write or
  read until one succeeds). `read` serves reads that must see the queued writes: it answers
  from the store once they are delivered, else at once with a default, so an outage costs the
  caller no wait; only `drain`, the caller's one wait at the end, waits for the store.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 15.0
SERVER_ATTEMPTS = 10  # a write the store keeps answering with an error is given up after this
T = TypeVar("T")


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _first_line(exc: BaseException, limit: int) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class WriteQueue:
    """FIFO writes through `apply`, kept (and saved to `path`) while the store cannot be reached."""

    def __init__(self, apply: Callable[[dict[str, Any]], None],
                 classify: Callable[[BaseException], str | None], *, target: str,
                 path: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> None:
        self._apply = apply
        self._classify = classify
        self.target = target  # named in messages, e.g. "MLflow tracking store http://..."
        self.path = Path(path) if path else None
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._ops: list[dict[str, Any]] = []
        self._failures = 0  # consecutive failed tries
        self._next_try = 0.0
        self._outage_since: float | None = None
        self._skipped: set[str] = set()  # reads already noted as skipped in this outage

    @property
    def pending(self) -> int:
        return len(self._ops)

    @property
    def ops(self) -> tuple[dict[str, Any], ...]:
        """The queued writes, oldest first (read only)."""
        return tuple(self._ops)

    @property
    def down(self) -> bool:
        """The store did not answer the last try (a write or a read) and has not answered since."""
        return self._outage_since is not None

    def submit(self, op: dict[str, Any]) -> bool:
        """Queue one write and flush; True when nothing is left waiting."""
        self._ops.append(op)
        return self.flush()

    def flush(self, force: bool = False) -> bool:
        """Apply queued writes in order until one cannot reach the store; True when the queue is empty.

        Not tried again before the backoff after a failure has passed, unless `force`.
        """
        if not self._ops:
            return True
        if not force and time.monotonic() < self._next_try:
            self._save()
            return False
        while self._ops:
            op = self._ops[0]
            try:
                self._apply(op)
            except Exception as exc:  # noqa: BLE001 - sorted by classify
                kind = self._classify(exc)
                op["attempts"] = int(op.get("attempts", 0)) + 1
                if kind == "unreachable" or (kind == "server" and op["attempts"] < SERVER_ATTEMPTS):
                    self._failed(exc)
                    self._save()
                    return False
                self._ops.pop(0)
                trial = f" of trial {op['trial_id']}" if op.get("trial_id") else ""
                self._log(f"warning: write {op.get('op')}{trial} rejected by {self.target} "
                          f"and dropped: {_first_line(exc, 300)}")
                continue
            self._ops.pop(0)
        self._answered()
        self._save()
        return True

    def read(self, what: str, fn: Callable[[], T], default: T) -> T:
        """fn() from the store once the queued writes are delivered (so it sees them); else `default` at once.

        While the store is down (or a write still waits) the read is skipped with a note, once per
        `what` and outage, and tried again only when the backoff allows. A read the store rejects raises.
        """
        if self.flush() and time.monotonic() >= self._next_try:
            try:
                value = fn()
            except Exception as exc:  # noqa: BLE001 - sorted by classify
                if self._classify(exc) is None:
                    raise
                self._failed(exc)
            else:
                self._answered()
                return value
        if what not in self._skipped:
            self._skipped.add(what)
            self._log(f"note: {what} skipped while {self.target} is unreachable")
        return default

    def drain(self, timeout: float) -> bool:
        """Flush until the queue is empty (True) or `timeout` seconds have passed (False; the writes stay kept).

        Tried at each backoff step and once more at the deadline.
        """
        deadline = time.monotonic() + timeout
        while not self.flush(force=True):
            now = time.monotonic()
            if now >= deadline:
                return False
            time.sleep(max(0.05, min(self._next_try, deadline) - now))
        return True

    def _failed(self, exc: BaseException) -> None:
        """A try the store did not answer: back off; the first of an outage is said."""
        self._failures += 1
        self._next_try = time.monotonic() + min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._log(f"warning: {self.target} unreachable ({_first_line(exc, 200)}); "
                      "writes are queued and retried meanwhile")

    def _answered(self) -> None:
        if self._outage_since is not None:
            self._log(f"{self.target} reachable again after {time.monotonic() - self._outage_since:.0f}s; "
                      "queued writes flushed")
            self._outage_since = None
            self._skipped.clear()
        self._failures = 0
        self._next_try = 0.0

    def load_pending(self) -> int:
        """Queue the writes a previous process saved in `path` (ahead of new ones); their count."""
        if self.path is None or not self.path.is_file():
            return 0
        try:
            ops = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0
        for op in ops:
            op["attempts"] = max(1, int(op.get("attempts", 0)))  # may have reached the store: verify
        self._ops[:0] = ops
        return len(ops)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            if self._ops:
                write_atomic(self.path, json.dumps(self._ops))
            elif self.path.exists():
                self.path.unlink()
        except OSError:
            pass
