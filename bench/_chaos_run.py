"""One chaos run: a fleet under `python main.py` on the sandbox and a private PostgreSQL, users
sending numbered messages at a steady rate, a seeded schedule of faults, then a drain and the
checks. `run(options)` returns a `Result`; `bench/chaos.py` (many seeds) and `tests/test_chaos.py`
(one short run in CI) call it.

The checks, each named when it fails:
- lost: every message sent has a reply (after the drain), none answered with an apology;
- duplicates: a message answered twice only if it was in hand at a kill or a PostgreSQL crash:
  a kill-bot (of its bot), kill-forkserver or pg-restart after it was sent and at most MARK_WINDOW_S after
  its first answer (its done mark not yet written; done marks are committed without waiting for
  the disk, so a crash may also forget the last ones written);
- supervisor: main.py never exited;
- health: `system_health` ok at the end with every bot RUNNING;
- memory: the supervisor's RSS at the end within 5 MB of what it was once the fleet ran;
- zombies: no zombie child of main.py at the end;
- recovered: every fault that hit bots was followed by their answering again.

Imports `_fleet_common` (processes, config, the environment), `_chaos_faults`, `_chaos_traffic`,
the sandbox and the embedded PostgreSQL; the fleet is spoken to over its control socket only.
"""

from __future__ import annotations

import json
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, NamedTuple

import psycopg2

import _fleet_common as common
from _chaos_faults import KILLS, KINDS, Injector, Tracker, schedule
from _chaos_traffic import Ledger, ReplyReaders, Users
from multiprocess_connection_manager import EmbeddedPostgres
from telegram_sandbox import SandboxProcess

QUIET_END_S = 8.0          # no fault starts this close to the end of the chaos period
DRAIN_S = 90.0             # after the chaos, every message must be answered within this
HEALTH_S = 60.0            # ... and system_health be ok within this
RSS_MARGIN_KB = 5 * 1024
MARK_WINDOW_S = 1.0        # a done mark is written (durably: 3 x wal_writer_delay) within this of the answer
MONITOR_S = 0.5            # how often bot_list is read for the agent's state
SUPERVISOR = {"heartbeat_interval": 1, "heartbeat_timeout": 15, "backoff_initial": 0.05, "backoff_max": 5,
              "restart_window": 60, "restart_budget": 5, "fatal_cooldown": 300}


class Options(NamedTuple):
    seed: int = 1
    duration: float = 120.0
    bots: int = 3
    users: int = 6
    rate: float = 4.0
    kinds: tuple[str, ...] = KINDS
    gap: tuple[float, float] = (4.0, 8.0)


class Result(NamedTuple):
    seed: int
    sent: int
    lost: list[str]
    duplicates: int
    unexplained_duplicates: list[str]
    faults: list[dict]
    failures: list[str]          # the checks that failed, each with why
    rss_kb: tuple[int, int]

    @property
    def passed(self) -> bool:
        return not self.failures

    def recoveries(self) -> list[float]:
        return [f["recovery_s"] for f in self.faults if f["recovery_s"] is not None]

    def summary(self) -> str:
        rec = self.recoveries()
        survived = len([f for f in self.faults if not f["skipped"]])
        spread = f"recovery median {statistics.median(rec):.2f} s, max {max(rec):.2f} s" if rec else "no recovery measured"
        return (f"chaos seed={self.seed}: {survived} faults survived, lost {len(self.lost)} of {self.sent}, "
                f"duplicates {self.duplicates} (unexplained {len(self.unexplained_duplicates)}), {spread}, "
                f"supervisor RSS {self.rss_kb[0] / 1024:.1f} -> {self.rss_kb[1] / 1024:.1f} MB: "
                + ("PASS" if self.passed else "FAIL: " + "; ".join(self.failures)))


class ChaosFleet:
    """What the faults need: the tokens, the sandbox, the PostgreSQL, bot_list, the forkserver."""

    def __init__(self, fleet: common.DimsFleet, env: dict[str, str], tokens: dict[str, str],
                 sandbox: SandboxProcess, postgres: EmbeddedPostgres):
        self.fleet, self.process = fleet, fleet.process
        self.env, self.tokens, self.sandbox, self.postgres = env, tokens, sandbox, postgres

    def bot_list(self) -> dict:
        return self.fleet.request({"command": "bot_list"})

    def forkserver_pid(self) -> int | None:
        for pid in common.children(self.process.pid):
            if common.cmdline(pid).startswith("dims: forkserver"):
                return pid
        return None

    def cli(self, command: str) -> tuple[int, dict]:
        done = subprocess.run([sys.executable, str(common.REPO / "enhanced_ipc_commands.py"), command, "--json"],
                              env=self.env, capture_output=True, text=True, timeout=60)
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            return done.returncode, {"error": (done.stderr or done.stdout)[-500:]}


def _zombies(pid: int) -> list[int]:
    found = []
    for child in common.children(pid):
        try:
            state = pathlib.Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":
            found.append(child)
    return found


def _fresh_database(server: EmbeddedPostgres) -> str:
    dsn = server.ensure_running()
    admin = psycopg2.connect(psycopg2.extensions.make_dsn(dsn, dbname="postgres"))
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute('DROP DATABASE IF EXISTS "dims_chaos"')
            cur.execute('CREATE DATABASE "dims_chaos"')
    finally:
        admin.close()
    return psycopg2.extensions.make_dsn(dsn, dbname="dims_chaos")


def run(options: Options, say: Callable[[str], None] = print, log_path: pathlib.Path | None = None) -> Result:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="dims-chaos-"))
    workdir.chmod(0o755)   # the postgres OS user (under root) reaches its cluster below
    server = EmbeddedPostgres(workdir / "pg")
    names = [f"bot{n}" for n in range(1, options.bots + 1)]
    numbers = {name: 900 + n for n, name in enumerate(names, 1)}
    tokens = {name: common.token(n) for name, n in numbers.items()}
    try:
        dsn = _fresh_database(server)
        with SandboxProcess() as sandbox:
            env = common.environment(dsn, sandbox.api_url, workdir / "var", list(numbers.values()), None)
            config = common.write_dims_config(workdir / "dims.toml", numbers, SUPERVISOR)
            with common.dims_fleet(config, env, names, log_copy=log_path) as fleet:
                return _chaos(options, ChaosFleet(fleet, env, tokens, sandbox, server), fleet, say)
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def _chaos(options: Options, chaos: ChaosFleet, fleet: common.DimsFleet, say) -> Result:
    origin = time.monotonic()
    tracker = Tracker(say, origin)
    ledger = Ledger()
    ledger.listeners.append(tracker.on_first_reply)
    users = Users(chaos.sandbox, chaos.tokens, options.users, options.rate, ledger)
    readers = ReplyReaders(chaos.sandbox, chaos.tokens, users.chats(), ledger)
    injector = Injector(chaos, tracker)
    failures: list[str] = []
    rss_start = common.status_kb(chaos.process.pid)
    stop_monitor = threading.Event()

    def monitor() -> None:   # the agent's state, for the recovery of faults that killed it
        while not stop_monitor.wait(MONITOR_S):
            try:
                listing = chaos.bot_list()
                agent = listing["supervisor"]["database_agent"]
            except Exception:   # the supervisor busy or gone: the checks below say so
                continue
            tracker.on_agent(agent["state"], agent["pid"], time.monotonic())
            for bot in listing["bots"]:
                fleet.seen_pids.add(bot["pid"])

    watcher = threading.Thread(target=monitor, name="chaos-monitor", daemon=True)
    readers.start()
    users.start()
    watcher.start()
    plan = schedule(options.seed, options.kinds, options.duration, options.gap, QUIET_END_S)
    say(f"chaos seed={options.seed}: {options.bots} bots, {options.users} users at {options.rate:g} msg/s, "
        f"{len(plan)} faults over {options.duration:g} s")
    kill_times: list[tuple[float, str, set[str]]] = []   # the faults that may repeat an answer (KILLS), and whom
    try:
        for planned in plan:
            wait = origin + planned.at - time.monotonic()
            if wait > 0:
                time.sleep(wait)   # the schedule's own pace
            if chaos.process.poll() is not None:
                failures.append(f"supervisor: main.py exited with {chaos.process.returncode} during the chaos")
                break
            record = injector.inject(planned.number, planned.kind, random.Random(planned.seed))
            if record.kind in KILLS and not record.skipped:
                kill_times.append((record.start, record.kind, set(record.bots)))
            say(f"[{record.start - origin:6.1f} s] fault {record.number} {record.kind}: {record.what}")
        time.sleep(max(0.0, origin + options.duration - time.monotonic()))
    finally:
        users.stop()
        injector.resume_all()
        injector.clear_windows()
    say(f"[{time.monotonic() - origin:6.1f} s] chaos over; draining")
    if not ledger.wait_all_answered(DRAIN_S):
        say(f"not every message answered within {DRAIN_S:g} s of the end")
    stop_monitor.set()
    watcher.join(10)
    readers.stop()
    sent, _ = ledger.counts()
    lost = ledger.unanswered()
    if lost:
        failures.append(f"lost: {len(lost)} of {sent} unanswered ({', '.join(sorted(lost)[:10])})")
    if ledger.apologies:
        failures.append(f"lost: {len(ledger.apologies)} apologies (a handler failed)")
    duplicates = ledger.duplicates()
    unexplained = []
    for key, times in sorted(duplicates.items()):
        sent_at, bot = ledger.sent[key].at, ledger.sent[key].bot
        causes = [kind for at, kind, bots in kill_times if bot in bots and sent_at <= at <= times[0] + MARK_WINDOW_S]
        if not causes:
            unexplained.append(key)
        say(f"answered twice: {key} (sent at {sent_at - origin:.1f} s, answered at "
            f"{', '.join(f'{t - origin:.1f}' for t in times)} s; in hand at: {', '.join(causes) or 'nothing'})")
    if unexplained:
        failures.append(f"duplicates: {len(unexplained)} answered twice with no kill or crash in flight "
                        f"({', '.join(sorted(unexplained)[:10])})")
    if chaos.process.poll() is not None:
        failures.append(f"supervisor: main.py exited with {chaos.process.returncode}")
    else:
        deadline = time.monotonic() + HEALTH_S
        while True:
            code, health = chaos.cli("system_health")
            if code == 0 and health.get("status") == "ok" and all(b["state"] == "RUNNING" for b in health["bots"]):
                break
            if time.monotonic() > deadline:
                failures.append(f"health: not ok within {HEALTH_S:g} s: "
                                f"{json.dumps({k: health.get(k) for k in ('status', 'reason', 'supervisor', 'bots')})[:800]}")
                break
            time.sleep(1.0)   # a bounded poll: health has no event to wait on
        zombies = _zombies(chaos.process.pid)
        if zombies:
            failures.append(f"zombies: {zombies}")
    rss_end = common.status_kb(chaos.process.pid) if chaos.process.poll() is None else 0
    if rss_end - rss_start > RSS_MARGIN_KB:
        failures.append(f"memory: supervisor RSS grew {rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MB")
    faults = [r.as_dict(origin) for r in tracker.records]
    unrecovered = [f for f in faults if not f["skipped"] and (f["bots"] or f["agent"]) and f["recovery_s"] is None]
    if unrecovered:
        failures.append("recovered: no answer measured after " + ", ".join(f"fault {f['number']} {f['kind']}"
                                                                           for f in unrecovered))
    for problem in users.errors[:5] + readers.errors[:5]:
        say(f"traffic error: {problem}")
    result = Result(options.seed, sent, lost, len(duplicates), unexplained, faults, failures, (rss_start, rss_end))
    say(result.summary())
    return result
