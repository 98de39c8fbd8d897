"""The supervisor's database agent: a small process beside the bots that does the supervisor's
database work, so the supervisor itself never loads psycopg2 and never waits on the database.

At start it applies the migrations (before any bot starts); then it keeps the bots' desired
states (`dims_bots`: a bot an operator stopped stays stopped across restarts) and writes the
event log (`dims_events`), waiting out database outages with backoff.

Two halves: `database_agent_main`, the entry of the agent process (forked like the bots), and
`DatabaseAgent`, the supervisor's side: events and desired-state changes go out from one sender
thread through a bounded queue, so the supervisor loop never waits on those writes (reading
desired states waits, with a deadline); an agent that died is started again and what was queued
is sent to the new one. Imports at the top: the standard library, `backoff`, `config`,
`pipe_protocol`, `process_setup`, `states`; the database layer only inside the agent process.
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
from config import Config, install_log_redaction
from pipe_protocol import Kind, Message
from process_setup import prepare_child
from states import State, describe_exit

log = logging.getLogger("dims.agent")

QUEUE_MAX = 10_000          # messages the supervisor's sender thread holds before dropping events
AGENT_BACKLOG_MAX = 100_000  # messages the agent holds while the database is down
PIPE_WAIT_S = 5.0            # the longest the supervisor's side waits for the pipe


class AgentUnavailable(RuntimeError):
    """The agent could not start: the database cannot be reached or migrated (message says why)."""


# --------------------------------------------------------------------------- the agent process


def database_agent_main(config: Config, log_level: str, conn: mpc.Connection) -> None:
    """The entry of the agent process. It always ends the process; it never returns."""
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
        except DatabaseError as exc:
            conn.send_bytes(Message(Kind.FAILED, {"reason": str(exc)}).encode())
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


_REQUESTS: dict[Kind, Callable[[Any, dict[str, Any]], Any]] = {
    Kind.EVENT: _write_event, Kind.DESIRED: _desired_states, Kind.SAVE: _save_desired_state,
}


# --------------------------------------------------------------------------- the supervisor's side


class DatabaseAgent:
    """The supervisor's handle on the agent process."""

    def __init__(self, host, config: Config, log_level: str, start_timeout: float):
        self._host, self._log_level = host, log_level
        self._config = config._replace(bots=())   # the agent needs no bot, and no token
        self._start_timeout = start_timeout
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_MAX)
        self._lock = threading.Lock()          # one writer on the pipe at a time
        self._ids = itertools.count(1)
        self._conn: mpc.Connection | None = None
        self._process = None
        self._sender: threading.Thread | None = None

    def start(self) -> None:
        """Start the agent and wait until migrations are applied; AgentUnavailable if it can't."""
        self._spawn()
        self._sender = threading.Thread(target=self._send_loop, name="database-agent", daemon=True)
        self._sender.start()

    def _spawn(self) -> None:
        self._process, self._conn = self._host.start_process(database_agent_main, (self._config, self._log_level),
                                                             "dims-database")
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
            raise AgentUnavailable(f"cannot start: {message.body.get('reason')}")

    def desired_states(self, names: list[str], timeout: float) -> dict[str, str] | None:
        """The bots' desired states from the database, or None if no answer came in time."""
        if not names:
            return {}
        if not self._lock.acquire(timeout=min(timeout, PIPE_WAIT_S)):
            return None   # the sender is stuck on the pipe: the agent is not answering
        try:
            query = Message(Kind.DESIRED, {"names": names}, next(self._ids))
            self._conn.send_bytes(query.encode())
            while self._conn.poll(timeout):
                reply = Message.decode(self._conn.recv_bytes())
                if reply.id == query.id:
                    return reply.body["states"]
        except (OSError, EOFError, ValueError, KeyError):
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
        backoff = Backoff(0.5, 10.0)
        while True:
            message = self._queue.get()
            if message is None:
                return
            while not self._deliver(message):
                try:
                    log.warning("the database agent is gone; starting it again")
                    self._spawn()
                    backoff.reset()
                except AgentUnavailable as exc:
                    delay = backoff.next()
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
