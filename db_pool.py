"""The psycopg2 pool: one per process, fork-safe, with the errors and DSN helpers it speaks in.

`ConnectionManager` is a bounded pool a process builds inside itself; `with db.transaction() as
tx:` is a transaction, and the one-shot helpers run one query string each. A forked child that
inherits a manager gets a fresh pool and leaves the parent's sessions alone. A connection idle
for longer than `idle_timeout` beyond `minconn` is closed at the pool's next use. `DatabaseError`
(and `PoolTimeout`) describe a problem for an operator: they name the server, never the password.

Called by the rest of the database layer (`migrator`, `embedded_postgres`, and the start-up path
in `multiprocess_connection_manager`, which re-exports these names for `girls_manager`, `bot`,
`supervisor` and the CLI). Imports the standard library, psycopg2 and `config` (for redaction);
never the migrator, the embedded server, the start-up path or telegram.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg2
import psycopg2.extensions

from config import redact

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- errors and DSNs


class DatabaseError(Exception):
    """A database problem described for an operator: names the server, never the password."""


class PoolTimeout(DatabaseError):
    """No pooled connection became free before the checkout deadline."""


def is_database_outage(exc: BaseException) -> bool:
    """True for errors that mean 'the database is unreachable', as opposed to a bug."""
    return isinstance(exc, (DatabaseError, psycopg2.OperationalError, psycopg2.InterfaceError))


# What a server says when it answered and will not let this client in: waiting cannot help.
_REFUSALS = ("authentication failed", "pg_hba.conf", "does not exist", "is not valid", "permission denied",
             "no password supplied", "role is not permitted")


# What a server says when every connection slot it has is taken.
_FULL = ("too many clients", "remaining connection slots are reserved", "too many connections")


def server_is_full(exc: BaseException) -> bool:
    """True when the server answered that its connection slots (max_connections) are used up."""
    text = str(exc)
    return any(marker in text for marker in _FULL)


def refuses_us(exc: BaseException) -> bool:
    """True when the database answered and refused (a wrong password, no such role or database,
    a bad URL), as opposed to not answering (down, restarting, unreachable)."""
    text = str(exc)
    return any(marker in text for marker in _REFUSALS)


def dsn_params(dsn: str) -> dict[str, str]:
    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise DatabaseError(f"the database URL is not valid: {redact(str(exc).strip())}") from None


def describe_target(dsn: str) -> str:
    """'database dims on 127.0.0.1:5432 as dims': the server a DSN points at, without secrets."""
    params = dsn_params(dsn)
    host = params.get("host") or params.get("hostaddr") or "the default local socket"
    port = params.get("port", "5432")
    where = f"{host}:{port}" if not host.startswith("/") else f"socket {host} (port {port})"
    return f"database {params.get('dbname', '?')} on {where} as {params.get('user', '(default user)')}"


def _password_of(dsn: str) -> list[str]:
    password = dsn_params(dsn).get("password")
    return [password] if password else []


def clean_error(exc: BaseException, dsn: str) -> str:
    """A driver error as one line of text, with the DSN's password redacted."""
    text = " ".join(str(exc).split())
    return redact(text, _password_of(dsn))


# --------------------------------------------------------------------------- the pool

IDLE_TIMEOUT_S = 60.0                # a pooled connection unused this long is closed (beyond minconn)
_ABANDONED: list[Any] = []           # connections inherited through fork: kept, never closed
_MANAGERS: "weakref.WeakSet[ConnectionManager]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for manager in list(_MANAGERS):
        manager._forget_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _neutralise(conn: Any) -> None:
    """Make an inherited connection harmless: its socket now points at /dev/null.

    Closing it (or letting it be garbage collected) would send the server a Terminate message
    and end the parent's session, so the object is kept alive and its fd swapped out.
    """
    if not isinstance(conn, psycopg2.extensions.connection):
        return  # a slot reserved for a connection still being opened
    with contextlib.suppress(Exception):
        if not conn.closed:
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, conn.fileno())
            os.close(devnull)
    _ABANDONED.append(conn)


def _is_alive(conn: Any) -> bool:
    """True when an idle connection is still usable, without a round trip.

    An idle session's socket has nothing to read. If it has, the server either closed it
    (restart, pg_terminate_backend, idle timeout) or sent a notice; a ping tells which.
    """
    if conn.closed:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
        if readable:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
    except (psycopg2.Error, OSError, ValueError):
        return False
    return not conn.closed


class Transaction:
    """One connection in one transaction; what `ConnectionManager.transaction()` yields."""

    def __init__(self, conn: Any):
        self.connection = conn
        self._cursor = conn.cursor()

    def execute(self, sql: str, params: Any = None) -> int:
        self._cursor.execute(sql, params)
        return self._cursor.rowcount

    def fetchall(self, sql: str, params: Any = None) -> list[tuple]:
        self._cursor.execute(sql, params)
        return self._cursor.fetchall()

    def fetchone(self, sql: str, params: Any = None) -> tuple | None:
        self._cursor.execute(sql, params)
        return self._cursor.fetchone()

    def fetchval(self, sql: str, params: Any = None) -> Any:
        row = self.fetchone(sql, params)
        return row[0] if row else None

    def fetchdicts(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        self._cursor.execute(sql, params)
        names = [column.name for column in self._cursor.description]
        return [dict(zip(names, row)) for row in self._cursor.fetchall()]


@dataclass
class PoolStats:
    role: str
    pid: int
    max: int
    size: int = 0
    in_use: int = 0
    checkouts: int = 0
    waits: int = 0
    timeouts: int = 0
    replaced: int = 0
    created: int = 0
    released: int = 0    # closed after idling past the pool's idle_timeout

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.pid, "max": self.max, "size": self.size,
                "in_use": self.in_use, "idle": self.size - self.in_use, "checkouts": self.checkouts,
                "waits": self.waits, "timeouts": self.timeouts, "replaced": self.replaced,
                "created": self.created, "released": self.released}


class ConnectionManager:
    """A bounded pool of psycopg2 connections for this process.

    `with db.transaction() as tx:` checks a connection out (waiting up to `checkout_timeout`
    for a free one), commits when the block ends and rolls back when it raises. The one-shot
    helpers `execute`, `fetchall`, `fetchone`, `fetchval` and `fetchdicts` each run one query
    string as its own transaction (several statements in one string share it). Connections
    are opened lazily, in the process that uses them.
    """

    def __init__(self, dsn: str, *, role: str = "main", minconn: int = 0, maxconn: int = 4,
                 checkout_timeout: float = 10.0, connect_timeout: float = 5.0, idle_timeout: float = IDLE_TIMEOUT_S):
        if maxconn < 1:
            raise ValueError("maxconn must be at least 1")
        self.dsn = dsn
        self.role = role
        self.minconn = minconn
        self.maxconn = maxconn
        self.checkout_timeout = checkout_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.target = describe_target(dsn)
        self._closed = False
        self._reset_state()
        _MANAGERS.add(self)

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[Any] = []                 # the most recently returned last
        self._idle_since: dict[Any, float] = {}    # when each idle connection was returned
        self._owned: set[Any] = set()
        self._stats = PoolStats(role=self.role, pid=self._pid, max=self.maxconn)

    def _forget_inherited(self) -> None:
        """Runs in a forked child: the parent's connections are not ours to use or close."""
        for conn in list(self._owned):
            _neutralise(conn)
        self._reset_state()

    # -- connecting

    def connect(self, *, autocommit: bool = False, role_suffix: str = "") -> Any:
        """A new connection outside the pool (listeners, lock holders). The caller closes it."""
        params = dsn_params(self.dsn)
        extra: dict[str, Any] = {"application_name": f"dims:{self.role}{role_suffix}"}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = max(1, round(self.connect_timeout))
        if not params.get("host", "").startswith("/") and "keepalives" not in params:
            extra.update(keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        try:
            conn = psycopg2.connect(self.dsn, **extra)
        except psycopg2.OperationalError as exc:
            full = "too many connections, every slot of the server's max_connections is taken: " if server_is_full(exc) else ""
            raise DatabaseError(f"cannot connect to {self.target}: {full}{clean_error(exc, self.dsn)}") from None
        conn.autocommit = autocommit
        return conn

    # -- checkout and return

    def _checkout(self) -> Any:
        if os.getpid() != self._pid:
            self._forget_inherited()
        if self._closed:
            raise DatabaseError(f"the {self.role} connection pool is closed")
        deadline = time.monotonic() + self.checkout_timeout
        with self._cond:
            waited = False
            while not self._idle and len(self._owned) >= self.maxconn:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._stats.timeouts += 1
                    raise PoolTimeout(
                        f"no database connection became free within {self.checkout_timeout:g} s "
                        f"(all {self.maxconn} of the {self.role} pool are in use)")
                if not waited:
                    waited = True
                    self._stats.waits += 1
                self._cond.wait(remaining)
            conn = self._idle.pop() if self._idle else None
            self._idle_since.pop(conn, None)
            if conn is None:
                self._owned.add(placeholder := object())
            self._stats.checkouts += 1
        if conn is not None and _is_alive(conn):
            return conn
        if conn is not None:
            log.info("%s pool: replacing a connection the server closed", self.role)
            with contextlib.suppress(Exception):
                conn.close()
            with self._cond:
                self._owned.discard(conn)
                self._owned.add(placeholder := object())
                self._stats.replaced += 1
        try:
            fresh = self.connect()
        except BaseException:
            with self._cond:
                self._owned.discard(placeholder)
                self._cond.notify()
            raise
        with self._cond:
            self._owned.discard(placeholder)
            self._owned.add(fresh)
            self._stats.created += 1
        return fresh

    def _return(self, conn: Any) -> None:
        if os.getpid() != self._pid:
            return  # forked while checked out: the child must not touch it
        broken = bool(conn.closed)
        if not broken and conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            try:
                conn.rollback()
            except psycopg2.Error:
                broken = True
        with self._cond:
            if broken or self._closed:
                self._owned.discard(conn)
                with contextlib.suppress(Exception):
                    conn.close()
            else:
                self._idle.append(conn)
                self._idle_since[conn] = time.monotonic()
            stale = self._take_stale()
            self._cond.notify()
        for old in stale:
            with contextlib.suppress(Exception):
                old.close()

    def _take_stale(self) -> list[Any]:
        """Under the lock: the connections idle for longer than `idle_timeout`, beyond `minconn`,
        taken out of the pool to be closed (the pool shrinks back to what is used)."""
        stale = []
        cutoff = time.monotonic() - self.idle_timeout
        while len(self._owned) > self.minconn and self._idle and self._idle_since.get(self._idle[0], 0.0) < cutoff:
            conn = self._idle.pop(0)
            self._idle_since.pop(conn, None)
            self._owned.discard(conn)
            self._stats.released += 1
            stale.append(conn)
        return stale

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        conn = self._checkout()
        try:
            tx = Transaction(conn)
            yield tx
            conn.commit()
        except BaseException:
            if not conn.closed:
                with contextlib.suppress(psycopg2.Error):
                    conn.rollback()
            raise
        finally:
            self._return(conn)

    @contextlib.contextmanager
    def _statement(self) -> Iterator[Transaction]:
        """One statement (or one query string) as its own transaction: in autocommit mode it
        is one round trip to the server, where BEGIN ... COMMIT would be three."""
        conn = self._checkout()
        try:
            conn.autocommit = True
            yield Transaction(conn)
        finally:
            if not conn.closed:
                conn.autocommit = False
            self._return(conn)

    def execute(self, sql: str, params: Any = None) -> int:
        with self._statement() as tx:
            return tx.execute(sql, params)

    def fetchall(self, sql: str, params: Any = None) -> list[tuple]:
        with self._statement() as tx:
            return tx.fetchall(sql, params)

    def fetchone(self, sql: str, params: Any = None) -> tuple | None:
        with self._statement() as tx:
            return tx.fetchone(sql, params)

    def fetchval(self, sql: str, params: Any = None) -> Any:
        with self._statement() as tx:
            return tx.fetchval(sql, params)

    def fetchdicts(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        with self._statement() as tx:
            return tx.fetchdicts(sql, params)

    def warm_up(self) -> None:
        """Open `minconn` connections now, so the first requests don't pay for them."""
        held = [self._checkout() for _ in range(min(self.minconn, self.maxconn))]
        for conn in held:
            self._return(conn)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            self._stats.size = len(self._owned)
            self._stats.in_use = len(self._owned) - len(self._idle)
            return self._stats.as_dict()

    def close(self) -> None:
        """Close this process's idle connections; checked-out ones close when returned."""
        if os.getpid() != self._pid:
            self._forget_inherited()
            return
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._idle_since.clear()
            for conn in idle:
                self._owned.discard(conn)
                with contextlib.suppress(Exception):
                    conn.close()
            self._cond.notify_all()
