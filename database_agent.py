"""The supervisor's database agent: a small process beside the bots that does the supervisor's
database work, so the supervisor itself never loads psycopg2 and never waits on the database.

At start it applies the migrations (before any bot starts) and checks that the server's
`max_connections` can hold the fleet (`connection_budget`; a reload asks again); then it keeps
the bots' desired states (`dims_bots`: a bot an operator stopped stays stopped across restarts)
and writes the event log (`dims_events`), waiting out database outages with backoff.

Two halves: `database_agent_main`, the entry of the agent process (forked like the bots), and
`DatabaseAgent`, the supervisor's side: events and desired-state changes go out from one sender
thread through a bounded queue, so the supervisor loop never waits on those writes (reading
desired states waits, with a deadline). The supervisor's loop watches the agent's process like a
bot's (`sentinel`): a death is logged at once (`on_exit`) and the sender thread starts a new
agent, with a backoff when one dies soon after its start; what was queued is sent to the new
one, and `status()` reports it for bot_list and system_health. Imports at the top: the standard
library, `backoff`, `config`, `connection_budget`, `pipe_protocol`, `process_setup`, `states`; the
database layer only inside the agent process.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
import logging
import multiprocessing.connection as mpc
import os
import queue
import threading
import time
from typing import Any, Callable

from backoff import Backoff
from config import Config, DatabaseConfig, install_log_redaction
from connection_budget import server_refusal
from pipe_protocol import Kind, Message
from process_setup import prepare_child
from states import State, describe_exit

log = logging.getLogger("dims.agent")

QUEUE_MAX = 10_000          # messages the supervisor's sender thread holds before dropping events
AGENT_BACKLOG_MAX = 100_000  # messages the agent holds while the database is down
PIPE_WAIT_S = 5.0            # the longest the supervisor's side waits for the pipe
STABLE_AFTER_S = 10.0        # an agent that lived this long is restarted without delay
_RESPAWN = object()          # queued by on_exit: the sender thread starts a new agent


class AgentUnavailable(RuntimeError):
    """The agent could not start: the database cannot be reached or migrated, or cannot hold the
    fleet (`configuration`: fixing the configuration or the server is the only cure)."""

    def __init__(self, message: str, configuration: bool = False):
        super().__init__(message)
        self.configuration = configuration


# --------------------------------------------------------------------------- the agent process


def database_agent_main(config: Config, log_level: str, fleet: int, conn: mpc.Connection) -> None:
    """The entry of the agent process (`fleet`: how many bot processes the database must hold).
    It always ends the process; it never returns."""
    code = 1
    try:
        prepare_child("dims: database agent", "dims db agent")
        logging.basicConfig(level=log_level, format="%(asctime)s database agent: %(levelname)s %(name)s: %(message)s",
                            force=True)
        install_log_redaction(config.secrets())
        from multiprocess_connection_manager import DatabaseError, DatabaseIntegrationManager
        manager = DatabaseIntegrationManager(config, role="supervisor", pool_max=1)
        try:
            db = manager.initialize_database_coordination(migrate=True)
            refused = server_refusal(db, config.database, fleet, embedded=manager.embedded is not None)
        except DatabaseError as exc:
            conn.send_bytes(Message(Kind.FAILED, {"reason": str(exc)}).encode())
            return
        if refused:
            conn.send_bytes(Message(Kind.FAILED, {"reason": refused, "configuration": True}).encode())
            return
        conn.send_bytes(Message(Kind.READY).encode())
        _serve(db, conn)
        manager.shutdown()
        code = 0
    except BaseException:  # reported, then the process ends with status 1
        log.exception("the database agent failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _serve(db, conn: mpc.Connection) -> None:
    """Answer the supervisor until it stops us or goes away; wait out database outages.

    A reader thread takes every message off the pipe at once, into a bounded backlog, so the
    supervisor's writes never block however long an outage holds up the work (beyond the
    backlog, the oldest events are dropped and counted; requests are never dropped)."""
    from multiprocess_connection_manager import is_database_outage
    backlog: deque[Message] = deque()
    ready = threading.Condition()
    dropped = 0

    def read() -> None:
        nonlocal dropped
        while True:
            try:
                message = Message.decode(conn.recv_bytes())
            except (EOFError, OSError):
                message = Message(Kind.STOP)
            except (ValueError, KeyError):
                continue
            with ready:
                if len(backlog) >= AGENT_BACKLOG_MAX:
                    oldest_event = next((m for m in backlog if m.kind is Kind.EVENT), None)
                    if oldest_event is not None:
                        backlog.remove(oldest_event)
                        dropped += 1
                backlog.append(message)
                ready.notify()
            if message.kind is Kind.STOP:
                return

    threading.Thread(target=read, name="agent-reader", daemon=True).start()
    backoff = Backoff(0.1, 5.0)
    while True:
        with ready:
            ready.wait_for(lambda: backlog)
            message = backlog.popleft()
            lost, dropped = dropped, 0
        if lost:
            log.warning("the event log fell behind during an outage: %d events were dropped", lost)
        if message.kind is Kind.STOP:
            return
        while True:
            try:
                reply = _REQUESTS[message.kind](db, message.body)
                break
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                delay = backoff.next()
                if backoff.grew:
                    log.warning("database unavailable (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
        if backoff.failures:
            log.info("database reachable again after %d retries", backoff.failures)
            backoff.reset()
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


def _budget(db, body: dict[str, Any]) -> dict[str, Any]:
    """Why the server cannot hold a fleet of `processes` under the given budget (None: it can)."""
    budget = DatabaseConfig(pool_max=body["pool_max"], max_connections=body["max_connections"])
    return {"refusal": server_refusal(db, budget, body["processes"], embedded=body["embedded"])}


_REQUESTS: dict[Kind, Callable[[Any, dict[str, Any]], Any]] = {
    Kind.EVENT: _write_event, Kind.DESIRED: _desired_states, Kind.SAVE: _save_desired_state,
    Kind.BUDGET: _budget,
}


# --------------------------------------------------------------------------- the supervisor's side


class DatabaseAgent:
    """The supervisor's handle on the agent process."""

    def __init__(self, host, config: Config, log_level: str, start_timeout: float):
        self._host, self._log_level = host, log_level
        self._config = config._replace(bots=())   # the agent needs no bot, and no token
        self.fleet = len(config.bots)             # but it checks that the database can hold them
        self._start_timeout = start_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_MAX)
        self._lock = threading.Lock()          # one writer on the pipe at a time
        self._ids = itertools.count(1)
        self._conn: mpc.Connection | None = None
        self._process = None
        self._sender: threading.Thread | None = None
        self._started_at = 0.0
        self.restarts = 0
        self.last_error: str | None = None
        self.down_since: float | None = None   # monotonic: no agent answering since then

    def start(self) -> None:
        """Start the agent and wait until migrations are applied; AgentUnavailable if it can't."""
        self._spawn()
        self._sender = threading.Thread(target=self._send_loop, name="database-agent", daemon=True)
        self._sender.start()

    def _spawn(self) -> None:
        self._process, self._conn = self._host.start_process(
            database_agent_main, (self._config, self._log_level, self.fleet), "dims-database")
        self._started_at = time.monotonic()
        if not self._conn.poll(self._start_timeout):
            self._process.kill()
            raise AgentUnavailable(f"the database was not ready within {self._start_timeout:g} s")
        try:
            message = Message.decode(self._conn.recv_bytes())
        except EOFError:
            self._process.join(5)
            raise AgentUnavailable(f"the database agent died while starting "
                                   f"({describe_exit(self._process.exitcode)})") from None
        if message.kind is Kind.FAILED:
            raise AgentUnavailable(f"cannot start: {message.body.get('reason')}",
                                   configuration=bool(message.body.get("configuration")))
        self.down_since = None

    # -- watched by the supervisor's loop

    @property
    def sentinel(self) -> Any:
        """What the supervisor's loop waits on: ready when the agent's process has exited (None
        while no agent is up: the sender thread is starting one)."""
        process = self._process
        return None if process is None or self.down_since is not None else process.sentinel

    def on_exit(self) -> None:
        """The agent's process exited (the loop saw its sentinel): say so, and have the sender
        thread start a new one."""
        process = self._process
        if process is None or self.down_since is not None:
            return
        process.join(0)
        code = process.exitcode
        status = ("stopped with its forkserver, which died" if code == 255 else
                  "exited; its forkserver did not report how" if code is None else describe_exit(code))
        self.last_error = f"pid {process.pid} {status}"
        self.down_since = time.monotonic()
        log.warning("the database agent (pid %d) %s; starting it again", process.pid, status)
        try:
            self._queue.put_nowait(_RESPAWN)
        except queue.Full:
            pass   # the sender is busy delivering: its next delivery fails and starts a new agent

    def status(self) -> dict[str, Any]:
        """The agent as bot_list and system_health report it."""
        process = self._process
        up = process is not None and self.down_since is None
        return {"state": "up" if up else "down", "pid": process.pid if up else None,
                "restarts": self.restarts, "last_error": self.last_error,
                "down_s": None if up or self.down_since is None else round(time.monotonic() - self.down_since, 1)}

    def desired_states(self, names: list[str], timeout: float) -> dict[str, str] | None:
        """The bots' desired states from the database, or None if no answer came in time."""
        if not names:
            return {}
        reply = self._ask(Kind.DESIRED, {"names": names}, timeout)
        return None if reply is None else reply.get("states")

    def budget_refusal(self, config: Config, timeout: float) -> str | None:
        """Why the server cannot hold `config`'s fleet (a reload's), or None: it can, or no answer
        came in time (the start-up check and the bots' own connection errors still stand)."""
        reply = self._ask(Kind.BUDGET, {"processes": len(config.bots), "pool_max": config.database.pool_max,
                                        "max_connections": config.database.max_connections,
                                        "embedded": not config.database.url}, timeout)
        return None if reply is None else reply.get("refusal")

    def _ask(self, kind: Kind, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """A request to the agent and its reply's body; None if none came within `timeout`."""
        if not self._lock.acquire(timeout=min(timeout, PIPE_WAIT_S)):
            return None   # the sender is stuck on the pipe: the agent is not answering
        try:
            query = Message(kind, body, next(self._ids))
            self._conn.send_bytes(query.encode())
            while self._conn.poll(timeout):
                reply = Message.decode(self._conn.recv_bytes())
                if reply.id == query.id:
                    return reply.body
        except (OSError, EOFError, ValueError, KeyError, AttributeError):
            pass
        finally:
            self._lock.release()
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
        backoff = Backoff(0.1, 10.0)
        while True:
            message = self._queue.get()
            if message is None:
                return
            if message is _RESPAWN:
                if self.down_since is not None:
                    self._respawn(backoff)
                continue
            while not self._deliver(message):
                if self.down_since is None:   # it died, and the loop has not seen it yet
                    log.warning("the database agent is gone; starting it again")
                    self.down_since = time.monotonic()
                self._respawn(backoff)

    def _respawn(self, backoff: Backoff) -> None:
        """Start a new agent, after a delay when the last one died young; retried with backoff
        until one starts (the database may be down: the agent must migrate to be ready)."""
        if time.monotonic() - self._started_at >= STABLE_AFTER_S:
            backoff.reset()
        else:
            time.sleep(backoff.next())
        while True:
            try:
                if self._process is not None and self._process.is_alive():
                    self._process.kill()
                self._spawn()
                self.restarts += 1
                log.info("database agent started again (pid %d)", self._process.pid)
                return
            except (AgentUnavailable, OSError) as exc:
                self.last_error = str(exc)
                delay = backoff.next()
                if backoff.grew:
                    log.error("%s; retrying in %.1f s", exc, delay)
                time.sleep(delay)

    def _deliver(self, message: Message) -> bool:
        with self._lock:
            try:
                self._conn.send_bytes(message.encode())
                return True
            except (OSError, ValueError):
                return False

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout`), then stop the agent."""
        if self._sender is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._sender.join(timeout)
        if self._process is not None:
            if self._lock.acquire(timeout=timeout):
                try:
                    self._conn.send_bytes(Message(Kind.STOP).encode())
                except (OSError, ValueError):
                    pass
                finally:
                    self._lock.release()
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
