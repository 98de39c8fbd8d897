"""The chaos bench's faults: what each kind does to a running fleet, the seeded schedule that
picks them, and the tracker that measures how long each took to get over.

Kinds (`KINDS`, the names `--faults` takes):

| kind | what it does | affects |
| --- | --- | --- |
| `kill-bot` | SIGKILL of a random RUNNING bot's process | that bot |
| `kill-agent` | SIGKILL of the supervisor's database agent | the agent |
| `kill-forkserver` | SIGKILL of the forkserver (its bots and the agent die with it) | every bot, the agent |
| `pg-stop` | PostgreSQL stopped (fast shutdown) for 3-5 s, then started | every bot |
| `pg-restart` | `pg_ctl restart -m immediate` (a crash, then recovery) | every bot |
| `sigstop-bot` | SIGSTOP of a random bot for 3 s, then SIGCONT | that bot |
| `telegram-502` | 2 s in which every Bot API call answers 502, for one bot or all | those bots |
| `telegram-disconnect` | 2 s of connections dropped unanswered | those bots |
| `telegram-slow` | 2 s of answers 1-2 s late | those bots |
| `telegram-429` | 2 s of 429 with retry_after 1 | those bots |

The processes are found as an operator would: the bots' and the agent's pids from
`enhanced_ipc_commands.py bot_list --json` (its `supervisor.database_agent`), the forkserver as
the child of main.py whose command line says so (`dims: forkserver`). A signal goes through a
pidfd to the process seen, never to a pid reused since. PostgreSQL is driven with pg_ctl as the
OS user that runs it (`postgres` under root). The Telegram windows are the sandbox's
`/sandbox/fault` with `for_s`.

A fault's recovery time runs from its end (the kill; the restart; SIGCONT; the window's close)
until every bot it affects has given a message its first answer after that end (a message sent
during the fault or after it; and, for a fault that killed the agent, until bot_list shows a new
agent up).

Used by `_chaos_run.py`. Imports `_fleet_common` (processes in /proc) and the embedded
PostgreSQL's binary finder; never the bots or the supervisor.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from typing import Any, Callable, NamedTuple, Protocol

import _fleet_common as common
from multiprocess_connection_manager import EmbeddedPostgres
from embedded_postgres import find_postgres_bin

WINDOW_S = 2.0              # a Telegram fault window
SIGSTOP_S = 3.0             # a bot stopped this long (heartbeat_timeout is 15 s)
PG_DOWN_S = (3.0, 5.0)      # PostgreSQL stopped this long
AGENT_WAIT_S = 10.0         # a kill-agent waits this long for an agent to kill
PG_CTL_TIMEOUT_S = 60.0
KILLS = ("kill-bot", "kill-forkserver", "pg-restart")   # faults that may make a bot answer a message twice


class Fleet(Protocol):
    """What the faults need of the running system (`_chaos_run.ChaosFleet`)."""
    tokens: dict[str, str]
    sandbox: Any
    postgres: EmbeddedPostgres

    def bot_list(self) -> dict: ...
    def forkserver_pid(self) -> int | None: ...


class FaultRecord:
    """One fault: what, when (time.monotonic()), whom, and when each affected part was back."""

    def __init__(self, number: int, kind: str, start: float, what: str, bots: list[str],
                 agent_pid: int | None = None):
        self.number, self.kind, self.start, self.what = number, kind, start, what
        self.end = start
        self.bots = bots
        self.agent_pid = agent_pid                # the agent killed (None: the agent was not hit)
        self.answered: dict[str, float] = {}     # bot -> when it answered again
        self.agent_back: float | None = None
        self.skipped = False

    @property
    def recovered_at(self) -> float | None:
        if set(self.answered) != set(self.bots) or (self.agent_pid is not None and self.agent_back is None):
            return None
        return max([*self.answered.values(), *([self.agent_back] if self.agent_pid is not None else [])],
                   default=self.end)

    @property
    def recovery_s(self) -> float | None:
        at = self.recovered_at
        return None if at is None else max(at - self.end, 0.0)

    def as_dict(self, origin: float) -> dict:
        return {"number": self.number, "kind": self.kind, "what": self.what,
                "at_s": round(self.start - origin, 2), "end_s": round(self.end - origin, 2),
                "bots": self.bots, "agent": self.agent_pid is not None, "skipped": self.skipped,
                "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2)}


class Tracker:
    """The faults injected so far, and when each affected bot (or the agent) was back; told of
    every first reply (a Ledger listener) and of every bot_list the monitor reads."""

    def __init__(self, say: Callable[[str], None], origin: float):
        self.say, self.origin = say, origin
        self.records: list[FaultRecord] = []
        self._lock = threading.Lock()

    def add(self, record: FaultRecord) -> None:
        with self._lock:
            self.records.append(record)

    def on_first_reply(self, key: str, sent: Any, now: float) -> None:
        """A message unanswered until now: `sent.at` is when it went out. It counts for a fault
        that began before it was answered and ended by now."""
        with self._lock:
            for record in self.records:
                if sent.bot in record.bots and sent.bot not in record.answered and now >= record.end:
                    record.answered[sent.bot] = now
                    self._maybe_done(record)

    def on_agent(self, state: str, pid: int | None, now: float) -> None:
        with self._lock:
            for record in self.records:
                if (record.agent_pid is not None and record.agent_back is None and now >= record.end
                        and state == "up" and pid not in (None, record.agent_pid)):
                    record.agent_back = now
                    self._maybe_done(record)

    def _maybe_done(self, record: FaultRecord) -> None:
        if record.recovery_s is not None and not record.skipped:
            self.say(f"[{record.recovered_at - self.origin:6.1f} s] fault {record.number} {record.kind}: "
                     f"answering again {record.recovery_s:.2f} s after its end")


# --------------------------------------------------------------------------- signals and pg_ctl


def signal_process(pid: int, ticks: int | None, sig: int) -> bool:
    """Send sig to the process seen as (pid, start ticks), through a pidfd; False if it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not common.alive(pid, ticks):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def pg_ctl(server: EmbeddedPostgres, *args: str) -> subprocess.CompletedProcess:
    """pg_ctl ARGS -D the cluster, as the OS user that runs the server (PostgreSQL refuses root)."""
    extra: dict[str, Any] = {}
    env = dict(os.environ)
    if server.run_as is not None:
        extra = {"user": server.run_as.pw_uid, "group": server.run_as.pw_gid, "extra_groups": []}
        env.update(HOME=server.run_as.pw_dir, USER="postgres", LOGNAME="postgres")
    return subprocess.run([str(find_postgres_bin() / "pg_ctl"), *args, "-D", str(server.pgdata)],
                          capture_output=True, text=True, timeout=PG_CTL_TIMEOUT_S + 5, cwd=server.root, env=env,
                          start_new_session=True, **extra)


# --------------------------------------------------------------------------- the kinds


class Injector:
    """Injects one fault of a kind into the fleet; blocks for the faults that last (PostgreSQL
    down, a stopped bot), not for the Telegram windows (the sandbox closes them)."""

    def __init__(self, fleet: Fleet, tracker: Tracker, clock: Callable[[], float] = time.monotonic):
        self.fleet, self.tracker, self.clock = fleet, tracker, clock
        self.stopped: dict[int, int | None] = {}   # SIGSTOPped pids (-> start ticks), until SIGCONT
        self.windows = {"telegram-502": {"status": 502}, "telegram-disconnect": {"kind": "disconnect"},
                        "telegram-slow": {"kind": "slow"}, "telegram-429": {"status": 429, "retry_after": 1}}

    def inject(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        method = getattr(self, "_" + kind.replace("-", "_"), None) or self._window
        record = method(number, kind, rng)
        self.tracker.add(record)
        return record

    def _running_bots(self) -> list[tuple[str, int]]:
        return [(bot["name"], bot["pid"]) for bot in self.fleet.bot_list()["bots"]
                if bot["state"] == "RUNNING" and bot["pid"]]

    def _pick_bot(self, number: int, kind: str, rng: random.Random) -> tuple[str, int, int | None] | FaultRecord:
        running = sorted(self._running_bots())
        if not running:
            return self._skip(number, kind, "no bot is RUNNING")
        name, pid = rng.choice(running)
        return name, pid, common.start_ticks(pid)

    def _skip(self, number: int, kind: str, why: str) -> FaultRecord:
        record = FaultRecord(number, kind, self.clock(), f"skipped: {why}", [])
        record.skipped = True
        return record

    def _signal_bot(self, number: int, kind: str, rng: random.Random, signum: int):
        """Send `signum` to a random RUNNING bot: (name, pid, start ticks, when), or the skip record."""
        picked = self._pick_bot(number, kind, rng)
        if isinstance(picked, FaultRecord):
            return picked
        name, pid, ticks = picked
        start = self.clock()
        if not signal_process(pid, ticks, signum):
            return self._skip(number, kind, f"bot {name}'s process {pid} was gone")
        return name, pid, ticks, start

    def _kill_bot(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        signalled = self._signal_bot(number, kind, rng, signal.SIGKILL)
        if isinstance(signalled, FaultRecord):
            return signalled
        name, pid, _, start = signalled
        return FaultRecord(number, kind, start, f"kill -9 bot {name} (pid {pid})", [name])

    def _kill_agent(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        deadline = self.clock() + AGENT_WAIT_S
        while True:
            agent = self.fleet.bot_list()["supervisor"]["database_agent"]
            if agent["state"] == "up" and agent["pid"]:
                break
            if self.clock() > deadline:
                return self._skip(number, kind, f"no database agent up within {AGENT_WAIT_S:g} s")
            time.sleep(0.2)   # a bounded poll: bot_list is the only place that says
        pid = agent["pid"]
        start = self.clock()
        if not signal_process(pid, common.start_ticks(pid), signal.SIGKILL):
            return self._skip(number, kind, f"the agent's process {pid} was gone")
        return FaultRecord(number, kind, start, f"kill -9 database agent (pid {pid})", [], agent_pid=pid)

    def _kill_forkserver(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        pid = self.fleet.forkserver_pid()
        if pid is None:
            return self._skip(number, kind, "no forkserver found under main.py")
        agent = self.fleet.bot_list()["supervisor"]["database_agent"]
        start = self.clock()
        if not signal_process(pid, common.start_ticks(pid), signal.SIGKILL):
            return self._skip(number, kind, f"the forkserver {pid} was gone")
        return FaultRecord(number, kind, start, f"kill -9 forkserver (pid {pid}): its bots and agent die with it",
                           list(self.fleet.tokens), agent_pid=agent["pid"] or -1)

    def _pg_stop(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        down_s = rng.uniform(*PG_DOWN_S)
        record = FaultRecord(number, kind, self.clock(), f"PostgreSQL stopped for {down_s:.1f} s", list(self.fleet.tokens))
        self.tracker.say(self._line(record))
        self.fleet.postgres.stop()
        time.sleep(max(0.0, record.start + down_s - self.clock()))   # the fault's length
        self.fleet.postgres.ensure_running()
        record.end = self.clock()
        record.what += f" (started again {record.end - record.start:.1f} s after the stop)"
        return record

    def _pg_restart(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        record = FaultRecord(number, kind, self.clock(), "PostgreSQL restarted (pg_ctl restart -m immediate)",
                             list(self.fleet.tokens))
        result = pg_ctl(self.fleet.postgres, "restart", "-w", "-m", "immediate", "-t", str(int(PG_CTL_TIMEOUT_S)),
                        "-l", str(self.fleet.postgres.log_file))
        record.end = self.clock()
        if result.returncode != 0:
            record.what += f"; pg_ctl failed: {(result.stderr or result.stdout).strip()[:200]}"
            self.fleet.postgres.ensure_running()
            record.end = self.clock()
        record.what += f" (accepting again after {record.end - record.start:.1f} s)"
        return record

    def _sigstop_bot(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        signalled = self._signal_bot(number, kind, rng, signal.SIGSTOP)
        if isinstance(signalled, FaultRecord):
            return signalled
        name, pid, ticks, start = signalled
        self.stopped[pid] = ticks
        record = FaultRecord(number, kind, start, f"SIGSTOP bot {name} (pid {pid}) for {SIGSTOP_S:g} s", [name])
        self.tracker.say(self._line(record))
        time.sleep(max(0.0, start + SIGSTOP_S - self.clock()))   # the fault's length
        self.resume(pid)
        record.end = self.clock()
        return record

    def resume(self, pid: int) -> None:
        """SIGCONT a bot this injector stopped (harmless when it is gone)."""
        ticks = self.stopped.pop(pid, None)
        signal_process(pid, ticks, signal.SIGCONT)

    def resume_all(self) -> None:
        for pid in list(self.stopped):
            self.resume(pid)

    def _window(self, number: int, kind: str, rng: random.Random) -> FaultRecord:
        fault = dict(self.windows[kind])
        if kind == "telegram-slow":
            fault["delay"] = round(rng.uniform(1.0, 2.0), 1)
        bots = list(self.fleet.tokens) if rng.random() < 0.5 else [rng.choice(sorted(self.fleet.tokens))]
        start = self.clock()
        for bot in bots:
            self.fleet.sandbox.fault(self.fleet.tokens[bot], "*", for_s=WINDOW_S, **fault)
        record = FaultRecord(number, kind, start, f"{WINDOW_S:g} s of {describe_window(fault)} for "
                             f"{'every bot' if len(bots) > 1 else 'bot ' + bots[0]}", bots)
        record.end = start + WINDOW_S
        return record

    def clear_windows(self) -> None:
        for token in self.fleet.tokens.values():
            self.fleet.sandbox.fault(token, "*", times=0)

    @staticmethod
    def _line(record: FaultRecord) -> str:
        return f"fault {record.number} {record.kind}: {record.what}"


def describe_window(fault: dict) -> str:
    if fault.get("kind") == "disconnect":
        return "dropped connections"
    if fault.get("kind") == "slow":
        return f"answers {fault['delay']:g} s late"
    if fault.get("status") == 429:
        return f"429 (retry_after {fault['retry_after']})"
    return f"{fault['status']}s"


KINDS = ("kill-bot", "kill-agent", "kill-forkserver", "pg-stop", "pg-restart", "sigstop-bot",
         "telegram-502", "telegram-disconnect", "telegram-slow", "telegram-429")


# --------------------------------------------------------------------------- the schedule


class Planned(NamedTuple):
    number: int
    at: float                # seconds after the chaos began
    kind: str
    seed: int                # for the fault's own choices (which bot, how long)


def schedule(seed: int, kinds: tuple[str, ...], duration: float, gap: tuple[float, float],
             quiet_end: float) -> list[Planned]:
    """One fault every gap[0]-gap[1] s (uniform) from the start until `quiet_end` s before the
    end, the kinds drawn as from a bag: every kind once, in a random order, then again, so a
    run of len(kinds) faults has each kind once."""
    rng = random.Random(seed)
    planned: list[Planned] = []
    bag: list[str] = []
    at = rng.uniform(*gap) / 2
    while at <= duration - quiet_end:
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        planned.append(Planned(len(planned) + 1, round(at, 2), bag.pop(), rng.randrange(2**32)))
        at += rng.uniform(*gap)
    return planned
