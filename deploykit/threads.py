"""Thread counts: the CPUs this process may run on (set explicitly everywhere, so latency
figures are comparable)."""

from __future__ import annotations

import os


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
