"""Fault injection, for the tests that prove crash safety with real processes; inert in normal use.

Writers call :func:`fault_point` at the moments that matter (a checkpoint's files written but not yet
renamed, a shard finalised but its index not yet visible, ...). A test process started with
``VIQ_FAULTS=<point>[@<n>]=<action>[,...]`` has the ``n``-th arrival (default: every arrival) at
``point`` do ``action``:

* ``kill``: SIGKILL this process (what an OOM killer or a pre-empted node does);
* ``enospc``: raise ``OSError(ENOSPC)`` (a full disk);
* ``sleep:<seconds>``: pause (to hold a lock or a half-written state while another process acts).

Without the variable a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

__all__ = ["ENV", "fault_point"]

ENV = "VIQ_FAULTS"
_arrivals: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Do what ``VIQ_FAULTS`` asks at ``name`` (nothing when it is unset)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    count = _arrivals[name] = _arrivals.get(name, 0) + 1
    for item in spec.split(","):
        target, _, action = item.strip().partition("=")
        point, _, nth = target.partition("@")
        if point != name or (nth and int(nth) != count):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif action.startswith("sleep:"):
            time.sleep(float(action[len("sleep:") :]))
        else:
            raise ValueError(f"{ENV}: unknown action {action!r} at {name!r} (kill, enospc, sleep:<s>)")
