"""How fast a DIMS fleet comes back from kill -9, how fast `bot_list` answers, and what the
supervisor and each bot cost in memory - each against a baseline measured in the same run.

One private PostgreSQL (embedded, in a temporary directory, a fresh database) and one Telegram
sandbox process serve two phases:

1. Side by side, with different bots (tokens): DIMS (`main.py --multi`, --bots bots) and the
   baseline, supervisord (PyPI `supervisor`) with one program per bot, each
   `python main.py --single --bot NAME` (autorestart=true, startsecs=1). Alternating between
   the two, so both see the same machine load:
   - kill -9, --kills times each: SIGKILL the first bot's process (DIMS: pid from the control
     socket; supervisord: from its XML-RPC), at once send `/start` from a new sandbox user, and
     time until the reply is visible in `/sandbox/messages?wait=`. Then wait until the bot is
     RUNNING again (DIMS: the control socket's `wait`; supervisord: its "entered RUNNING state"
     log line, i.e. startsecs passed) before the next kill.
   - `dims bot_list` vs `supervisorctl -c CONF status`, each as a whole new process (`python
     SCRIPT ...`), --runs times each (after one unmeasured round). Both scripts are launchers
     that import the CLI's modules (supervisorctl's is pip's console-script wrapper). DIMS's CLI
     script itself, `python enhanced_ipc_commands.py bot_list`, is measured too and reported
     beside them: Python compiles the script it starts with on every run (5-7 ms here).
   - the supervisor's VmRSS: main.py's vs supervisord's, both running --bots bots.
2. Memory: a DIMS fleet of --fleet-size bots and one standalone `main.py --single` bot beside
   it, each having answered one `/start`: every bot process's PSS (/proc/PID/smaps_rollup),
   the forkserver's, and the standalone process's RSS and PSS.

Fairness: every process gets bytecode caching (PYTHONPYCACHEPREFIX in the temporary directory,
PYTHONDONTWRITEBYTECODE dropped), as on an ordinary install - supervisor's pip-installed
modules have .pyc files, the repository's would otherwise be compiled on every start - and a
first, unmeasured round of phase 1 (both systems up, one kill, one CLI run each) fills that
cache, so no measured process pays for compiling (which also leaves its heap larger). When
this shell sets PYTHONDONTWRITEBYTECODE, bot_list and phase 2 are also reported with it. The DIMS
[supervisor] table sets stable_after = 0 and a restart_budget the kills cannot spend, so every
kill is measured as the first crash of a stable bot (restart after backoff_initial, left at its
default), as supervisord treats a process past startsecs; with the defaults, kills a second
apart would rightly back off and go FATAL after 5.

    python -m pip install supervisor      # the baseline; without it only DIMS is measured
    python bench/bench_fleet.py [--kills 15] [--runs 20] [--bots 2] [--fleet-size 10]
                                [--skip-supervisord] [--dims-log FILE --dims-log-level DEBUG]

Finishes in 60-80 s on 2 cores; stops every process it started (supervisord and leftovers
included) and removes its temporary directory, also on Ctrl-C or an error. Prints one table:
measure, DIMS, baseline, baseline/DIMS, target, met. Exit status 0, or 1 if something did not
start, answer or stop (the targets are reported, not asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import _fleet_common as common  # noqa: E402 (puts the repository on sys.path too)
from _fleet_common import REPO, BenchError  # noqa: E402
from telegram_sandbox import SandboxClient, SandboxError, SandboxProcess  # noqa: E402

REPLY_TIMEOUT_S = 30.0       # kill -> reply, and any /start -> reply of a running bot
START_REPLY_TIMEOUT_S = common.START_TIMEOUT_S   # a bot's first reply (start-up included)
CLI_TIMEOUT_S = 20.0         # one operator command
USER_ID = 4242               # the sandbox user who sends the readiness /start
KILL_USERS = 100_000         # kill round k: user KILL_USERS + k (DIMS), 2 * KILL_USERS + k (baseline)
WARM_UP_USERS = 300_000      # the same for the unmeasured round
SV_TOKENS = 100              # token numbers: DIMS 0.., supervisord 100.., memory phase 200..
MEMORY_TOKENS = 200
MB = 1024.0                  # kB per MB (MiB, as /proc counts)
BENCH_SUPERVISOR = {"stable_after": 0, "restart_budget": 100_000, "stop_timeout": 5}

TARGET_KILL_MEDIAN_MS = 300.0
TARGET_CLI_SPEEDUP = 1.5
TARGET_BOT_PSS_MB = 25.0
INSTALL_HINT = "supervisord is not installed: python -m pip install supervisor (then run the bench again)"


@dataclasses.dataclass
class Side:
    """What one system (DIMS or supervisord) produced in phase 1."""
    kill_to_answer: list[float] = dataclasses.field(default_factory=list)   # seconds
    cli: list[float] = dataclasses.field(default_factory=list)              # seconds
    supervisor_rss_kb: int | None = None
    supervisor_pss_kb: int | None = None


@dataclasses.dataclass
class Memory:
    """Phase 2: the fleet of --fleet-size bots and the standalone bot."""
    agent_pss_kb: int          # the supervisor's database agent (a forkserver child too)
    bot_pss_kb: list[int]
    bot_rss_kb: list[int]
    forkserver_pss_kb: int | None
    forkserver_rss_kb: int | None
    supervisor_pss_kb: int
    standalone_rss_kb: int
    standalone_pss_kb: int


# --------------------------------------------------------------------------- measuring


def ask_start(sandbox: SandboxClient, bot: int, user: int = USER_ID, timeout: float = REPLY_TIMEOUT_S) -> float:
    """Send /start from `user` to bot number `bot`; seconds until its reply is visible in that chat."""
    started = time.perf_counter()
    sent = sandbox.send(common.token(bot), user, "/start")
    try:
        reply = sandbox.wait_for_reply(common.token(bot), user, after_seq=sent["seq"], timeout=timeout)
    except TimeoutError:
        raise BenchError(f"bot {bot} did not answer /start within {timeout:g} s") from None
    if not reply.get("text", "").startswith("Hi! I'm"):
        raise BenchError(f"bot {bot} answered /start with {reply.get('text', '')[:80]!r}")
    return time.perf_counter() - started


def kill_and_time(sandbox: SandboxClient, pid: int, bot: int, user: int) -> float:
    """SIGKILL `pid`, send /start from `user` to its bot at once; seconds from the kill to the answer.

    A new user each round: an update the killed process had answered but not yet marked done
    is answered again after the restart (at least once), and that reply must not count."""
    started = time.perf_counter()
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        raise BenchError(f"bot {bot}'s process {pid} was gone before the kill") from None
    ask_start(sandbox, bot, user)
    return time.perf_counter() - started


def time_commands(commands: dict[str, tuple[list[str], dict[str, str]]], runs: int) -> dict[str, list[float]]:
    """Wall time of each command as a whole new process, alternating between them, `runs` rounds
    after one unmeasured round (which also fills the bytecode cache)."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(runs + 1):
        for name, (argv, env) in commands.items():
            started = time.perf_counter()
            result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
            elapsed = time.perf_counter() - started
            if result.returncode != 0:
                raise BenchError(f"{name} exited {result.returncode}: "
                                 f"{(result.stderr or result.stdout).strip()[:300]}")
            if round_:
                times[name].append(elapsed)
    return times


def shell_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` with this shell's bytecode settings instead of the bench's cache."""
    plain = {k: v for k, v in env.items() if k not in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    plain.update({k: os.environ[k] for k in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE") if k in os.environ})
    return plain


# --------------------------------------------------------------------------- the phases


def kills_and_cli(workdir: pathlib.Path, dsn: str, sandbox: SandboxProcess, args: argparse.Namespace,
                  scripts, users: int = KILL_USERS) -> tuple[Side, Side | None, dict[str, list[float]]]:
    """Phase 1: DIMS and (if installed) supervisord side by side, each with args.bots bots; kill
    round k sends from user `users + k` (DIMS) and `2 * users + k` (supervisord)."""
    dims_bots = {f"bot{n}": n for n in range(args.bots)}
    sv_bots = {f"sv{n}": SV_TOKENS + n for n in range(args.bots)} if scripts else {}
    env = common.environment(dsn, sandbox.api_url, workdir / "d", [*dims_bots.values(), *sv_bots.values()],
                             workdir / "pyc")
    fleet_conf = common.write_dims_config(workdir / "fleet.toml", dims_bots, BENCH_SUPERVISOR)
    single_conf = common.write_dims_config(workdir / "single.toml", sv_bots, {})
    dims, base = Side(), (Side() if scripts else None)
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(common.dims_fleet(fleet_conf, env, list(dims_bots), args.dims_log_level,
                                                      args.dims_log))
        running = stack.enter_context(common.supervisord(scripts, workdir, single_conf, env, list(sv_bots))) \
            if scripts else None
        for n in [*dims_bots.values(), *sv_bots.values()]:
            ask_start(sandbox, n, timeout=START_REPLY_TIMEOUT_S)    # everyone answers before measuring
        commands = {"dims": ([sys.executable, str(REPO / "dims"), "bot_list", "--config", str(fleet_conf)], env),
                    "enhanced_ipc_commands.py": ([sys.executable, str(REPO / "enhanced_ipc_commands.py"), "bot_list",
                                                  "--config", str(fleet_conf)], env)}
        if running:
            commands["supervisorctl"] = ([sys.executable, str(scripts[1]), "-c", str(running.conf), "status"], env)
        if shell_environment(env) != env:
            commands["dims, this shell's bytecode settings"] = (commands["dims"][0], shell_environment(env))
        commands["python -c pass"] = ([sys.executable, "-c", "pass"], env)
        cli = time_commands(commands, args.runs)
        dims.cli = cli.pop("dims")
        if running:
            base.cli = cli.pop("supervisorctl")
        for kill in range(args.kills):
            dims.kill_to_answer.append(kill_and_time(sandbox, fleet.pids()["bot0"], 0, users + kill))
            fleet.wait_running("bot0")                      # the pacing: RUNNING again, no sleep
            if running:
                pid = running.info("sv0")["pid"]
                base.kill_to_answer.append(kill_and_time(sandbox, pid, SV_TOKENS, 2 * users + kill))
                running.wait_running("sv0", kill + 2, REPLY_TIMEOUT_S)   # past startsecs again
        dims.supervisor_rss_kb = common.status_kb(fleet.process.pid)
        dims.supervisor_pss_kb = common.pss_kb(fleet.process.pid)
        if running:
            base.supervisor_rss_kb = common.status_kb(running.process.pid)
            base.supervisor_pss_kb = common.pss_kb(running.process.pid)
    return dims, base, cli


def memory(workdir: pathlib.Path, dsn: str, sandbox: SandboxProcess, args: argparse.Namespace,
           shell_bytecode: bool = False) -> Memory:
    """Phase 2: PSS of every bot of an args.fleet_size fleet, and of one standalone bot beside it
    (with the bench's bytecode cache, or with this shell's bytecode settings)."""
    bots = {f"bot{n}": MEMORY_TOKENS + n for n in range(args.fleet_size)}
    solo = MEMORY_TOKENS + args.fleet_size
    env = common.environment(dsn, sandbox.api_url, workdir / "m", [*bots.values(), solo], workdir / "pyc")
    env = shell_environment(env) if shell_bytecode else env
    fleet_conf = common.write_dims_config(workdir / "memory.toml", bots, BENCH_SUPERVISOR)
    solo_conf = common.write_dims_config(workdir / "solo.toml", {"solo": solo}, {})
    with common.standalone_bot(solo_conf, env, "solo") as solo_pid, \
            common.dims_fleet(fleet_conf, env, list(bots)) as fleet:
        for n in [*bots.values(), solo]:
            ask_start(sandbox, n, timeout=START_REPLY_TIMEOUT_S)
        pids = fleet.pids()
        forkserver = fleet.forkserver_pid()
        agents = [pid for pid in common.children(forkserver) if pid not in pids.values()] if forkserver else []
        return Memory(
            agent_pss_kb=sum(common.pss_kb(pid) for pid in agents),
            bot_pss_kb=[common.pss_kb(pids[name]) for name in bots],
            bot_rss_kb=[common.status_kb(pids[name]) for name in bots],
            forkserver_pss_kb=common.pss_kb(forkserver) if forkserver else None,
            forkserver_rss_kb=common.status_kb(forkserver) if forkserver else None,
            supervisor_pss_kb=common.pss_kb(fleet.process.pid),
            standalone_rss_kb=common.status_kb(solo_pid),
            standalone_pss_kb=common.pss_kb(solo_pid))


@dataclasses.dataclass
class Results:
    dims: Side
    baseline: Side | None
    extra_cli: dict[str, list[float]]
    memory: Memory
    shell_memory: Memory | None         # phase 2 again with this shell's bytecode settings, if they differ
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    seconds: float


def run(args: argparse.Namespace, scripts) -> Results:
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="dims-b-"))   # short: the control socket path
    workdir.chmod(0o755)   # the embedded server runs as the postgres user under root
    try:
        with common.database(workdir) as dsn, SandboxProcess() as sandbox:
            warm_up = argparse.Namespace(**{**vars(args), "kills": 1, "runs": 1, "dims_log": None})
            kills_and_cli(workdir, dsn, sandbox, warm_up, scripts, users=WARM_UP_USERS)   # fills the bytecode cache
            dims, baseline, extra_cli = kills_and_cli(workdir, dsn, sandbox, args, scripts)
            mem = memory(workdir, dsn, sandbox, args)
            shell_mem = memory(workdir, dsn, sandbox, args, shell_bytecode=True) if _bytecode_settings() else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Results(dims, baseline, extra_cli, mem, shell_mem, load_before, os.getloadavg(),
                   time.monotonic() - started)


# --------------------------------------------------------------------------- the report


def percentile(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def ms(values: list[float], p: int = 50) -> float | None:
    return 1000 * percentile(values, p) if values else None


@dataclasses.dataclass
class Row:
    measure: str
    dims: float
    baseline: float | None
    unit: str
    target: str
    met: bool | None       # None: no target, or no baseline to judge it by

    def cells(self) -> list[str]:
        ratio = f"{self.baseline / self.dims:.2f}x" if self.baseline and self.dims else "-"
        met = "-" if self.met is None else ("yes" if self.met else "NO")
        base = "-" if self.baseline is None else f"{self.baseline:.1f} {self.unit}"
        return [self.measure, f"{self.dims:.1f} {self.unit}", base, ratio, self.target, met]


def rows(r: Results, args: argparse.Namespace) -> list[Row]:
    base = r.baseline or Side()
    kill = ms(r.dims.kill_to_answer)
    cli, base_cli = ms(r.dims.cli), ms(base.cli)
    rss = r.dims.supervisor_rss_kb / MB
    base_rss = base.supervisor_rss_kb / MB if base.supervisor_rss_kb else None
    bot_pss = statistics.mean(r.memory.bot_pss_kb) / MB
    return [
        Row("kill -9 -> /start answered, median", kill, ms(base.kill_to_answer), "ms",
            f"< {TARGET_KILL_MEDIAN_MS:.0f} ms", kill < TARGET_KILL_MEDIAN_MS),
        Row("kill -9 -> /start answered, p90", ms(r.dims.kill_to_answer, 90), ms(base.kill_to_answer, 90),
            "ms", "", None),
        Row("bot_list (whole process), median", cli, base_cli, "ms", f">= {TARGET_CLI_SPEEDUP}x faster",
            None if base_cli is None else base_cli / cli >= TARGET_CLI_SPEEDUP),
        Row("  as python enhanced_ipc_commands.py", ms(r.extra_cli["enhanced_ipc_commands.py"]), base_cli, "ms",
            "", None),
        Row(f"supervisor RSS ({args.bots} bots)", rss, base_rss, "MB", "< supervisord",
            None if base_rss is None else rss < base_rss),
        Row(f"per-bot PSS, {args.fleet_size}-bot fleet (mean)", bot_pss, r.memory.standalone_pss_kb / MB, "MB",
            f"<= {TARGET_BOT_PSS_MB:.0f} MB", bot_pss <= TARGET_BOT_PSS_MB),
    ]


def report(r: Results, args: argparse.Namespace) -> str:
    table = [["measure", "DIMS", "baseline", "base/DIMS", "target", "met"]]
    table += [row.cells() for row in rows(r, args)]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    load = lambda avg: "/".join(f"{x:.2f}" for x in avg)  # noqa: E731
    lines = [
        f"DIMS fleet vs supervisord: one embedded PostgreSQL, one Telegram sandbox process; {args.kills} kills "
        f"and {args.runs} CLI runs each, alternating; {r.seconds:.0f} s",
        f"machine: {os.cpu_count()} cores (shared by the sandbox, PostgreSQL, both supervisors, the bots and "
        f"this bench); load average {load(r.load_before)} before, {load(r.load_after)} after; "
        f"Python {sys.version.split()[0]}",
        "",
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines += ["",
              "baselines: kill = the same bot as a supervisord program (`main.py --single`, autorestart, "
              "startsecs=1); bot_list = `supervisorctl -c CONF status` (DIMS: `dims bot_list`);",
              "  supervisor RSS = supervisord's (same number of bots); per-bot PSS = one standalone "
              "`main.py --single` process. base/DIMS > 1: DIMS is better."]
    if r.baseline is None:
        lines.append(f"  no supervisord baseline: {INSTALL_HINT if args.missing else '--skip-supervisord'}")
    lines += ["", *details(r, args)]
    return "\n".join(lines)


def details(r: Results, args: argparse.Namespace) -> list[str]:
    mb = lambda kb: "-" if kb is None else f"{kb / MB:.1f} MB"  # noqa: E731
    series = lambda values: " ".join(f"{1000 * v:.0f}" for v in values) or "-"  # noqa: E731
    m = r.memory
    total = sum(m.bot_pss_kb) + (m.forkserver_pss_kb or 0) + m.supervisor_pss_kb + m.agent_pss_kb
    lines = [
        f"kill -> answer (ms), DIMS:        {series(r.dims.kill_to_answer)}",
        f"kill -> answer (ms), supervisord: {series(r.baseline.kill_to_answer if r.baseline else [])}",
    ]
    start = r.extra_cli.get("python -c pass")
    if start:
        base_cli = ms(r.baseline.cli) if r.baseline else None
        lines.append(f"bot_list above a bare interpreter start (`python -c pass`: {ms(start):.1f} ms here): DIMS "
                     f"+{ms(r.dims.cli) - ms(start):.1f} ms, supervisorctl "
                     + ("-" if base_cli is None else f"+{base_cli - ms(start):.1f} ms"))
    for name, values in r.extra_cli.items():
        if name.startswith("dims, "):
            lines.append(f"bot_list median with {name.split(', ', 1)[1]} ({_bytecode_settings()}): "
                         f"{ms(values):.1f} ms")
    lines += [
        f"supervisor PSS: DIMS {mb(r.dims.supervisor_pss_kb)}, supervisord "
        f"{mb(r.baseline.supervisor_pss_kb if r.baseline else None)}",
        f"{args.fleet_size}-bot fleet: bot PSS min/mean/max {mb(min(m.bot_pss_kb))} / "
        f"{mb(statistics.mean(m.bot_pss_kb))} / {mb(max(m.bot_pss_kb))}, bot RSS mean "
        f"{mb(statistics.mean(m.bot_rss_kb))}; forkserver PSS {mb(m.forkserver_pss_kb)} "
        f"(RSS {mb(m.forkserver_rss_kb)}); supervisor PSS {mb(m.supervisor_pss_kb)}; "
        f"its database agent PSS {mb(m.agent_pss_kb)}",
        f"  whole fleet (supervisor + database agent + forkserver + bots) PSS {mb(total)} = {mb(total / args.fleet_size)} per bot",
        f"standalone `main.py --single`: RSS {mb(m.standalone_rss_kb)}, PSS {mb(m.standalone_pss_kb)} "
        f"({args.fleet_size} of them: {mb(args.fleet_size * m.standalone_pss_kb)})",
    ]
    if r.shell_memory is not None:
        s = r.shell_memory
        lines.append(f"with this shell's bytecode settings ({_bytecode_settings()}): bot PSS mean "
                     f"{mb(statistics.mean(s.bot_pss_kb))}, forkserver PSS {mb(s.forkserver_pss_kb)}, "
                     f"standalone PSS {mb(s.standalone_pss_kb)}")
    return lines


def _bytecode_settings() -> str:
    return ", ".join(f"{k}={os.environ[k]}" for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
                     if k in os.environ)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=15, help="kill -9 rounds per system (default 15)")
    parser.add_argument("--runs", type=int, default=20, help="bot_list / supervisorctl runs each (default 20)")
    parser.add_argument("--bots", type=int, default=2, help="bots per system in phase 1 (default 2)")
    parser.add_argument("--fleet-size", type=int, default=10, help="bots in the memory phase (default 10)")
    parser.add_argument("--skip-supervisord", action="store_true", help="measure DIMS only")
    parser.add_argument("--dims-log", type=pathlib.Path, metavar="FILE",
                        help="append phase 1's DIMS log (supervisor and bots) to FILE")
    parser.add_argument("--dims-log-level", default="INFO", choices=["DEBUG", "INFO"],
                        help="phase 1's DIMS log level (default INFO; the bench waits for an INFO line)")
    args = parser.parse_args(argv)
    if not 1 <= args.kills <= 100 or not 1 <= args.runs <= 100:
        parser.error("--kills and --runs must be 1-100 (the run stays within minutes)")
    if not 1 <= args.bots <= 10 or not 1 <= args.fleet_size <= 30:
        parser.error("--bots must be 1-10, --fleet-size 1-30")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scripts = None if args.skip_supervisord else common.supervisord_scripts()
    args.missing = scripts is None and not args.skip_supervisord
    if args.missing:
        print(INSTALL_HINT + "; measuring DIMS only", file=sys.stderr)
    try:
        results = run(args, scripts)
    except (BenchError, SandboxError, OSError, subprocess.SubprocessError, xmlrpc.client.Error) as exc:
        print(f"bench_fleet: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(report(results, args))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
