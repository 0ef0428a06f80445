"""Fault injection for the crash tests: `UIT_JAX_KILL_AT=POINT[:N]` makes the process SIGKILL itself the N-th time
(default the first) it reaches POINT; `UIT_JAX_DELAY_AT=POINT:SECONDS` makes it sleep there the first time (a slow
process of a multi-process run). Unset, as always outside tests, `point` is two dictionary lookups and nothing else.

Points: `compile` (before the first train step), `save` (before a checkpoint is handed to Orbax), `saved` (the
asynchronous write in flight; from the second save on, Orbax also deletes the older step), `finalize` (waiting for
the writes to finish), `restore` (before a checkpoint is read), `final_eval` (the test evaluation at the end).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "UIT_JAX_KILL_AT"
DELAY_ENV = "UIT_JAX_DELAY_AT"
POINTS = ("compile", "save", "saved", "finalize", "restore", "final_eval")
_seen: dict[str, int] = {}


def point(name: str) -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay and delay.partition(":")[0] == name and not _seen.get(f"delay:{name}"):
        _seen[f"delay:{name}"] = 1
        time.sleep(float(delay.partition(":")[2]))
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
