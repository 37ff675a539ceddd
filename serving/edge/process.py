"""The ``process`` section of GetRoutingStats: the server's CPU time, from which a load generator
computes the server's CPU per request. Under ``serve --workers N`` (``serving.edge.workers``) it
is the whole group's: the supervisor, its children (the workers and a private redis-server)."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

SUPERVISOR_ENV = "VALUERANK_SUPERVISOR_PID"
"""Set in each worker's environment: the pid whose children ``process_stats`` adds up."""


def process_stats() -> dict[str, Any]:
    """The ``process`` section of GetRoutingStats: CPU seconds and resident bytes of this server,
    or of every worker of its supervisor (and the supervisor) under ``serve --workers N``."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return {"pid": os.getpid(), "cpu_s": time.process_time(), "rss_bytes": _rss_bytes(os.getpid())}
    pids = [int(supervisor), *_children(int(supervisor))]
    return {
        "pid": int(supervisor),
        "cpu_s": sum(_cpu_s(pid) for pid in pids),
        "rss_bytes": sum(_rss_bytes(pid) for pid in pids),
        "worker_pid": os.getpid(),
        "processes": len(pids),
    }


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return found


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_bytes(pid: int) -> int:
    """Resident bytes of one process (0 once it is gone, or off Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
