"""What the supervisor does to the operating system, in one place: start a child process (forked
from a forkserver that has the bot modules loaded), wait on pipes, process sentinels and file
descriptors, read the clocks and a random source, and count the kernel's OOM kills.

`ProcessSupervisor` and the database agent's client get a `Host` and touch the OS only through
it (and through the process handles it returns), so the supervisor's policy - restarts, backoff,
the restart budget, FATAL and the watchdog - is tested with a fake host, a fake clock and
scripted child processes, no process started and nothing slept (tests/test_supervisor_policy.py).

Processes are started off the supervisor's loop: `spawn()` hands the start to one spawner
thread and returns a `Spawn` that the loop collects when it is done (the thread wakes the loop),
so a forkserver that is slow, stopped or dying never stalls supervision. A start that takes more
than `SPAWN_DEADLINE_S` means the forkserver stopped answering: it is killed, the start fails
(one bot's failed start, retried with backoff), and the next start runs a new forkserver. The
forkserver's own death is seen at once through a pidfd (`forkserver_sentinel()`), so the loop
reaps it and a new one is started (and preloaded) before the next bot needs it.

The forkserver preloads `forkserver_preload`, which prepares it for the bots (their imports, a
TLS context, a frozen garbage collector). It is the standard library's; its pid is read from
`multiprocessing.forkserver`'s module state, the one private name used here. Imports: the
standard library only; the children's entry functions are handed in by the caller.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection as mpc
import multiprocessing.forkserver
import os
import queue
import random
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("dims.host")

PRELOAD = ["forkserver_preload"]   # imported once by the forkserver, shared by every child
SPAWN_DEADLINE_S = 10.0   # a start taking longer: the forkserver is stuck (its preload takes ~0.5 s)
EXIT_STATUS_WAIT_S = 0.5  # how long a gone process's exit status may take to come from the forkserver


class SpawnFailed(OSError):
    """No process could be started; the message says why."""


class Forked:
    """A bot or agent process forked by the forkserver, watched through a pidfd: its sentinel
    becomes readable when the process itself exits, even while the forkserver (its parent,
    which reports the exit status) is stopped or dead. The rest is the multiprocessing.Process."""

    def __init__(self, process: multiprocessing.Process):
        self._process = process
        self.pid = process.pid
        self._pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(process.pid)
            except OSError:
                pass   # gone already, or Linux before 5.3: the forkserver's report is the sentinel

    @property
    def sentinel(self) -> Any:
        return self._process.sentinel if self._pidfd is None else self._pidfd

    def join(self, timeout: float | None = None) -> None:
        """Wait for the exit status; once the process is known to be gone, for at most
        EXIT_STATUS_WAIT_S more (the forkserver reports it a moment after the exit)."""
        if self._pidfd is not None and select.select([self._pidfd], [], [], 0)[0]:
            self._process.join(max(timeout or 0.0, EXIT_STATUS_WAIT_S))
            os.close(self._pidfd)
            self._pidfd = None
        else:
            self._process.join(timeout)

    @property
    def exitcode(self) -> int | None:
        """None while it runs, and for a process that exited without its forkserver telling how."""
        return self._process.exitcode

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def kill(self) -> None:
        self._process.kill()

    def terminate(self) -> None:
        self._process.terminate()

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    __del__ = close


class Spawn:
    """One process start, done off the supervisor's loop by the spawner thread."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], name: str):
        self.target, self.args, self.name = target, args, name
        self.process: Any = None
        self.conn: Any = None
        self.error: BaseException | None = None
        self.forkserver_pid: int | None = None   # the forkserver it was forked from
        self._finished = threading.Event()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None) -> bool:
        return self._finished.wait(timeout)

    def result(self) -> tuple[Any, Any]:
        """The process and our end of its pipe; raises SpawnFailed if it could not start."""
        if self.error is not None:
            raise self.error
        return self.process, self.conn

    def finish(self, process: Any = None, conn: Any = None, error: BaseException | None = None) -> None:
        self.process, self.conn, self.error = process, conn, error
        self._finished.set()


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
        self.on_spawned: Callable[[], None] = lambda: None   # called by the spawner thread
        self._jobs: queue.SimpleQueue[Spawn | None] = queue.SimpleQueue()
        self._spawner: threading.Thread | None = None
        self._lock = threading.Lock()
        self._forkserver_pid: int | None = None
        self._forkserver_fd: int | None = None     # a pidfd: readable once the forkserver has exited
        self._forkserver_dead = False   # the loop saw the current one exit; the spawner has not replaced it yet

    # -- starting processes

    def spawn(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> Spawn:
        """Start a child running `target(*args, conn)` off the caller's thread; the returned
        Spawn is done (and `on_spawned` called) once it started or failed."""
        job = Spawn(target, args, name)
        with self._lock:
            if self._spawner is None:
                self._spawner = threading.Thread(target=self._spawn_loop, name="spawner", daemon=True)
                self._spawner.start()
        self._jobs.put(job)
        return job

    def start_process(self, target: Callable[..., None], args: tuple[Any, ...],
                      name: str) -> tuple[Forked, mpc.Connection]:
        """`spawn()`, waited for: the process and our end of its pipe, or SpawnFailed."""
        job = self.spawn(target, args, name)
        if not job.wait(SPAWN_DEADLINE_S * 3):
            raise SpawnFailed(f"could not start {name}: the spawner did not answer")
        return job.result()

    def _spawn_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.finish(*self._start(job))
            except BaseException as exc:   # reported on the Spawn, never out of this thread
                job.finish(error=exc if isinstance(exc, SpawnFailed) else SpawnFailed(_why(exc)))
            try:
                self.on_spawned()
            except Exception:
                log.exception("waking the supervisor after a start failed")

    def _start(self, job: Spawn) -> tuple[Forked | None, mpc.Connection | None]:
        """Fork through the forkserver (starting one when there is none or it died), killing a
        forkserver that does not fork within SPAWN_DEADLINE_S."""
        multiprocessing.forkserver.ensure_running()   # reaps a dead forkserver, starts a new one
        self._watch_forkserver()
        if job.target is _prepare_forkserver:
            return None, None
        job.forkserver_pid = pid = self._forkserver_pid
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=job.target, name=job.name, args=(*job.args, child_end))
        stuck = threading.Timer(SPAWN_DEADLINE_S, self._kill_stuck_forkserver, (pid, job.name))
        stuck.daemon = True
        stuck.start()
        try:
            process.start()
        except EOFError:
            parent_end.close()
            raise SpawnFailed("the forkserver died while starting the process") from None
        except BaseException:
            parent_end.close()
            raise
        finally:
            stuck.cancel()
            child_end.close()
        return Forked(process), parent_end

    @staticmethod
    def _kill_stuck_forkserver(pid: int | None, name: str) -> None:
        if pid is None:
            return
        log.warning("the forkserver (pid %d) did not start %s within %g s: killing it; the next start "
                    "runs a new one", pid, name, SPAWN_DEADLINE_S)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    # -- the forkserver's life

    def _watch_forkserver(self) -> None:
        """Keep a pidfd on the current forkserver (called in the spawner thread)."""
        pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
        with self._lock:
            if pid == self._forkserver_pid:
                return
            if self._forkserver_fd is not None:
                os.close(self._forkserver_fd)
            self._forkserver_pid, self._forkserver_fd, self._forkserver_dead = pid, None, False
            if pid is not None and hasattr(os, "pidfd_open"):
                try:
                    self._forkserver_fd = os.pidfd_open(pid)
                except OSError:
                    pass   # Linux before 5.3: the next start notices a dead forkserver

    def forkserver_sentinel(self) -> int | None:
        """A file descriptor that becomes readable when the current forkserver exits."""
        return self._forkserver_fd

    def forkserver_exited(self) -> int | None:
        """The loop saw `forkserver_sentinel()` readable: stop watching it, and have the spawner
        reap it and start a new forkserver at once (its preload then runs before the next bot
        needs it). Returns the dead forkserver's pid."""
        with self._lock:
            pid, fd = self._forkserver_pid, self._forkserver_fd
            self._forkserver_fd = None
            self._forkserver_dead = pid is not None   # until the spawner replaces it (the pidfd is closed)
        if fd is not None:
            os.close(fd)
        self.spawn(_prepare_forkserver, (), "forkserver")
        return pid

    def forkserver_died(self, pid: int | None) -> bool:
        """Whether the forkserver with this pid has exited (a bot forked from it died with it)."""
        if pid is None:
            return False
        with self._lock:
            if pid != self._forkserver_pid or self._forkserver_dead:
                return True
            fd = self._forkserver_fd
            if fd is None:
                return False
            try:
                return bool(select.select([fd], [], [], 0)[0])
            except (OSError, ValueError):
                return False

    def close(self) -> None:
        self._jobs.put(None)

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


def _prepare_forkserver(*_: Any) -> None:
    """Not run: a Spawn named "forkserver" makes the spawner start a forkserver and fork nothing."""


def _why(exc: BaseException) -> str:
    return f"could not start the process: {type(exc).__name__}: {exc}" if str(exc) else \
        f"could not start the process: {type(exc).__name__}"
