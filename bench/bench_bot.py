"""How many messages a second one DIMS bot answers, against a bare python-telegram-bot echo bot.

Both bots run one after the other (never together) on the same Telegram sandbox process, each
in its own OS process, so neither shares a GIL with the load generator:
- the baseline: a bare PTB `Application` (PTB's own updater, no rate limiter, no database)
  whose one MessageHandler replies with the text it got;
- DIMS: `main.py --single`, durable inbox and PostgreSQL included (a private embedded server in
  a temporary directory, a fresh database, a roster of --profiles profiles), on two workloads
  that, like the echo, give one reply per message: `/start` (the profile count, a cache hit)
  and `/find <unique text>` (distinct texts miss the cache: a database read every time; nothing
  matches, so the reply is "Nothing matched ...").
The DIMS bot runs with `[telegram] max_rate = 0`: its default (30 messages/s, Telegram's flood
limit) would cap the replies by design, and the sandbox has no flood limit; the echo bot has
no rate limiter either. So the rows compare what the durable inbox and the database cost.

The load: --users simulated users on keep-alive connections to 127.0.0.1, closed loop (one
message in flight per user: POST /sandbox/send, then GET /sandbox/messages?wait= until the
reply is visible, then the next message). A warm-up first (its first reply is also the
readiness check), then --messages messages per workload, cut at --max-seconds. It prints
messages/s, the round trip (send -> reply visible) p50/p99, the bot process's CPU, and each
DIMS row's ratio to the echo's messages/s (target 0.7x or better: reported, not asserted).

    python bench/bench_bot.py [--messages 3000] [--users 20] [--max-seconds 8]

About a minute. Stops every process it started and removes its temporary directory, also on
Ctrl-C or an error. Exit status 0; 1 if a reply was wrong or missing or a bot did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Callable, Iterator

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402 (the repository's modules below need sys.path first)
import psycopg2.extensions  # noqa: E402

from multiprocess_connection_manager import DatabaseError, EmbeddedPostgres  # noqa: E402
from telegram_sandbox import SandboxProcess  # noqa: E402

import _common  # noqa: E402 (beside this file)
from _common import cpu_seconds  # noqa: E402

# Fake tokens with 7-digit bot ids, so nothing mistakes them for real ones.
ECHO_TOKEN = "7100002:AAFakeBenchToken_echo000000000000000"
DIMS_TOKEN = "7100001:AAFakeBenchToken_dims000000000000000"
DIMS_TOKEN_ENV = "DIMS_BENCH_TOKEN"
DIMS_DATABASE = "dims_bench"
TARGET_RATIO = 0.7

START_TIMEOUT_S = 60.0       # a bot's first reply (start-up, migrations) within this
REPLY_TIMEOUT_S = 10.0       # any later reply within this
STOP_TIMEOUT_S = 15.0        # SIGTERM -> exit within this, else SIGKILL
MESSAGES_WAIT_S = 5.0        # one long poll on /sandbox/messages
STARTUP_WAIT_S = 1.0         # ... while a bot starts: between checks that it is still alive
REQUEST_TIMEOUT_S = 10.0     # the sandbox answers any request (beyond its long-poll wait) within this

SERIALS = itertools.count()  # every message of the run gets its own number: /find texts are unique


class BenchError(Exception):
    """The bench cannot go on: a bot did not start, a reply is missing."""


# --------------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    token: str
    command: str     # "/start" is sent as is; otherwise command + a unique text
    expect: str      # the reply starts with this; "" means: the reply equals the message

    def text(self, user: int) -> str:
        if self.command == "/start":
            return "/start"
        return f"{self.command}bench u{user} n{next(SERIALS)}"

    def matches(self, sent: str, reply: str) -> bool:
        return reply.startswith(self.expect) if self.expect else reply == sent


ECHO = Workload("bare PTB echo (text -> same text)", ECHO_TOKEN, "", "")
DIMS_START = Workload("DIMS /start (cached count)", DIMS_TOKEN, "/start", "Hi! I'm")
DIMS_FIND = Workload("DIMS /find <unique> (DB read)", DIMS_TOKEN, "/find ", "Nothing matched")


@dataclasses.dataclass
class Phase:
    """What one workload's measured phase produced."""
    workload: Workload
    round_trips: list[float] = dataclasses.field(default_factory=list)
    wrong: list[str] = dataclasses.field(default_factory=list)
    elapsed: float = 0.0
    cpu_s: float | None = None   # the bot process's CPU time during the phase

    @property
    def count(self) -> int:
        return len(self.round_trips)

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed else 0.0

    def ms(self, percentile: int) -> float | None:
        if self.count < 2:
            return None
        return 1000 * statistics.quantiles(self.round_trips, n=100)[percentile - 1]


@dataclasses.dataclass(frozen=True)
class BotProcess:
    """A running bot: its pid and a liveness check, for CPU figures and fast failure."""
    name: str
    pid: int
    alive: Callable[[], bool]


# --------------------------------------------------------------------------- load generator


class Connection(_common.Connection):
    """A keep-alive connection to the sandbox whose requests have a deadline."""

    async def request(self, method: str, path: str, body: bytes = b"",
                      timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict]:
        """(status, JSON body); BenchError when the sandbox does not answer within `timeout`."""
        try:
            return await asyncio.wait_for(super().request(method, path, body), timeout)
        except asyncio.TimeoutError:
            raise BenchError(f"the sandbox did not answer {method} {path.split('?')[0]} "
                             f"within {timeout:g} s") from None


async def send_and_wait(connection: Connection, bot: BotProcess, token: str, user: int,
                        text: str, timeout: float, wait: float) -> tuple[float, str]:
    """Send one user message; (round trip in s, reply text) once the reply is visible."""
    body = json.dumps({"token": token, "user_id": user, "text": text}).encode()
    started, deadline = time.perf_counter(), time.monotonic() + timeout
    status, sent = await connection.request("POST", "/sandbox/send", body)
    if status != 200:
        raise BenchError(f"/sandbox/send answered {status}: {sent}")
    query = {"token": token, "chat_id": user, "after_seq": sent["seq"]}
    while (left := deadline - time.monotonic()) > 0:
        if not bot.alive():
            raise BenchError(f"the {bot.name} process exited")
        query["wait"] = f"{min(left, wait):.3f}"
        status, answer = await connection.request(
            "GET", "/sandbox/messages?" + urllib.parse.urlencode(query),
            timeout=min(left, wait) + REQUEST_TIMEOUT_S)
        if status != 200:
            raise BenchError(f"/sandbox/messages answered {status}: {answer}")
        if answer["messages"]:
            return time.perf_counter() - started, answer["messages"][0].get("text", "")
    raise BenchError(f"{bot.name}: user {user} got no reply to {text!r} within {timeout:g} s")


async def user_loop(host: str, port: int, phase: Phase, bot: BotProcess, user: int, count: int,
                    stop_at: float, timeout: float, wait: float) -> None:
    """One simulated user: `count` messages, each sent once the previous one was answered."""
    connection = Connection(host, port)
    try:
        for _ in range(count):
            if time.monotonic() >= stop_at:
                return
            text = phase.workload.text(user)
            round_trip, reply = await send_and_wait(connection, bot, phase.workload.token, user,
                                                    text, timeout, wait)
            phase.round_trips.append(round_trip)
            if not phase.workload.matches(text, reply):
                phase.wrong.append(f"user {user}: {text!r} -> {reply[:80]!r}")
    finally:
        connection.close()


async def drive(url: str, workload: Workload, bot: BotProcess, users: int, per_user: int,
                max_seconds: float, timeout: float = REPLY_TIMEOUT_S,
                wait: float = MESSAGES_WAIT_S) -> Phase:
    """All users at once, closed loop; the phase ends when they are done or time is up."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    phase = Phase(workload)
    started, stop_at = time.perf_counter(), time.monotonic() + max_seconds
    await asyncio.gather(*(user_loop(host, int(port), phase, bot, 1000 + u, per_user, stop_at,
                                     timeout, wait) for u in range(users)))
    phase.elapsed = time.perf_counter() - started
    return phase


def measure(url: str, workload: Workload, bot: BotProcess, args: argparse.Namespace) -> Phase:
    """First reply (the bot is up), warm-up, then the measured phase with the bot's CPU time."""
    asyncio.run(drive(url, workload, bot, 1, 1, START_TIMEOUT_S, START_TIMEOUT_S, STARTUP_WAIT_S))
    if args.warmup:
        asyncio.run(drive(url, workload, bot, args.users, args.warmup, args.max_seconds))
    cpu_before = cpu_seconds(bot.pid)
    phase = asyncio.run(drive(url, workload, bot, args.users, math.ceil(args.messages / args.users),
                              args.max_seconds))
    cpu_after = cpu_seconds(bot.pid)
    if cpu_before is not None and cpu_after is not None:
        phase.cpu_s = cpu_after - cpu_before
    return phase


# --------------------------------------------------------------------------- the bare echo bot


def run_echo_bot(token: str, api_url: str) -> None:
    """The baseline, in its own process: PTB's updater, one handler, no rate limiter."""
    import logging

    from telegram.ext import ApplicationBuilder, MessageHandler, filters

    logging.basicConfig(level=logging.WARNING)

    async def echo(update, context) -> None:
        await update.effective_message.reply_text(update.effective_message.text)

    app = (ApplicationBuilder().token(token).base_url(api_url)
           .base_file_url(api_url.removesuffix("/bot") + "/file/bot").build())
    app.add_handler(MessageHandler(filters.TEXT, echo))
    app.run_polling(poll_interval=0, timeout=30)   # returns on SIGTERM or SIGINT


@contextlib.contextmanager
def echo_bot(api_url: str) -> Iterator[BotProcess]:
    """The echo bot's process; stopped (SIGTERM, deadline, SIGKILL) on the way out."""
    process = multiprocessing.get_context("spawn").Process(
        target=run_echo_bot, args=(ECHO_TOKEN, api_url), name="bench-echo-bot")
    process.start()
    try:
        yield BotProcess("echo bot", process.pid, process.is_alive)
    finally:
        process.terminate()
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join(STOP_TIMEOUT_S)


# --------------------------------------------------------------------------- DIMS


def create_database(server_dsn: str) -> str:
    """A fresh database on the embedded server; its DSN."""
    admin = psycopg2.connect(psycopg2.extensions.make_dsn(server_dsn, dbname="postgres"))
    try:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{DIMS_DATABASE}"')
    finally:
        admin.close()
    return psycopg2.extensions.make_dsn(server_dsn, dbname=DIMS_DATABASE)


def dims_environment(workdir: pathlib.Path, dsn: str, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DIMS_CONFIG", "DIMS_SOCKET", "BOT_TOKEN")}
    env.update({"DATABASE_URL": dsn, "TELEGRAM_API_URL": api_url,
                "DIMS_DATA_DIR": str(workdir / "data"), DIMS_TOKEN_ENV: DIMS_TOKEN})
    return env


def seed_roster(workdir: pathlib.Path, env: dict[str, str], profiles: int) -> None:
    """`profiles` profiles through the operator CLI (which applies the migrations first)."""
    rows = [{"name": f"Bench Profile {n:04d}", "bio": f"Profile {n} of the bot benchmark.",
             "tags": ["bench", f"group{n % 10}"]} for n in range(profiles)]
    path = workdir / "roster.json"
    path.write_text(json.dumps(rows))
    result = subprocess.run([sys.executable, str(REPO / "enhanced_ipc_commands.py"), "girls_import",
                             str(path), "--json"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=START_TIMEOUT_S)
    if result.returncode != 0:
        raise BenchError(f"seeding the roster failed ({result.returncode}): "
                         f"{result.stderr.strip() or result.stdout.strip()}")


@contextlib.contextmanager
def dims_bot(workdir: pathlib.Path, env: dict[str, str]) -> Iterator[BotProcess]:
    """`main.py --single` in its own process; its log goes to a file, shown if it dies."""
    config = workdir / "dims.toml"
    config.write_text(f'[telegram]\nmax_rate = 0\n\n[[bots]]\nname = "bench"\ntoken_env = "{DIMS_TOKEN_ENV}"\n'
                      f'display_name = "Bench"\n')
    command = [sys.executable, str(REPO / "main.py"), "--single", "--config", str(config),
               "--log-level", "WARNING"]
    log_path = workdir / "dims-bot.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    try:
        yield BotProcess("DIMS bot", process.pid, lambda: process.poll() is None)
    except BenchError as exc:
        if process.poll() is None:
            raise
        tail = " | ".join(log_path.read_text(errors="replace").splitlines()[-5:])
        raise BenchError(f"{exc} (status {process.returncode}): {tail}") from None
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> list[Phase]:
    """Embedded PostgreSQL, the sandbox, then each bot in turn; everything stopped after."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="dims-bench-"))
    workdir.chmod(0o755)   # as root the embedded server runs as the postgres user
    server = None
    try:
        server = EmbeddedPostgres(workdir)
        dsn = create_database(server.ensure_running())
        with SandboxProcess() as sandbox:
            with echo_bot(sandbox.api_url) as bot:
                phases = [measure(sandbox.url, ECHO, bot, args)]
            env = dims_environment(workdir, dsn, sandbox.api_url)
            seed_roster(workdir, env, args.profiles)
            with dims_bot(workdir, env) as bot:
                phases += [measure(sandbox.url, w, bot, args) for w in (DIMS_START, DIMS_FIND)]
        return phases
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


COLUMNS = (f"{'msgs':>5} {'msgs/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU %':>6} {'CPU ms/msg':>10} "
           f"{'vs echo':>7}")


def row(phase: Phase, baseline: float, width: int) -> str:
    """One table line; CPU is the bot process's: % of one core, and ms per answered message."""
    cpu = per_msg = "-"
    if phase.cpu_s is not None and phase.count:
        cpu = f"{100 * phase.cpu_s / phase.elapsed:.0f}"
        per_msg = f"{1000 * phase.cpu_s / phase.count:.2f}"
    ratio = f"{phase.rate / baseline:.2f}x" if baseline else "-"
    return (f"{phase.workload.name:<{width}}  {phase.count:>5} {phase.rate:>7.1f} "
            f"{_ms(phase.ms(50)):>7} {_ms(phase.ms(99)):>7} {cpu:>6} {per_msg:>10} {ratio:>7}")


def report(phases: list[Phase], args: argparse.Namespace, load_before: float) -> str:
    baseline = phases[0].rate
    width = max(len(p.workload.name) for p in phases)
    lines = [
        f"DIMS bot vs a bare python-telegram-bot echo bot: one Telegram sandbox process, one bot "
        f"at a time, {args.users} users in a closed loop (1 message in flight each), 127.0.0.1",
        f"machine: {os.cpu_count()} cores shared by the load generator, the sandbox, the bot and "
        f"(DIMS) PostgreSQL; load average before the run {load_before:.2f}",
        "",
        f"{'workload':<{width}}  {COLUMNS}",
        *(row(phase, baseline, width) for phase in phases),
        "",
        f"target: DIMS at {TARGET_RATIO}x of the echo's msgs/s or better:",
    ]
    lines += [f"  {p.workload.name.removeprefix('DIMS ')}: {p.rate / baseline:.2f}x "
              f"({'met' if p.rate / baseline >= TARGET_RATIO else 'missed'})"
              for p in phases[1:] if baseline]
    lines += [
        "notes: DIMS rows include the durable inbox (store, mark done) and the database; the bot",
        "  runs with [telegram] max_rate = 0 (no overall flood limit, as the echo bot has none).",
        "  CPU % and CPU ms/msg: the bot process alone (% of one core). Other load on the",
        "  machine moves the figures, the short echo phase most: compare runs, not single rows.",
    ]
    for phase in phases:
        lines += [f"WRONG REPLY {phase.workload.name}: {wrong}" for wrong in phase.wrong[:5]]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000,
                        help="measured messages per workload, cut at --max-seconds (default 3000)")
    parser.add_argument("--users", type=int, default=20, help="simulated users (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="unmeasured messages per user before each workload (default 5)")
    parser.add_argument("--max-seconds", type=float, default=8.0,
                        help="cut each measured phase after this long (default 8)")
    parser.add_argument("--profiles", type=int, default=100,
                        help="profiles in the DIMS roster (default 100)")
    args = parser.parse_args(argv)
    if not 1 <= args.users <= 200 or args.messages < args.users or not 0 <= args.warmup <= 20:
        parser.error("--users must be 1-200, --messages at least --users, --warmup 0-20")
    if not 0 < args.max_seconds <= 15 or not 0 <= args.profiles <= 10_000:
        parser.error("--max-seconds must be in (0, 15] (the run stays near a minute), "
                     "--profiles 0-10000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    interrupted: list[int] = []

    def on_sigint(signum, frame) -> None:
        # A terminal's Ctrl-C also reaches the bots, which may stop before this process does:
        # remember it, so the report says "interrupted" rather than "the bot exited".
        interrupted.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        phases = run(args)
    except (BenchError, DatabaseError, RuntimeError, KeyboardInterrupt) as exc:
        if interrupted:
            print("bench_bot: interrupted; everything it started is stopped", file=sys.stderr)
            return 130
        print(f"bench_bot: {exc}", file=sys.stderr)
        return 1
    print(report(phases, args, load_before))
    return 1 if any(phase.wrong for phase in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
