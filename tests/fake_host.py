"""A fake `host.Host` for the supervisor's policy tests: simulated time, scripted bot processes,
a recording database agent. Nothing is started and nothing sleeps: `FakeHost.wait()` moves the
clock to the next thing that happens (a child getting ready, sending a heartbeat, crashing,
obeying a stop or a signal) or to the timeout, whichever comes first.

A `Script` says what a bot's process does once started; `FakeHost.scripts[name]` is a list
consumed one per start (the last one repeats), so a test writes a history such as "crashes
twice, then runs".
"""

from __future__ import annotations

import itertools
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any

from host import Spawn
from pipe_protocol import Kind, Message


@dataclass
class Script:
    ready_after: float | None = 0.01     # seconds after start it sends `ready`; None: never
    exit_after: float | None = None      # seconds after start it exits by itself; None: never
    exit_code: int = 1
    heartbeats: bool = True              # while ready, a heartbeat every heartbeat_interval
    hang_after: float | None = None      # seconds after start it stops sending heartbeats
    obeys_stop: bool = True              # exits 0 a moment after a `stop` message
    obeys_term: bool = True              # dies of SIGTERM
    stats: dict | None = None
    waiting: str | None = None           # until ready, heartbeats say the start waits for this


RUNS = Script()
CRASHES = Script(ready_after=None, exit_after=0.02)


class FakeConn:
    """The supervisor's end of a fake pipe."""

    def __init__(self, process: "FakeProcess"):
        self.process = process
        self.inbox: deque[bytes] = deque()
        self.closed = False

    def send_bytes(self, data: bytes) -> None:
        if self.closed or self.process.exitcode is not None:
            raise OSError("the pipe is closed")
        self.process.received(Message.decode(data))

    def recv_bytes(self) -> bytes:
        if self.inbox:
            return self.inbox.popleft()
        raise EOFError

    def poll(self, timeout: float = 0.0) -> bool:
        """True when a message waits, or, as a real pipe's, at EOF (the process is gone)."""
        return bool(self.inbox) or self.process.exitcode is not None

    def close(self) -> None:
        self.closed = True


class FakeProcess:
    """A scripted bot (or agent) process."""

    def __init__(self, host: "FakeHost", pid: int, name: str, script: Script, args: tuple):
        self.host, self.pid, self.name, self.script, self.args = host, pid, name, script, args
        self.started = host.now
        self.exitcode: int | None = None
        self.sentinel = object()
        self.conn = FakeConn(self)
        self.signals: list[int] = []
        self.signalled_at: list[float] = []   # when each of `signals` was sent
        self.messages: list[Message] = []
        self.ready_sent = False
        self.next_heartbeat: float | None = None
        self.exit_at: float | None = None if script.exit_after is None else self.started + script.exit_after
        self.exit_code_due = script.exit_code
        if script.waiting:
            self.next_heartbeat = self.started + host.heartbeat_interval

    # -- what the supervisor does to it

    def received(self, message: Message) -> None:
        self.messages.append(message)
        if message.kind is Kind.STOP and self.script.obeys_stop:
            self._exit_soon(0, 0.05)
        elif message.kind in (Kind.STATS, Kind.PING) and self.ready_sent:
            self.conn.inbox.append(Message(Kind.REPLY, self.script.stats or {}, message.id).encode())

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.signalled_at.append(self.host.now)
        self._exit_soon(-signal.SIGKILL, 0.0)

    def terminate(self) -> None:
        self.signals.append(signal.SIGTERM)
        self.signalled_at.append(self.host.now)
        if self.script.obeys_term:
            self._exit_soon(-signal.SIGTERM, 0.0)

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.exitcode is None

    # -- what it does by itself

    def _exit_soon(self, code: int, delay: float) -> None:
        due = self.host.now + delay
        if self.exit_at is None or due < self.exit_at:
            self.exit_at, self.exit_code_due = due, code

    def next_event(self) -> float | None:
        if self.exitcode is not None:
            return None
        times = [t for t in (self.exit_at, self._ready_at(), self.next_heartbeat) if t is not None]
        return min(times) if times else None

    def _ready_at(self) -> float | None:
        if self.ready_sent or self.script.ready_after is None:
            return None
        return self.started + self.script.ready_after

    def act(self, now: float) -> None:
        """Do what is due at `now`."""
        if self.exitcode is not None:
            return
        if self.exit_at is not None and now >= self.exit_at:
            self.exitcode = self.exit_code_due
            return
        ready_at = self._ready_at()
        if ready_at is not None and now >= ready_at:
            self.ready_sent = True
            self.conn.inbox.append(Message(Kind.READY, self.script.stats or {}).encode())
            if self.script.heartbeats:
                self.next_heartbeat = now + self.host.heartbeat_interval
        if self.next_heartbeat is not None and now >= self.next_heartbeat:
            hung = self.script.hang_after is not None and now - self.started >= self.script.hang_after
            if hung:
                self.next_heartbeat = None
            else:
                body = (self.script.stats or {}) if self.ready_sent else {"problem": self.script.waiting}
                self.conn.inbox.append(Message(Kind.HEARTBEAT, body).encode())
                self.next_heartbeat = now + self.host.heartbeat_interval


class FakeHost:
    """Simulated time and processes, in the shape of `host.Host`."""

    def __init__(self, heartbeat_interval: float = 0.5):
        self.now = 1000.0
        self.heartbeat_interval = heartbeat_interval
        self.scripts: dict[str, list[Script]] = {}
        self.processes: list[FakeProcess] = []
        self.oom = 0
        self.start_failures = 0      # the next this-many start_process calls fail (fork: EAGAIN)
        self._pids = itertools.count(4000)

    # -- the Host interface

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.now

    @staticmethod
    def random() -> float:
        return 0.5   # no jitter: delays are exactly the backoff's

    def oom_kills(self) -> int:
        return self.oom

    on_spawned = staticmethod(lambda: None)

    def spawn(self, target, args: tuple, name: str) -> Spawn:
        """Starts at once: the returned Spawn is done."""
        job = Spawn(target, args, name)
        try:
            job.finish(*self.start_process(target, args, name))
        except OSError as exc:
            job.finish(error=exc)
        job.forkserver_pid = self.forkserver_pid
        return job

    forkserver_pid = 1
    dead_forkservers: set = set()

    def forkserver_sentinel(self):
        return None

    def forkserver_died(self, pid) -> bool:
        return pid in self.dead_forkservers

    def close(self) -> None:
        pass

    def start_process(self, target, args: tuple, name: str) -> tuple[FakeProcess, FakeConn]:
        if self.start_failures:
            self.start_failures -= 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        bot = name.removeprefix("dims-bot-")
        queue = self.scripts.get(bot) or [RUNS]
        script = queue.pop(0) if len(queue) > 1 else queue[0]
        process = FakeProcess(self, next(self._pids), bot, script, (target, *args))
        self.processes.append(process)
        return process, process.conn

    def wait(self, objects: list[Any], timeout: float) -> list[Any]:
        ready = self._ready(objects)
        if ready:
            return ready
        due = [t for p in self.processes if (t := p.next_event()) is not None]
        until = self.now + timeout
        if due and min(due) < until:
            until = min(due)
        self.now = max(self.now, until)
        for process in self.processes:
            process.act(self.now)
        return self._ready(objects)

    def _ready(self, objects: list[Any]) -> list[Any]:
        out = []
        for process in self.processes:
            if process.exitcode is not None and process.sentinel in objects:
                out.append(process.sentinel)
            if process.conn.inbox and process.conn in objects:
                out.append(process.conn)
        return out

    # -- for the tests

    def of(self, bot: str) -> list[FakeProcess]:
        return [p for p in self.processes if p.name == bot]

    def latest(self, bot: str) -> FakeProcess:
        return self.of(bot)[-1]


class FakeAgent:
    """The database agent: remembers events and desired states."""

    def __init__(self, desired: dict[str, str] | None = None):
        self.desired = dict(desired or {})
        self.events: list[tuple] = []
        self.saved: list[tuple[str, bool]] = []
        self.closed = False

    sentinel = None

    def start(self) -> None:
        pass

    def on_exit(self) -> None:
        pass

    @staticmethod
    def status() -> dict:
        return {"state": "up", "pid": 3999, "restarts": 0, "last_error": None, "down_s": None}

    def desired_states(self, names: list[str], timeout: float) -> dict[str, str]:
        return {name: self.desired.get(name, "running") for name in names}

    fleet = 0
    refusal: str | None = None   # what the database says of the next fleet it is asked to hold

    def budget_refusal(self, config, timeout: float) -> str | None:
        return self.refusal

    def record(self, bot, kind, message="", *, state_from=None, state_to=None, pid=None, **detail) -> None:
        self.events.append((bot, kind, message, state_from, state_to))

    def save_desired(self, name: str, running: bool) -> None:
        self.saved.append((name, running))
        self.desired[name] = "running" if running else "stopped"

    def close(self) -> None:
        self.closed = True

    def moves(self, bot: str) -> list[str]:
        return [to.value for b, kind, _, _, to in self.events if b == bot and kind == "state"]
