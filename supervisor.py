"""ProcessSupervisor: one OS process per bot, a Pipe to each, restarts with backoff, and the
control socket the operator CLI talks to.

The supervisor is one loop blocked on `multiprocessing.connection.wait()` over the children's
pipes and sentinels and a wake-up pipe (written by signal handlers and the control-socket
thread), so a death, a message or a signal is acted on at once. Every state change goes through
`change_state()`, which checks the table of allowed moves, logs the move and records it in the
event log table. Children are forked from a forkserver with the bot modules preloaded, and die
with the supervisor (parent-death signal, and EOF on their pipe).

The supervisor process itself never touches the database: a database agent process (forked
like the bots) applies migrations before any bot starts, keeps the bots' desired states and
writes the event log, fed through a queue so the loop never waits on those writes. Reads wait:
the desired states at start-up, and those of bots a reload adds (at most 2 s; without an
answer the bots start).

Sections: states; the pipe protocol; the child process; the control socket; the database
agent; the supervisor. Imports: `config` and `control`; `bot` and the connection manager only
inside the child processes.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import json
import logging
import multiprocessing
import multiprocessing.connection as mpc
import os
import queue
import random
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from config import BotConfig, Config, install_log_redaction, load_config, pool_max_for
from control import CACHE_FIELDS, make_authkey, request

log = logging.getLogger("dims.supervisor")

EXIT_TOKEN_REJECTED = 78       # bot.EXIT_TOKEN_REJECTED; not imported, to keep bot's imports out
BAD_REQUEST = 2                # a reply's "code" for a request naming no such bot or state: the CLI's usage status
PRELOAD = ["bot"]              # imported once in the forkserver, shared by every child


class SupervisorError(RuntimeError):
    """The supervisor cannot run; the message says why."""


class SupervisorRunning(SupervisorError):
    """A live supervisor already answers on the control socket."""


class SupervisorUnavailable(RuntimeError):
    """The supervisor itself cannot run here (its socket, its processes); the bots and the
    database are not the problem, so one bot can still run without it."""


# --------------------------------------------------------------------------- states


class State(str, enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


S = State
ALLOWED_MOVES: dict[State, set[State]] = {
    S.STOPPED: {S.STARTING},
    S.STARTING: {S.RUNNING, S.STOPPING, S.EXITED},
    S.RUNNING: {S.STOPPING, S.EXITED},
    S.STOPPING: {S.STOPPED},
    S.EXITED: {S.BACKOFF, S.FATAL, S.STOPPED},
    S.BACKOFF: {S.STARTING, S.STOPPED, S.FATAL},
    S.FATAL: {S.STARTING, S.STOPPED},
}


class IllegalMove(RuntimeError):
    pass


# --------------------------------------------------------------------------- the pipe protocol


class Kind(str, enum.Enum):
    READY = "ready"            # child -> parent: polling and database are up
    HEARTBEAT = "heartbeat"    # child -> parent: stats, every heartbeat_interval
    REPLY = "reply"            # child -> parent: the answer to a request, same id
    STOP = "stop"              # parent -> child: stop gracefully
    STATS = "stats"            # parent -> child: reply with fresh stats
    PING = "ping"              # parent -> child: reply at once
    FAILED = "failed"          # database agent -> parent: could not start (body: reason)
    EVENT = "event"            # parent -> database agent: a row for dims_events
    DESIRED = "desired"        # parent -> database agent: reply with the bots' desired states
    SAVE = "save"              # parent -> database agent: record one bot's desired state


@dataclass(frozen=True)
class Message:
    """The one envelope on every pipe: JSON, never pickles."""
    kind: Kind
    body: dict[str, Any] = field(default_factory=dict)
    id: int = 0

    def encode(self) -> bytes:
        return json.dumps({"kind": self.kind.value, "body": self.body, "id": self.id}, default=str).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Message":
        raw = json.loads(data)
        return cls(Kind(raw["kind"]), raw.get("body") or {}, int(raw.get("id", 0)))


# --------------------------------------------------------------------------- the child process


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the forkserver) dies."""
    try:
        import ctypes  # here, not at the top: only child processes need it
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ChildChannel:
    """The child's end of its pipe: answers requests, sends heartbeats, turns `stop` into a stop."""

    def __init__(self, conn: mpc.Connection, heartbeat_interval: float):
        self.conn = conn
        self.heartbeat_interval = heartbeat_interval
        self._send_lock = threading.Lock()
        self.runner = None

    def send(self, message: Message) -> None:
        with self._send_lock:
            try:
                self.conn.send_bytes(message.encode())
            except (OSError, ValueError):
                pass  # the supervisor is gone; the reader thread notices EOF and stops the bot

    def attach(self, runner, stop) -> None:
        """Called by bot.run inside the bot's event loop once the runner exists. (asyncio is
        imported here and below, not at the top: the supervisor process never needs it.)"""
        import asyncio
        self.runner = runner
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop, stop), name="pipe-reader", daemon=True).start()
        self._heartbeat_task = loop.create_task(self._heartbeats())   # kept: the loop holds tasks weakly

    @staticmethod
    def _stop(loop, stop) -> None:
        with contextlib.suppress(RuntimeError):   # the loop already finished: nothing to stop
            loop.call_soon_threadsafe(stop.set)

    def ready(self) -> None:
        self.send(Message(Kind.READY, self.runner.snapshot()))

    async def _heartbeats(self) -> None:
        import asyncio
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.send(Message(Kind.HEARTBEAT, self.runner.snapshot()))

    def _read(self, loop, stop) -> None:
        while True:
            try:
                message = Message.decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                logging.getLogger("dims.child").warning("the supervisor is gone: stopping")
                self._stop(loop, stop)
                return
            except (ValueError, KeyError):
                continue
            if message.kind is Kind.STOP:
                self._stop(loop, stop)
            elif message.kind in (Kind.STATS, Kind.PING):
                self.send(Message(Kind.REPLY, self.runner.snapshot(), message.id))


def child_main(bot_config: BotConfig, config: Config, conn: mpc.Connection, pool_max: int, log_level: str) -> None:
    """The entry of a bot process. It always ends the process; it never returns."""
    code = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        import bot
        bot.configure_logging(bot_config.name, config.secrets(), log_level)
        channel = ChildChannel(conn, config.supervisor.heartbeat_interval)
        code = bot.run(bot_config, config, migrate=False, pool_max=pool_max, signals=(signal.SIGTERM,),
                       on_serving=channel.attach, on_ready=channel.ready)
    except BaseException:  # reported, then the process ends with status 1
        logging.getLogger("dims.child").exception("bot %s crashed", bot_config.name)
    finally:
        logging.shutdown()
        os._exit(code)


# --------------------------------------------------------------------------- the control socket


class ControlServer:
    """Accepts CLI connections on an AF_UNIX socket (mode 0600, HMAC handshake), hands each
    request to the supervisor loop through `requests` and a wake-up write, and sends the reply.
    A client that fails the handshake, stalls or sends garbage is dropped; the loop never waits."""

    HANDSHAKE_TIMEOUT = 5.0
    MAX_CLIENTS = 16

    def __init__(self, path: Path, authkey: bytes, wake: Callable[[], None]):
        self.path = path
        self.authkey = authkey
        self.wake = wake
        self.requests: queue.Queue = queue.Queue()
        self._slots = threading.BoundedSemaphore(self.MAX_CLIENTS)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(32)
        self._closed = False
        threading.Thread(target=self._accept_loop, name="control-accept", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                client.close()
                continue
            threading.Thread(target=self._serve_client, args=(client,), name="control-client", daemon=True).start()

    def _serve_client(self, client: socket.socket) -> None:
        watchdog = threading.Timer(self.HANDSHAKE_TIMEOUT, _shutdown_socket, args=(client,))
        watchdog.start()
        conn = mpc.Connection(os.dup(client.fileno()))
        try:
            mpc.deliver_challenge(conn, self.authkey)
            mpc.answer_challenge(conn, self.authkey)
            payload = json.loads(conn.recv_bytes(1 << 20))
            if not isinstance(payload, dict):
                raise ValueError("a request is a JSON object")
            watchdog.cancel()
            reply: queue.Queue = queue.Queue(maxsize=1)
            self.requests.put((payload, reply.put))
            self.wake()
            answer = reply.get(timeout=float(payload.get("timeout", 30)) + 5)
            conn.send_bytes(json.dumps(answer, default=str).encode())
        except mpc.AuthenticationError:
            log.warning("control socket: a client failed the handshake and was dropped")
        except (EOFError, OSError, ValueError, queue.Empty, TypeError) as exc:
            log.warning("control socket: dropped a client (%s)", type(exc).__name__)
        finally:
            watchdog.cancel()
            conn.close()
            client.close()
            self._slots.release()


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --------------------------------------------------------------------------- the database agent


def database_agent_main(config: Config, conn: mpc.Connection, log_level: str) -> None:
    """The supervisor's database process: migrations at start, the bots' desired states and the
    event log, so the supervisor itself never loads psycopg2. It always ends the process."""
    code = 1
    try:
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logging.basicConfig(level=log_level, format="%(asctime)s database agent: %(levelname)s %(name)s: %(message)s",
                            force=True)
        install_log_redaction(config.secrets())
        from multiprocess_connection_manager import DatabaseError, DatabaseIntegrationManager
        manager = DatabaseIntegrationManager(config, role="supervisor", pool_max=1)
        try:
            db = manager.initialize_database_coordination(migrate=True)
        except DatabaseError as exc:
            conn.send_bytes(Message(Kind.FAILED, {"reason": str(exc)}).encode())
            return
        conn.send_bytes(Message(Kind.READY).encode())
        _serve_database_requests(db, conn)
        manager.shutdown()
        code = 0
    except BaseException:  # reported, then the process ends with status 1
        logging.getLogger("dims.agent").exception("the database agent failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _serve_database_requests(db, conn: mpc.Connection) -> None:
    """Answer the supervisor until it stops us or goes away; wait out database outages."""
    from multiprocess_connection_manager import is_database_outage
    while True:
        try:
            message = Message.decode(conn.recv_bytes())
        except EOFError:
            return
        if message.kind is Kind.STOP:
            return
        for attempt in itertools.count():
            try:
                reply = _DATABASE_REQUESTS[message.kind](db, message.body)
                break
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                log.warning("database unavailable (%s); retrying", exc)
                time.sleep(min(5.0, 0.1 * 2 ** attempt))
        if reply is not None:
            conn.send_bytes(Message(Kind.REPLY, reply, message.id).encode())


def _write_event(db, row: dict[str, Any]) -> None:
    db.execute("INSERT INTO dims_events (bot, kind, state_from, state_to, pid, message, detail) "
               "VALUES (%(bot)s, %(kind)s, %(state_from)s, %(state_to)s, %(pid)s, %(message)s, %(detail)s::jsonb)",
               {**row, "detail": json.dumps(row["detail"])})


def _desired_states(db, body: dict[str, Any]) -> dict[str, Any]:
    """Each named bot's desired state (a bot seen for the first time is recorded as running)."""
    with db.transaction() as tx:
        for name in body["names"]:
            tx.execute("INSERT INTO dims_bots (name) VALUES (%s) ON CONFLICT (name) DO NOTHING", (name,))
        rows = tx.fetchall("SELECT name, desired_state FROM dims_bots WHERE name = ANY(%s)", (body["names"],))
    return {"states": dict(rows)}


def _save_desired_state(db, body: dict[str, Any]) -> None:
    db.execute("INSERT INTO dims_bots (name, desired_state) VALUES (%(name)s, %(state)s) ON CONFLICT (name) "
               "DO UPDATE SET desired_state = EXCLUDED.desired_state, updated_at = now()", body)


_DATABASE_REQUESTS: dict[Kind, Callable[[Any, dict[str, Any]], Any]] = {
    Kind.EVENT: _write_event, Kind.DESIRED: _desired_states, Kind.SAVE: _save_desired_state,
}


class DatabaseAgent:
    """The supervisor's side of the database agent. Events and desired-state changes go out
    from one sender thread through a bounded queue, so the supervisor loop never waits on those
    writes (reading desired states waits, with a deadline); an agent that died is started again
    and what was queued is sent to the new one."""

    def __init__(self, ctx, config: Config, log_level: str, start_timeout: float):
        self._ctx, self._config, self._log_level = ctx, config, log_level
        self._start_timeout = start_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=10000)
        self._lock = threading.Lock()          # one writer on the pipe at a time
        self._ids = itertools.count(1)
        self._conn: mpc.Connection | None = None
        self._process = None
        self._sender: threading.Thread | None = None

    def start(self) -> None:
        """Start the agent and wait until migrations are applied; SupervisorError if it can't."""
        self._spawn()
        self._sender = threading.Thread(target=self._send_loop, name="database-agent", daemon=True)
        self._sender.start()

    def _spawn(self) -> None:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        self._process = self._ctx.Process(target=database_agent_main, name="dims-database",
                                          args=(self._config, child_end, self._log_level))
        self._process.start()
        child_end.close()
        self._conn = parent_end
        if not parent_end.poll(self._start_timeout):
            self._process.kill()
            raise SupervisorError(f"the database was not ready within {self._start_timeout:g} s")
        try:
            message = Message.decode(parent_end.recv_bytes())
        except EOFError:
            raise SupervisorError(f"the database agent died while starting ({describe_exit(self._process.exitcode)})") from None
        if message.kind is Kind.FAILED:
            raise SupervisorError(f"cannot start: {message.body.get('reason')}")

    def desired_states(self, names: list[str], timeout: float) -> dict[str, str] | None:
        """The bots' desired states from the database, or None if no answer came in time."""
        if not names:
            return {}
        with self._lock:
            query = Message(Kind.DESIRED, {"names": names}, next(self._ids))
            try:
                self._conn.send_bytes(query.encode())
                while self._conn.poll(timeout):
                    reply = Message.decode(self._conn.recv_bytes())
                    if reply.id == query.id:
                        return reply.body["states"]
            except (OSError, EOFError):
                pass
        return None

    def record(self, bot: str | None, kind: str, message: str = "", *, state_from: State | None = None,
               state_to: State | None = None, pid: int | None = None, **detail: Any) -> None:
        """Queue a row for the event log (dims_events)."""
        self._put(Message(Kind.EVENT, {"bot": bot, "kind": kind, "message": message, "pid": pid,
                                       "state_from": state_from.value if state_from else None,
                                       "state_to": state_to.value if state_to else None, "detail": detail}))

    def save_desired(self, name: str, running: bool) -> None:
        self._put(Message(Kind.SAVE, {"name": name, "state": "running" if running else "stopped"}))

    def _put(self, message: Message) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            log.warning("database agent queue full: dropped a %s message", message.kind.value)

    def _send_loop(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            while not self._deliver(message):
                try:
                    log.warning("the database agent is gone; starting it again")
                    self._spawn()
                except SupervisorError as exc:
                    log.error("%s; retrying in 5 s", exc)
                    time.sleep(5)

    def _deliver(self, message: Message) -> bool:
        with self._lock:
            try:
                self._conn.send_bytes(message.encode())
                return True
            except (OSError, ValueError):
                return False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop the agent."""
        if self._sender is not None:
            self._queue.put(None)
            self._sender.join(timeout)
        if self._process is not None:
            self._deliver(Message(Kind.STOP))
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()


# --------------------------------------------------------------------------- the supervisor


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_TOKEN_REJECTED:
        return f"exit status {code} (token rejected by Telegram)"
    return f"exit status {code}"


@dataclass
class Child:
    """What the supervisor knows about one bot."""
    config: BotConfig
    state: State = State.STOPPED
    process: multiprocessing.Process | None = None
    conn: mpc.Connection | None = None
    wanted: bool = True                 # desired state: running
    started_at: float = 0.0
    running_since: float = 0.0
    last_heartbeat: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    failures: int = 0                   # consecutive, for the backoff
    recent_restarts: deque = field(default_factory=deque)
    next_start: float = 0.0             # BACKOFF / FATAL: when to start again
    stop_deadline: float = 0.0
    term_sent: bool = False
    last_error: str | None = None
    restart_after_stop: bool = False
    removed: bool = False               # no longer configured: forgotten once stopped

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.state in (
            State.STARTING, State.RUNNING, State.STOPPING) else None


class ProcessSupervisor:
    """Runs every configured bot in its own process and keeps them running."""

    def __init__(self, config: Config, log_level: str = "INFO"):
        self.config = config
        self.settings = config.supervisor
        self.log_level = log_level
        self.children: dict[str, Child] = {}
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(PRELOAD)
        # Python 3.11's forkserver ignores the sys.path it is given, so the preload of this
        # project's modules would fail silently (and every bot would import them again):
        # the forkserver inherits the environment, so put the project on PYTHONPATH.
        project = str(Path(__file__).resolve().parent)
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if project not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([project, *filter(None, paths)])
        self._waiters: list[tuple[str, set[State], set[State], float, Callable[[dict], None]]] = []
        self._queries: dict[int, tuple[Callable[[dict], None], dict[str, Any], set[str], float]] = {}
        self._next_id = 1
        self._shutting_down = False
        self.started_at = time.time()
        self.control: ControlServer | None = None
        self.events: DatabaseAgent | None = None

    # -- the state machine

    def change_state(self, child: Child, new: State, reason: str = "") -> None:
        old = child.state
        if new not in ALLOWED_MOVES[old]:
            raise IllegalMove(f"bot {child.name}: {old.value} -> {new.value} is not allowed")
        child.state = new
        pid = child.process.pid if child.process is not None else None
        suffix = f" (pid {pid})" if pid and new in (State.STARTING, State.RUNNING, State.STOPPING, State.EXITED) else ""
        log.info("bot %s: %s -> %s%s%s", child.name, old.value, new.value, suffix, f": {reason}" if reason else "")
        if self.events:
            self.events.record(child.name, "state", reason, state_from=old, state_to=new, pid=pid)
        self._settle_waiters(child)

    # -- lifecycle of one child

    def _spawn(self, child: Child) -> None:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        wanted = sum(1 for c in self.children.values() if not c.removed)   # as reload() checked the budget
        pool_max = pool_max_for(self.config.database, max(1, wanted))
        process = self._ctx.Process(target=child_main, name=f"dims-bot-{child.name}",
                                    args=(child.config, self.config, child_end, pool_max, self.log_level))
        process.start()
        child_end.close()
        child.process, child.conn = process, parent_end
        child.started_at = time.monotonic()
        child.last_heartbeat = 0.0
        child.stats = {}
        child.term_sent = False
        self.change_state(child, State.STARTING)
        self.events and self.events.record(child.name, "start", pid=process.pid)

    def start_bot(self, child: Child) -> None:
        child.wanted = True
        if child.state in (State.STOPPED, State.BACKOFF, State.FATAL):
            if child.state is State.FATAL:
                child.recent_restarts.clear()
                child.failures = 0
            self._spawn(child)

    def stop_bot(self, child: Child, *, restart: bool = False) -> None:
        """Stop message, then SIGTERM, then SIGKILL at stop_timeout. Harmless to repeat."""
        child.restart_after_stop = restart
        if child.state in (State.BACKOFF, State.FATAL):
            self.change_state(child, State.STOPPED, "stopped while waiting to restart")
            if restart:
                self.start_bot(child)
            return
        if child.state not in (State.STARTING, State.RUNNING):
            return
        self.change_state(child, State.STOPPING)
        child.stop_deadline = time.monotonic() + self.settings.stop_timeout
        self._send(child, Message(Kind.STOP))

    def _forget_if_stopped(self, child: Child) -> None:
        if child.removed and child.state is State.STOPPED:
            self.children.pop(child.name, None)
            log.info("bot %s: removed from the configuration", child.name)

    def _on_exit(self, child: Child) -> None:
        process = child.process
        process.join(0)
        code = process.exitcode
        status = describe_exit(code)
        if child.conn is not None:
            child.conn.close()
            child.conn = None
        self.events and self.events.record(child.name, "exit", status, pid=process.pid, exit_code=code)
        if child.state is State.STOPPING:
            self.change_state(child, State.STOPPED, status)
            self._forget_if_stopped(child)
            if child.restart_after_stop and not self._shutting_down:
                child.restart_after_stop = False
                child.restarts += 1
                self._spawn(child)
            return
        was_running = child.state is State.RUNNING
        child.last_error = f"{status}" + (f"; last error: {child.stats.get('last_error')}"
                                          if child.stats.get("last_error") else "")
        self.change_state(child, State.EXITED, status)
        if self._shutting_down:
            self.change_state(child, State.STOPPED, "supervisor stopping")
            return
        if code == EXIT_TOKEN_REJECTED:
            self.change_state(child, State.FATAL, "Telegram rejected the token; fix it, then bot_start")
            child.next_start = float("inf")
            return
        self._schedule_restart(child, was_running)

    def _schedule_restart(self, child: Child, was_running: bool) -> None:
        now = time.monotonic()
        if was_running and now - child.running_since >= self.settings.stable_after:
            child.failures = 0
        window = self.settings.restart_window
        while child.recent_restarts and now - child.recent_restarts[0] > window:
            child.recent_restarts.popleft()
        if len(child.recent_restarts) >= self.settings.restart_budget:
            child.next_start = now + self.settings.fatal_cooldown
            self.change_state(child, State.FATAL, f"{len(child.recent_restarts)} restarts within {window:g} s; "
                              f"retrying in {self.settings.fatal_cooldown:g} s or on bot_start")
            return
        delay = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** child.failures)
        delay *= random.uniform(0.75, 1.25) if child.failures else 1.0
        child.failures += 1
        child.next_start = now + delay
        self.change_state(child, State.BACKOFF, f"restarting in {delay:.2f} s")

    def _send(self, child: Child, message: Message) -> bool:
        if child.conn is None:
            return False
        try:
            child.conn.send_bytes(message.encode())
            return True
        except (OSError, ValueError):
            return False

    # -- messages from children

    def _on_message(self, child: Child) -> None:
        try:
            message = Message.decode(child.conn.recv_bytes())
        except (EOFError, OSError):
            child.conn.close()
            child.conn = None   # the sentinel reports the exit
            return
        except (ValueError, KeyError):
            log.warning("bot %s: unreadable pipe message ignored", child.name)
            return
        child.last_heartbeat = time.monotonic()
        if message.kind in (Kind.READY, Kind.HEARTBEAT):
            child.stats = message.body
        if message.kind is Kind.READY and child.state is State.STARTING:
            child.running_since = time.monotonic()
            self.change_state(child, State.RUNNING)
        elif message.kind is Kind.REPLY:
            self._on_query_reply(child, message)

    # -- timers: backoff, fatal cool-down, stop deadlines, watchdogs

    def _run_timers(self) -> float:
        """Act on every due timer; return seconds until the next one."""
        now = time.monotonic()
        next_due = [60.0]
        for child in list(self.children.values()):
            if child.state in (State.BACKOFF, State.FATAL) and child.wanted and not self._shutting_down:
                if now >= child.next_start:
                    child.restarts += 1
                    child.recent_restarts.append(now)
                    self.events and self.events.record(child.name, "restart", f"restart #{child.restarts}")
                    self._spawn(child)
                else:
                    next_due.append(child.next_start - now)
            elif child.state is State.STOPPING:
                next_due.append(self._push_stop(child, now))
            elif child.state is State.RUNNING:
                if child.failures and now - child.running_since >= self.settings.stable_after:
                    child.failures = 0
                silent = now - child.last_heartbeat
                if silent > self.settings.heartbeat_timeout:
                    self._kill_hung(child, f"no heartbeat for {silent:.1f} s")
                else:
                    next_due.append(self.settings.heartbeat_timeout - silent)
            elif child.state is State.STARTING:
                waited = now - child.started_at
                if waited > self.settings.start_timeout:
                    self._kill_hung(child, f"not ready after {waited:.1f} s")
                else:
                    next_due.append(self.settings.start_timeout - waited)
        for query_id, (_, _, _, deadline) in list(self._queries.items()):
            if now >= deadline:
                self._finish_query(query_id)
            else:
                next_due.append(deadline - now)
        for waiter in list(self._waiters):
            name, targets, _, deadline, reply = waiter
            if now < deadline:
                next_due.append(deadline - now)
                continue
            self._waiters.remove(waiter)
            child = self.children.get(name)
            reply({"status": "error", "reason": f"bot {name} is {child.state.value if child else 'gone'} after "
                                                f"waiting; it did not reach {'/'.join(s.value for s in targets)}",
                   "bot": self._bot_row(child) if child else None})
        return max(0.0, min(next_due))

    def _push_stop(self, child: Child, now: float) -> float:
        remaining = child.stop_deadline - now
        term_at = self.settings.stop_timeout * 0.3   # the last 30 % of the time: after SIGTERM
        if remaining <= 0:
            log.warning("bot %s: did not stop within %g s: SIGKILL", child.name, self.settings.stop_timeout)
            child.process.kill()
            return 1.0
        if remaining <= term_at and not child.term_sent:
            child.term_sent = True
            log.info("bot %s: still running; sending SIGTERM", child.name)
            child.process.terminate()
        return remaining if child.term_sent else remaining - term_at

    def _kill_hung(self, child: Child, reason: str) -> None:
        log.warning("bot %s: %s: killing it (hung)", child.name, reason)
        child.last_error = reason
        self.events and self.events.record(child.name, "hung", reason, pid=child.process.pid)
        child.process.kill()
        child.last_heartbeat = time.monotonic()  # don't kill twice while the exit is on its way

    # -- the loop

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        self._wake()

    def loop_once(self, timeout: float) -> None:
        objects: list[Any] = [self._wake_r]
        by_object: dict[Any, tuple[str, Child]] = {}
        for child in self.children.values():
            if child.process is not None and child.state in (State.STARTING, State.RUNNING, State.STOPPING):
                objects.append(child.process.sentinel)
                by_object[child.process.sentinel] = ("exit", child)
                if child.conn is not None:
                    objects.append(child.conn)
                    by_object[child.conn] = ("message", child)
        ready = mpc.wait(objects, timeout)
        exits = []
        for obj in ready:
            if obj == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            kind, child = by_object[obj]
            if kind == "message" and child.conn is not None:
                while child.conn is not None and child.conn.poll():
                    self._on_message(child)
            elif kind == "exit":
                exits.append(child)
        for child in exits:
            while child.conn is not None and child.conn.poll():
                self._on_message(child)   # a last heartbeat or reply before the exit
            self._on_exit(child)
        while self._signals:
            self._handle_signal(self._signals.popleft())
        if self.control is not None:
            while True:
                try:
                    payload, reply = self.control.requests.get_nowait()
                except queue.Empty:
                    break
                self._handle_request(payload, reply)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            log.info("SIGHUP: reloading the configuration")
            result = self.reload()
            log.info("reload: %s", result.get("reason") or result)
        elif not self._shutting_down:
            log.info("%s: stopping every bot", signal.Signals(signum).name)
            self.shutdown()

    def shutdown(self) -> None:
        self._shutting_down = True
        for child in self.children.values():
            child.wanted = True  # a supervisor stop is not an operator's bot_stop
            self.stop_bot(child)

    def _all_stopped(self) -> bool:
        return all(c.state in (State.STOPPED, State.FATAL) for c in self.children.values())

    # -- start-up and the main entry

    def run(self) -> int:
        """Start everything, loop until SIGTERM/SIGINT and every bot has stopped. Exit status.
        SupervisorUnavailable when the supervisor itself cannot run here (the caller may fall
        back to one in-process bot)."""
        try:
            try:
                self.config.data_dir.mkdir(parents=True, exist_ok=True)
                self._claim_socket()
            except OSError as exc:
                raise SupervisorUnavailable(f"cannot open the control socket {self.config.socket_path}: {exc}") from None
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, self._on_signal)
            try:
                self._start_database()
            except OSError as exc:
                raise SupervisorUnavailable(f"cannot start child processes: {exc}") from None
            self._start_bots()
            while not (self._shutting_down and self._all_stopped()):
                self.loop_once(self._run_timers())
            return 0
        except SupervisorError as exc:   # another supervisor runs, or the database is unreachable
            log.error("%s", exc)
            return 1
        finally:
            self._close()

    def _start_bots(self) -> None:
        for bot_config in self.config.bots:
            self.children[bot_config.name] = Child(bot_config)
        self._load_desired_states(list(self.children), self.settings.start_timeout)
        log.info("supervisor %d: %d bots, control socket %s", os.getpid(), len(self.children),
                 self.config.socket_path)
        for child in self.children.values():
            if child.wanted:
                self.start_bot(child)
            else:
                log.info("bot %s: left STOPPED (stopped by an operator)", child.name)

    def _claim_socket(self) -> None:
        path = self.config.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        key = make_authkey(self.config.data_dir)
        if path.exists():
            # Only a socket nobody listens on is stale. One that answers with another key, or
            # accepts and then stalls or hangs up, belongs to a live process: refuse, touch nothing.
            elsewhere = "stop it first, or point DIMS_SOCKET elsewhere"
            try:
                answer = request(path, key, {"command": "ping"}, timeout=3)
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing the stale control socket %s", path)
                path.unlink(missing_ok=True)
            except mpc.AuthenticationError:
                raise SupervisorRunning(f"another supervisor, with another data directory (its own key), is running "
                                        f"on {path}; {elsewhere}") from None
            except (OSError, EOFError) as exc:
                raise SupervisorRunning(f"something listens on {path} but does not answer as a supervisor "
                                        f"({str(exc) or type(exc).__name__}); {elsewhere}") from None
            else:
                raise SupervisorRunning(f"another supervisor is running (pid {answer.get('pid')}) on {path}; {elsewhere}")
        self.control = ControlServer(path, key, self._wake)

    def _start_database(self) -> None:
        """The database agent: migrations are applied before any bot starts."""
        self.events = DatabaseAgent(self._ctx, self.config, self.log_level, self.settings.start_timeout)
        self.events.start()
        self.events.record(None, "supervisor", "started", pid=os.getpid())

    def _load_desired_states(self, names: list[str], timeout: float) -> None:
        """Each bot's desired state from dims_bots; without an answer in time, 'running'."""
        states = self.events.desired_states(names, timeout)
        if states is None:
            log.warning("the database did not say within %g s which bots operators stopped; starting %s",
                        timeout, ", ".join(names))
            return
        for name, desired in states.items():
            self.children[name].wanted = desired == "running"

    def _save_desired_state(self, child: Child) -> None:
        self.events.save_desired(child.name, child.wanted)

    def _close(self) -> None:
        for child in self.children.values():
            if child.process is not None and child.process.is_alive():
                child.process.kill()
        if self.control is not None:
            self.control.close()
        if self.events is not None:
            self.events.record(None, "supervisor", "stopped", pid=os.getpid())
            self.events.close()

    # -- reload

    def reload(self) -> dict[str, Any]:
        try:
            fresh = load_config(self.config.path)
            pool_max_for(fresh.database, len(fresh.bots))
        except Exception as exc:
            return {"status": "error", "reason": f"configuration not reloaded: {exc}"}
        old = {c.name: c.config for c in self.children.values() if not c.removed}
        new = {b.name: b for b in fresh.bots}
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and new[n] != old[n]]
        self.config, self.settings = fresh, fresh.supervisor
        for name in removed:
            child = self.children[name]
            child.removed = True
            self.stop_bot(child)
            self._forget_if_stopped(child)
        for name in changed:
            child = self.children[name]
            child.config = new[name]
            if child.state in (State.STARTING, State.RUNNING):
                self.stop_bot(child, restart=True)
            elif child.state is State.FATAL and child.wanted:
                self.start_bot(child)   # e.g. a rejected token was replaced
        for name in added:
            self.children[name] = Child(new[name])
        self._load_desired_states(added, timeout=2.0)
        for name in added:
            if self.children[name].wanted:
                self.start_bot(self.children[name])
        self.events and self.events.record(None, "reload", "", added=added, removed=removed, changed=changed)
        return {"status": "ok", "added": added, "removed": removed, "changed": changed}

    # -- control requests

    def _bot_row(self, child: Child) -> dict[str, Any]:
        now = time.monotonic()
        live = child.state in (State.STARTING, State.RUNNING, State.STOPPING)
        return {
            "name": child.name, "state": child.state.value, "pid": child.pid,
            "uptime_s": round(now - child.running_since, 1) if child.state is State.RUNNING else None,
            "restarts": child.restarts,
            "heartbeat_age_s": round(now - child.last_heartbeat, 1) if live and child.last_heartbeat else None,
            "updates_handled": child.stats.get("updates_handled", 0),
            "backlog": child.stats.get("backlog"),
            "last_error": child.last_error or child.stats.get("last_error"),
            "wanted": "running" if child.wanted else "stopped",
        }

    def _handle_request(self, payload: dict[str, Any], reply: Callable[[dict], None]) -> None:
        command = payload.get("command")
        handler = getattr(self, f"_cmd_{command}", None) if isinstance(command, str) else None
        if handler is None:
            reply({"status": "error", "reason": f"unknown command {command!r}"})
            return
        try:
            handler(payload, reply)
        except Exception as exc:  # answered, logged; the supervisor carries on
            log.exception("control command %s failed", command)
            reply({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})

    def _named(self, payload: dict[str, Any], reply: Callable[[dict], None]) -> Child | None:
        name = payload.get("name")
        child = self.children.get(name) if isinstance(name, str) else None
        if child is None:
            known = ", ".join(self.children) or "none"
            reply({"status": "error", "reason": f"bot {name!r} is not configured (known: {known})", "code": BAD_REQUEST})
        return child

    def _cmd_ping(self, payload, reply) -> None:
        reply({"status": "ok", "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 1)})

    def _cmd_bot_list(self, payload, reply) -> None:
        reply({"status": "ok", "supervisor": {"pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 1),
                                              "socket": str(self.config.socket_path)},
               "heartbeat_timeout_s": self.settings.heartbeat_timeout,
               "bots": [self._bot_row(c) for c in self.children.values()]})

    def _wanted(self, payload, reply, running: bool) -> Child | None:
        """The named bot with its desired state set and saved (None: answered with an error)."""
        child = self._named(payload, reply)
        if child is not None:
            child.wanted = running
            self._save_desired_state(child)
        return child

    def _bring_up(self, child: Child, restart: bool) -> None:
        if child.state is State.STOPPING:
            child.restart_after_stop = True
        elif restart and child.state in (State.STARTING, State.RUNNING):
            self.stop_bot(child, restart=True)
        else:
            self.start_bot(child)

    def _cmd_bot_start(self, payload, reply) -> None:
        self._start_and_wait(payload, reply, restart=False)

    def _cmd_bot_restart(self, payload, reply) -> None:
        self._start_and_wait(payload, reply, restart=True)

    def _start_and_wait(self, payload, reply, restart: bool) -> None:
        """Bring the bot up (a running one only when restarting); answer once it is RUNNING."""
        child = self._wanted(payload, reply, running=True)
        if child is None:
            return
        if child.state is State.RUNNING and not restart:
            reply({"status": "ok", "bot": self._bot_row(child), "changed": False})
            return
        self._bring_up(child, restart)
        self._wait_for(child, {State.RUNNING}, payload, reply, terminal={State.FATAL})

    def _cmd_bot_stop(self, payload, reply) -> None:
        child = self._wanted(payload, reply, running=False)
        if child is None:
            return
        child.restart_after_stop = False
        if child.state is State.STOPPED:
            reply({"status": "ok", "bot": self._bot_row(child), "changed": False})
            return
        self.stop_bot(child)
        self._wait_for(child, {State.STOPPED}, payload, reply)

    def _cmd_wait(self, payload, reply) -> None:
        """Answer when the bot is in one of payload["states"] (or after payload["timeout"])."""
        child = self._named(payload, reply)
        if child is not None:
            try:
                states = {State(s) for s in payload.get("states") or ()}
            except ValueError:
                reply({"status": "error", "reason": f"unknown state in {payload.get('states')}", "code": BAD_REQUEST})
                return
            self._wait_for(child, states, payload, reply)

    def _cmd_reload(self, payload, reply) -> None:
        reply(self.reload())

    def _cmd_cache_stats(self, payload, reply) -> None:
        self._query_children(payload, reply, lambda child, stats: {"name": child.name, **dict.fromkeys(CACHE_FIELDS),
                                                                   **(stats.get("cache") or {})})

    def _cmd_stats(self, payload, reply) -> None:
        self._query_children(payload, reply, lambda child, stats: {"name": child.name, **stats})

    def _wait_for(self, child: Child, targets: set[State], payload, reply, terminal: set[State] = frozenset()) -> None:
        timeout = float(payload.get("timeout", 30))
        if child.state in targets:
            reply({"status": "ok", "bot": self._bot_row(child), "changed": True})
            return
        self._waiters.append((child.name, targets, set(terminal), time.monotonic() + timeout, reply))

    def _settle_waiters(self, child: Child) -> None:
        for waiter in list(self._waiters):
            name, targets, terminal, _, reply = waiter
            if name != child.name or child.state not in targets | terminal:
                continue
            self._waiters.remove(waiter)
            if child.state in targets:
                reply({"status": "ok", "bot": self._bot_row(child), "changed": True})
            else:
                reply({"status": "error", "reason": f"bot {name} is {child.state.value}: {child.last_error}",
                       "bot": self._bot_row(child)})

    def _query_children(self, payload, reply, row: Callable[[Child, dict], dict]) -> None:
        """Ask every RUNNING bot (or the one named) for fresh stats; answer when all replied. A bot
        that cannot answer (not RUNNING, or silent for 3 s) gets the row of no stats, marked
        `unavailable`, with its state."""
        names = [payload["name"]] if payload.get("name") else list(self.children)
        unknown = [n for n in names if n not in self.children]
        if unknown:
            reply({"status": "error", "reason": f"bot {unknown[0]!r} is not configured "
                                                f"(known: {', '.join(self.children) or 'none'})", "code": BAD_REQUEST})
            return
        query_id = self._next_id
        self._next_id += 1
        asked = {n for n in names if self.children[n].state is State.RUNNING
                 and self._send(self.children[n], Message(Kind.STATS, id=query_id))}
        results = {n: None for n in names}
        self._queries[query_id] = (lambda done: reply({"status": "ok", "bots": [
            row(self.children[n], stats) if stats is not None else
            {**row(self.children[n], {}), "state": self.children[n].state.value, "unavailable": True}
            for n, stats in done.items() if n in self.children]}), results, asked, time.monotonic() + 3.0)
        if not asked:
            self._finish_query(query_id)

    def _on_query_reply(self, child: Child, message: Message) -> None:
        entry = self._queries.get(message.id)
        if entry is None:
            return
        _, results, asked, _ = entry
        results[child.name] = message.body
        asked.discard(child.name)
        if not asked:
            self._finish_query(message.id)

    def _finish_query(self, query_id: int) -> None:
        respond, results, _, _ = self._queries.pop(query_id)
        respond(results)
