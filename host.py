"""What the supervisor does to the operating system, in one place: start a child process (forked
from a forkserver that has the bot modules loaded), wait on pipes, process sentinels and file
descriptors, read the clocks and a random source, and count the kernel's OOM kills.

`ProcessSupervisor` and the database agent's client get a `Host` and touch the OS only through
it (and through the process handles it returns), so the supervisor's policy - restarts, backoff,
the restart budget, FATAL and the watchdog - is tested with a fake host, a fake clock and
scripted child processes, no process started and nothing slept (tests/test_supervisor_policy.py).

The forkserver preloads `forkserver_preload`, which prepares it for the bots (their imports, a
TLS context, a frozen garbage collector). Imports: the standard library only; the children's
entry functions are handed in by the caller.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection as mpc
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

PRELOAD = ["forkserver_preload"]   # imported once by the forkserver, shared by every child


class Host:
    """The real operating system."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)
    random = staticmethod(random.random)
    wait = staticmethod(mpc.wait)

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        # Python 3.11's forkserver ignores the sys.path it is given, so the preload of this
        # project's modules would fail silently (and every child would import them again): the
        # forkserver inherits the environment, so put the project on PYTHONPATH.
        project = str(Path(__file__).resolve().parent)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if project not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([project, *filter(None, paths)])

    def start_process(self, target: Callable[..., None], args: tuple[Any, ...],
                      name: str) -> tuple[multiprocessing.Process, mpc.Connection]:
        """Fork a child running `target(*args, conn)`; returns it and our end of its pipe."""
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=target, name=name, args=(*args, child_end))
        try:
            process.start()
        finally:
            child_end.close()
        return process, parent_end

    @staticmethod
    def oom_kills() -> int | None:
        """How many processes the kernel's OOM killer has killed since boot (None: unknown)."""
        try:
            with open("/proc/vmstat", "rb") as fh:
                for line in fh:
                    if line.startswith(b"oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return None
