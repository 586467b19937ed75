"""Progress on screen: bars (tqdm, on stderr, only on a terminal), lines above them, durations people plan with.

Logs and captured output get no bars; the long stages print the time left in their progress
lines instead (raven.sweep.clock for sweeps, raven.reproduce.runner for the reproduction).
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    """A progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def say(line: str, progress: tqdm | None = None) -> None:
    """One line on stderr, above the bar when one is shown."""
    if progress is not None and not progress.disable:
        progress.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """'45 s', '12 min', '2.3 h': the scale a person plans with."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
