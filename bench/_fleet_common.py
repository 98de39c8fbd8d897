"""The pieces `bench_fleet.py` runs: a private PostgreSQL, a DIMS fleet (`main.py --multi`) and
a supervisord running the same bots (`main.py --single`), their output watched line by line,
and memory read from /proc.

Everything here starts processes that its context managers stop again (SIGTERM, a deadline,
SIGKILL), leftovers included. Waits are on events - a log line, a control-socket answer, a
process exit (pidfd) - and each has a deadline. Talks only to unix sockets and 127.0.0.1.
Imports from the repository: the connection manager (embedded PostgreSQL) and `control`
(the control-socket client). The PyPI `supervisor` package is never imported here: the
repository's `supervisor.py` shadows it, so supervisord is run through its console scripts and
spoken to over XML-RPC directly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import importlib.metadata
import os
import pathlib
import select
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import xmlrpc.client

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402 (after the repository is on sys.path)
import psycopg2.extensions  # noqa: E402

import control  # noqa: E402  (DIMS control socket client)
from _common import proc_stat  # noqa: E402 (beside this file)
from multiprocess_connection_manager import EmbeddedPostgres  # noqa: E402

DATABASE = "dims_bench_fleet"
START_TIMEOUT_S = 60.0      # a fleet (or supervisord) up and every bot answering
STOP_TIMEOUT_S = 20.0       # SIGTERM -> exit, else SIGKILL
GONE_TIMEOUT_S = 5.0        # grandchildren gone after their parent exited, else SIGKILL
REQUEST_TIMEOUT_S = 10.0    # one control-socket or XML-RPC request
OUTPUT_LINES = 50_000       # lines of output kept per watched process


class BenchError(Exception):
    """The bench cannot go on: something did not start, answer or stop in time."""


def token(n: int) -> str:
    """A fake bot token: a 7-digit bot id, so nothing mistakes it for a real one."""
    return f"72{n:05d}:AAFakeBenchToken_fleet{n:013d}"


def token_env(n: int) -> str:
    return f"FLEET_BENCH_TOKEN_{n}"


# --------------------------------------------------------------------------- /proc


def status_kb(pid: int, key: str = "VmRSS") -> int:
    """A `kB` line of /proc/PID/status (VmRSS: resident set size)."""
    return _kb_line(pathlib.Path(f"/proc/{pid}/status"), key)


def pss_kb(pid: int) -> int:
    """Proportional set size: each shared page counted 1/N in each of the N processes sharing it."""
    return _kb_line(pathlib.Path(f"/proc/{pid}/smaps_rollup"), "Pss")


def _kb_line(path: pathlib.Path, key: str) -> int:
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise BenchError(f"{path}: no {key} line")


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks after boot): with the pid, it names one process."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """The process exists, is not a zombie and (given `ticks`) is the one that started then."""
    fields = proc_stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X") and (ticks is None or int(fields[19]) == ticks)


class Seen(dict):
    """Processes of ours that are not our children (bots, the forkserver): pid -> start ticks,
    so a pid the kernel has since given to someone else's process is never signalled."""

    def add(self, pid: int | None) -> None:
        if pid and pid not in self and (ticks := start_ticks(pid)) is not None:
            self[pid] = ticks


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(procs: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait (pidfd, no polling where the kernel has it) until every process (pid -> start ticks)
    has exited; the survivors."""
    deadline = time.monotonic() + timeout
    for pid, ticks in procs.items():
        if not alive(pid, ticks):
            continue
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = None
        try:
            while alive(pid, ticks) and (left := deadline - time.monotonic()) > 0:
                if fd is not None:
                    select.select([fd], [], [], left)
                else:
                    time.sleep(min(left, 0.05))  # no pidfd: a bounded poll is all there is
        finally:
            if fd is not None:
                os.close(fd)
    return {pid: ticks for pid, ticks in procs.items() if alive(pid, ticks)}


def kill_leftovers(procs: dict[int, int]) -> dict[int, int]:
    """SIGKILL the processes of ours that outlived their parent; the ones that had to be killed."""
    survivors = wait_gone(procs, GONE_TIMEOUT_S)
    for pid, ticks in survivors.items():
        try:
            fd = os.pidfd_open(pid)   # pins one process; then check it is still the one we saw
        except OSError:
            continue                  # gone meanwhile
        try:
            if alive(pid, ticks):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
    wait_gone(survivors, GONE_TIMEOUT_S)
    return survivors


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """`sig`, wait up to STOP_TIMEOUT_S, then SIGKILL. Harmless to repeat."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


# --------------------------------------------------------------------------- output


class OutputWatcher:
    """Reads a process's output in a thread; `wait_for` blocks until a line appears."""

    def __init__(self, stream, copy_to: pathlib.Path | None = None):
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._seen = 0
        self._closed = False
        self._changed = threading.Condition()
        self._copy = open(copy_to, "a") if copy_to else None
        threading.Thread(target=self._read, args=(stream,), name="output-watcher", daemon=True).start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                if self._copy:
                    self._copy.write(line)
                    self._copy.flush()
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._seen += 1
                    self._changed.notify_all()
        finally:
            stream.close()
            if self._copy:
                self._copy.close()
            with self._changed:
                self._closed = True
                self._changed.notify_all()

    def count(self, text: str) -> int:
        with self._changed:
            return sum(text in line for line in self.lines)

    def wait_for(self, text: str, count: int = 1, timeout: float = START_TIMEOUT_S) -> None:
        """Until `count` kept lines contain `text`; BenchError on the deadline or end of output."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while sum(text in line for line in self.lines) < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    why = "the output ended" if self._closed else f"not within {timeout:g} s"
                    raise BenchError(f"waiting for {text!r} (x{count}): {why}; last lines: {self.tail()}")
                self._changed.wait(left)

    def tail(self, n: int = 6) -> str:
        return " | ".join(list(self.lines)[-n:])


# --------------------------------------------------------------------------- the database


@contextlib.contextmanager
def database(workdir: pathlib.Path):
    """A private embedded PostgreSQL under workdir and a fresh database on it: its DSN."""
    server = EmbeddedPostgres(workdir)
    try:
        server_dsn = server.ensure_running()
        admin = psycopg2.connect(psycopg2.extensions.make_dsn(server_dsn, dbname="postgres"))
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
                cur.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            admin.close()
        yield psycopg2.extensions.make_dsn(server_dsn, dbname=DATABASE)
    finally:
        server.stop()


def environment(dsn: str, api_url: str, data_dir: pathlib.Path, tokens: list[int],
                pycache: pathlib.Path | None) -> dict[str, str]:
    """The environment of every process the bench starts. With `pycache`, bytecode is cached
    there (PYTHONPYCACHEPREFIX) for DIMS and supervisord alike, as on an ordinary install, even
    when this shell sets PYTHONDONTWRITEBYTECODE; the cache goes with the temporary directory."""
    env = {k: v for k, v in os.environ.items() if k not in ("DIMS_CONFIG", "DIMS_SOCKET", "BOT_TOKEN")}
    env.update(DATABASE_URL=dsn, TELEGRAM_API_URL=api_url, DIMS_DATA_DIR=str(data_dir),
               PYTHONUNBUFFERED="1", **{token_env(n): token(n) for n in tokens})
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def write_dims_config(path: pathlib.Path, bots: dict[str, int], supervisor: dict[str, float]) -> pathlib.Path:
    """A DIMS TOML file: one [[bots]] per name (token number n from the environment), [supervisor]."""
    lines = ["[supervisor]"] + [f"{key} = {value}" for key, value in supervisor.items()]
    for name, n in bots.items():
        lines += ["", "[[bots]]", f'name = "{name}"', f'token_env = "{token_env(n)}"',
                  f'display_name = "Bench {name}"']
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- a DIMS fleet


@dataclasses.dataclass
class DimsFleet:
    """A running `main.py --multi` and its control socket."""
    process: subprocess.Popen
    output: OutputWatcher
    data_dir: pathlib.Path
    seen_pids: Seen = dataclasses.field(default_factory=Seen)

    def request(self, payload: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        key = control.read_authkey(self.data_dir)
        answer = control.request(self.data_dir / "dims.sock", key, payload, timeout=timeout)
        if answer.get("status") != "ok":
            raise BenchError(f"control socket: {payload.get('command')}: {answer.get('reason')}")
        return answer

    def wait_running(self, name: str, timeout: float = START_TIMEOUT_S) -> int:
        """Until the bot is RUNNING (answered by the supervisor, no polling); its pid."""
        answer = self.request({"command": "wait", "name": name, "states": ["RUNNING"], "timeout": timeout},
                              timeout=timeout + 5)
        if answer["bot"]["state"] != "RUNNING":
            raise BenchError(f"bot {name} is {answer['bot']['state']}, not RUNNING, after {timeout:g} s")
        pid = answer["bot"]["pid"]
        self.seen_pids.add(pid)
        return pid

    def pids(self) -> dict[str, int]:
        found = {b["name"]: b["pid"] for b in self.request({"command": "bot_list"})["bots"]}
        for pid in found.values():
            self.seen_pids.add(pid)
        return found

    def forkserver_pid(self) -> int | None:
        for pid in children(self.process.pid):
            if cmdline(pid).startswith("dims: forkserver") or "multiprocessing.forkserver" in cmdline(pid):
                return pid
        return None


@contextlib.contextmanager
def dims_fleet(config: pathlib.Path, env: dict[str, str], names: list[str], log_level: str = "INFO",
               log_copy: pathlib.Path | None = None):
    """`main.py --multi` until every named bot is RUNNING; stopped (and checked) on the way out."""
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--multi", "--config", str(config),
                                "--log-level", log_level], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fleet = DimsFleet(process, OutputWatcher(process.stdout, log_copy), pathlib.Path(env["DIMS_DATA_DIR"]))
    try:
        fleet.output.wait_for(" bots, control socket ")  # the supervisor listens from here on
        for name in names:
            fleet.wait_running(name)
        fleet.seen_pids.add(fleet.forkserver_pid())
        yield fleet
    finally:
        stop_process(process)
        kill_leftovers(fleet.seen_pids)


# --------------------------------------------------------------------------- supervisord


def supervisord_scripts() -> tuple[pathlib.Path, pathlib.Path] | None:
    """(supervisord, supervisorctl) console scripts of the PyPI `supervisor` package, or None."""
    try:
        importlib.metadata.version("supervisor")
    except importlib.metadata.PackageNotFoundError:
        return None
    found = []
    for name in ("supervisord", "supervisorctl"):
        path = pathlib.Path(sysconfig.get_path("scripts")) / name
        if not path.exists():
            which = shutil.which(name)
            if which is None:
                return None
            path = pathlib.Path(which)
        found.append(path)
    return found[0], found[1]


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket (what supervisorctl does)."""

    def __init__(self, path: str, timeout: float):
        super().__init__()
        self._path, self._timeout = path, timeout

    def make_connection(self, host):
        return _UnixHTTPConnection(self._path, self._timeout)


@dataclasses.dataclass
class Supervisord:
    """A running supervisord (`-n`, in the foreground) with one program per bot."""
    process: subprocess.Popen
    output: OutputWatcher
    conf: pathlib.Path
    socket_path: pathlib.Path
    seen_pids: Seen = dataclasses.field(default_factory=Seen)

    def info(self, name: str) -> dict:
        proxy = xmlrpc.client.ServerProxy("http://localhost/RPC2",
                                          transport=_UnixTransport(str(self.socket_path), REQUEST_TIMEOUT_S))
        found = proxy.supervisor.getProcessInfo(name)
        self.seen_pids.add(found.get("pid"))
        return found

    def wait_running(self, name: str, times: int, timeout: float = START_TIMEOUT_S) -> int:
        """Until supervisord has logged `name` entering RUNNING `times` times (startsecs passed); its pid."""
        self.output.wait_for(f"success: {name} entered RUNNING state", times, timeout)
        found = self.info(name)
        if found["statename"] != "RUNNING":
            raise BenchError(f"supervisord: {name} is {found['statename']}, not RUNNING")
        return found["pid"]


def write_supervisord_conf(workdir: pathlib.Path, config: pathlib.Path, names: list[str]) -> pathlib.Path:
    """One [program:NAME] per bot: `python main.py --single --bot NAME`, autorestart, startsecs=1."""
    sock = workdir / "sv.sock"
    lines = [
        "[unix_http_server]", f"file={sock}", "chmod=0700", "",
        "[supervisord]", f"logfile={workdir / 'supervisord.log'}", f"pidfile={workdir / 'supervisord.pid'}",
        f"childlogdir={workdir}", "nodaemon=true", "loglevel=info", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{sock}",
    ]
    for name in names:
        lines += ["", f"[program:{name}]",
                  f"command={sys.executable} {REPO / 'main.py'} --single --bot {name} --config {config} "
                  f"--log-level WARNING",
                  f"directory={REPO}", "autorestart=true", "startsecs=1", "stopwaitsecs=5",
                  "redirect_stderr=true", f"stdout_logfile={workdir / (name + '.log')}"]
    path = workdir / "supervisord.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def supervisord(scripts: tuple[pathlib.Path, pathlib.Path], workdir: pathlib.Path, config: pathlib.Path,
                env: dict[str, str], names: list[str]):
    """supervisord in the foreground until every program is RUNNING; stopped on the way out."""
    conf = write_supervisord_conf(workdir, config, names)
    process = subprocess.Popen([sys.executable, str(scripts[0]), "-n", "-c", str(conf)], cwd=workdir, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    running = Supervisord(process, OutputWatcher(process.stdout), conf, workdir / "sv.sock")
    try:
        for name in names:
            running.wait_running(name, 1)
        yield running
    finally:
        stop_process(process)
        kill_leftovers(running.seen_pids)


# --------------------------------------------------------------------------- one standalone bot


@contextlib.contextmanager
def standalone_bot(config: pathlib.Path, env: dict[str, str], name: str):
    """`main.py --single --bot NAME` (no supervisor): its pid; stopped on the way out."""
    process = subprocess.Popen([sys.executable, str(REPO / "main.py"), "--single", "--bot", name, "--config",
                                str(config), "--log-level", "WARNING"], cwd=REPO, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = OutputWatcher(process.stdout)
    try:
        yield process.pid
    except BenchError:
        if process.poll() is not None:
            raise BenchError(f"the standalone bot exited with {process.returncode}: {output.tail()}") from None
        raise
    finally:
        stop_process(process)
