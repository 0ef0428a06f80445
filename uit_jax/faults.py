"""Fault injection for the crash tests: `UIT_JAX_KILL_AT=POINT[:N]` makes the process SIGKILL itself the N-th time
(default the first) it reaches POINT. Unset, as always outside tests, `point` is a dictionary lookup and nothing else.

Points: `compile` (before the first train step), `save` (before a checkpoint is handed to Orbax), `saved` (the
asynchronous write in flight; from the second save on, Orbax also deletes the older step), `finalize` (waiting for
the writes to finish), `restore` (before a checkpoint is read), `final_eval` (the test evaluation at the end).
"""

from __future__ import annotations

import os
import signal

ENV = "UIT_JAX_KILL_AT"
POINTS = ("compile", "save", "saved", "finalize", "restore", "final_eval")
_seen: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
