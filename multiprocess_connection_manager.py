"""The database layer: one psycopg2 pool per process, migrations, and the embedded PostgreSQL.

Every DIMS process (the supervisor, each bot child, the operator CLI) builds its own
`ConnectionManager` inside itself; a forked child that inherits one gets a fresh pool and leaves
the parent's sessions alone. `DatabaseIntegrationManager` is the start-up and shutdown path the
rest of DIMS calls: find or start the server, create the database, migrate under a lock.

Sections, in dependency order: errors and DSN helpers; the pool; migrations; the embedded
server; coordination. Imports: the standard library, psycopg2 and `config`; never telegram.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import logging
import os
import pwd
import re
import select
import shutil
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from config import Config, redact

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x44494D53_4D494752  # "DIMSMIGR": the advisory lock for migrators


# --------------------------------------------------------------------------- errors and DSNs


class DatabaseError(Exception):
    """A database problem described for an operator: names the server, never the password."""


class PoolTimeout(DatabaseError):
    """No pooled connection became free before the checkout deadline."""


class MigrationError(DatabaseError):
    """Migrations cannot run: drift, a broken file, or a failing statement."""


def is_database_outage(exc: BaseException) -> bool:
    """True for errors that mean 'the database is unreachable', as opposed to a bug."""
    return isinstance(exc, (DatabaseError, psycopg2.OperationalError, psycopg2.InterfaceError))


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


def _clean_error(exc: BaseException, dsn: str) -> str:
    text = " ".join(str(exc).split())
    return redact(text, _password_of(dsn))


# --------------------------------------------------------------------------- the pool

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

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.pid, "max": self.max, "size": self.size,
                "in_use": self.in_use, "idle": self.size - self.in_use, "checkouts": self.checkouts,
                "waits": self.waits, "timeouts": self.timeouts, "replaced": self.replaced,
                "created": self.created}


class ConnectionManager:
    """A bounded pool of psycopg2 connections for this process.

    `with db.transaction() as tx:` checks a connection out (waiting up to `checkout_timeout`
    for a free one), commits when the block ends and rolls back when it raises. The one-shot
    helpers `execute`, `fetchall`, `fetchone`, `fetchval` and `fetchdicts` each run one query
    string as its own transaction (several statements in one string share it). Connections
    are opened lazily, in the process that uses them.
    """

    def __init__(self, dsn: str, *, role: str = "main", minconn: int = 0, maxconn: int = 4,
                 checkout_timeout: float = 10.0, connect_timeout: float = 5.0):
        if maxconn < 1:
            raise ValueError("maxconn must be at least 1")
        self.dsn = dsn
        self.role = role
        self.minconn = minconn
        self.maxconn = maxconn
        self.checkout_timeout = checkout_timeout
        self.connect_timeout = connect_timeout
        self.target = describe_target(dsn)
        self._closed = False
        self._reset_state()
        _MANAGERS.add(self)

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[Any] = []
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
            raise DatabaseError(f"cannot connect to {self.target}: {_clean_error(exc, self.dsn)}") from None
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
            self._cond.notify()

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
            for conn in idle:
                self._owned.discard(conn)
                with contextlib.suppress(Exception):
                    conn.close()
            self._cond.notify_all()


# --------------------------------------------------------------------------- migrations

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str = field(repr=False)
    sha256: str = ""

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass
class MigrationStatus:
    applied: list[dict[str, Any]]
    pending: list[Migration]
    drifted: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {"applied": len(self.applied), "pending": len(self.pending),
                "drifted": self.drifted, "pending_names": [m.label for m in self.pending],
                "latest": self.applied[-1]["label"] if self.applied else None}


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNNN_name.sql (lower case)")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"{path}: version {version:04d} is used twice")
        sql = path.read_text(encoding="utf-8")
        found[version] = Migration(version, match.group(2), sql, hashlib.sha256(sql.encode()).hexdigest())
    return [found[v] for v in sorted(found)]


class Migrator:
    """Applies ordered, checksummed SQL migrations, each with its history row in one transaction.

    Migrators in several processes serialise on a PostgreSQL advisory lock, so each migration
    is applied exactly once. A migration whose file changed after it was applied is drift:
    it is reported, and migrating refuses until it is resolved.
    """

    HISTORY = "dims_schema_migrations"

    def __init__(self, db: ConnectionManager, directory: Path = MIGRATIONS_DIR, lock_timeout: float = 120.0):
        self.db = db
        self.directory = directory
        self.lock_timeout = lock_timeout

    def _applied(self, tx: Transaction) -> list[dict[str, Any]]:
        if tx.fetchval("SELECT to_regclass(%s)", (self.HISTORY,)) is None:
            return []
        rows = tx.fetchdicts(f"SELECT version, name, sha256, applied_at, duration_ms FROM {self.HISTORY} ORDER BY version")
        for row in rows:
            row["label"] = f"{row['version']:04d}_{row['name']}"
        return rows

    def _compare(self, applied: list[dict[str, Any]], files: list[Migration]) -> MigrationStatus:
        by_version = {m.version: m for m in files}
        done = {row["version"] for row in applied}
        drifted = []
        for row in applied:
            migration = by_version.get(row["version"])
            if migration is None:
                drifted.append({"version": row["version"], "name": row["label"],
                                "reason": "applied, but its file is missing"})
            elif migration.sha256 != row["sha256"]:
                drifted.append({"version": row["version"], "name": row["label"],
                                "reason": f"file changed since it was applied (sha256 {row['sha256'][:12]} "
                                          f"applied, {migration.sha256[:12]} on disk)"})
        pending = [m for m in files if m.version not in done]
        return MigrationStatus(applied, pending, drifted)

    def status(self) -> MigrationStatus:
        files = discover_migrations(self.directory)
        with self.db.transaction() as tx:
            return self._compare(self._applied(tx), files)

    def migrate(self, dry_run: bool = False) -> list[Migration]:
        """Apply what is pending (or, with dry_run, just list it). Returns those migrations."""
        files = discover_migrations(self.directory)
        if dry_run:
            status = self.status()
            self._refuse_drift(status)
            return status.pending
        conn = self.db.connect(autocommit=True, role_suffix=":migrate")
        try:
            return self._migrate_locked(conn, files)
        except psycopg2.errors.LockNotAvailable:
            raise MigrationError(f"another migrator held the migration lock for over {self.lock_timeout:g} s") from None
        finally:
            conn.close()

    def _refuse_drift(self, status: MigrationStatus) -> None:
        if status.drifted:
            lines = "; ".join(f"{d['name']}: {d['reason']}" for d in status.drifted)
            raise MigrationError(f"migrations have drifted, refusing to migrate: {lines}")

    def _migrate_locked(self, conn: Any, files: list[Migration]) -> list[Migration]:
        cur = conn.cursor()
        cur.execute("SET lock_timeout = %s", (f"{int(self.lock_timeout * 1000)}ms",))
        cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        cur.execute("SET lock_timeout = 0")
        try:
            cur.execute(f"""CREATE TABLE IF NOT EXISTS {self.HISTORY} (
                version integer PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(), duration_ms double precision NOT NULL)""")
            tx = Transaction(conn)
            status = self._compare(self._applied(tx), files)
            self._refuse_drift(status)
            for migration in status.pending:
                self._apply(conn, migration)
            return status.pending
        finally:
            if not conn.closed:
                cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))

    def _apply(self, conn: Any, migration: Migration) -> None:
        started = time.perf_counter()
        conn.autocommit = False
        try:
            with conn.cursor() as cur:
                cur.execute(migration.sql)
                cur.execute(f"INSERT INTO {self.HISTORY} (version, name, sha256, duration_ms) VALUES (%s, %s, %s, %s)",
                            (migration.version, migration.name, migration.sha256,
                             (time.perf_counter() - started) * 1000))
            conn.commit()
        except psycopg2.Error as exc:
            conn.rollback()
            raise MigrationError(f"migration {migration.label} failed and was rolled back: "
                                 f"{' '.join(str(exc).split())}") from None
        finally:
            conn.autocommit = True
        log.info("applied migration %s in %.1f ms", migration.label, (time.perf_counter() - started) * 1000)


# --------------------------------------------------------------------------- embedded PostgreSQL

_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin",
              "/opt/homebrew/opt/postgresql*/bin", "/usr/local/opt/postgresql*/bin",
              "/Applications/Postgres.app/Contents/Versions/*/bin")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for ".s.PGSQL.5432"


def find_postgres_bin() -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then the usual places."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    pg_config = shutil.which("pg_config")
    candidates: list[str] = []
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                             timeout=10).stdout.strip())
    for pattern in _BIN_GLOBS:
        candidates.extend(sorted(glob.glob(pattern), key=_version_key, reverse=True))
    for candidate in candidates:
        if candidate and all((Path(candidate) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    raise DatabaseError(
        "no PostgreSQL server binaries found (looked for initdb and pg_ctl on PATH and in "
        "/usr/lib/postgresql/*/bin and similar). Install them (Debian/Ubuntu: "
        "apt-get install postgresql; macOS: brew install postgresql) or set DATABASE_URL to "
        "a server you already have.")


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


class EmbeddedPostgres:
    """A private PostgreSQL cluster for DIMS alone: unix socket only, no TCP.

    Lives under `{data_dir}/postgres` (as root, where the `postgres` OS user can reach it; when
    it cannot, under /var/tmp with a pointer left in the data directory). Started once and
    reused: several processes calling `ensure_running()` at once get one server.
    """

    SUPERUSER = "dims"
    DATABASE = "dims"
    PORT = 5432

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).absolute()
        self.run_as = self._server_user()
        self.root = self._cluster_root()
        self.pgdata = self.root / "data"
        self.socket_dir = self._socket_dir()
        self.log_file = self.root / "server.log"

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.PORT} user={self.SUPERUSER} dbname={self.DATABASE}"

    # -- where it lives and who runs it

    @staticmethod
    def _server_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise DatabaseError("PostgreSQL refuses to run as root and there is no 'postgres' OS user to run "
                                "the embedded server as: create one (useradd --system postgres), run DIMS "
                                "as an ordinary user, or set DATABASE_URL") from None

    def _reachable_by_server_user(self, path: Path) -> bool:
        for parent in [path, *path.parents]:
            st = parent.stat()
            if st.st_uid == self.run_as.pw_uid:
                mode_ok = st.st_mode & 0o100
            elif st.st_gid == self.run_as.pw_gid:
                mode_ok = st.st_mode & 0o010
            else:
                mode_ok = st.st_mode & 0o001
            if not mode_ok:
                return False
        return True

    def _cluster_root(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        local = self.data_dir / "postgres"
        if self.run_as is None or self._reachable_by_server_user(self.data_dir):
            return local
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:12]
        return Path("/var/tmp") / f"dims-postgres-{digest}"

    def _socket_dir(self) -> Path:
        preferred = self.root / "run"
        if len(str(preferred)) <= _SOCKET_PATH_MAX:
            return preferred
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path("/tmp") / f"dims-pg-{digest}"

    def _run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        extra: dict[str, Any] = {}
        env = dict(os.environ, LC_ALL=_server_locale())
        if self.run_as is not None:
            extra = {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}
            env.update(HOME=self.run_as.pw_dir, USER="postgres", LOGNAME="postgres")
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=self.root,
                              env=env, start_new_session=True, **extra)

    def _own_dir(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)
        os.chmod(path, 0o700)

    # -- lifecycle

    def is_accepting(self) -> bool:
        try:
            conn = psycopg2.connect(f"host={self.socket_dir} port={self.PORT} user={self.SUPERUSER} "
                                    "dbname=postgres connect_timeout=2")
        except psycopg2.OperationalError:
            return False
        conn.close()
        return True

    def ensure_running(self, timeout: float = 60.0) -> str:
        """Start the server unless it already runs; return its DSN."""
        if self.is_accepting():
            return self.dsn
        bin_dir = find_postgres_bin()
        lock_path = self.data_dir / "postgres.lock"
        with open(lock_path, "a") as lock:
            _flock(lock, timeout)
            if self.is_accepting():  # someone else started it while we waited
                return self.dsn
            self._own_dir(self.root)
            self._own_dir(self.socket_dir)
            if self.root != self.data_dir / "postgres":
                (self.data_dir / "postgres.location").write_text(f"{self.root}\n")
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(bin_dir, timeout)
            self._start(bin_dir, timeout)
        return self.dsn

    def _initdb(self, bin_dir: Path, timeout: float) -> None:
        log.info("creating the embedded PostgreSQL cluster in %s", self.pgdata)
        result = self._run([str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", self.SUPERUSER,
                            "-A", "trust", "-E", "UTF8", f"--locale={_server_locale()}", "--no-instructions"], timeout)
        if result.returncode != 0:
            raise DatabaseError(f"initdb failed for the embedded PostgreSQL in {self.pgdata}: "
                                f"{result.stderr.strip() or result.stdout.strip()}")
        settings = (f"\n# DIMS embedded server: unix socket only\nlisten_addresses = ''\n"
                    f"unix_socket_directories = '{self.socket_dir}'\nunix_socket_permissions = 0700\n")
        conf = self.pgdata / "postgresql.conf"
        with open(conf, "a") as fh:
            fh.write(settings)

    def _start(self, bin_dir: Path, timeout: float) -> None:
        log.info("starting the embedded PostgreSQL (socket in %s)", self.socket_dir)
        result = self._run([str(bin_dir / "pg_ctl"), "start", "-w", "-t", str(int(timeout)), "-D", str(self.pgdata),
                            "-l", str(self.log_file)], timeout + 5)
        if result.returncode != 0 or not self.is_accepting():
            tail = ""
            with contextlib.suppress(OSError):
                tail = " ".join(self.log_file.read_text(errors="replace").splitlines()[-5:])
            raise DatabaseError(f"the embedded PostgreSQL in {self.pgdata} did not start: "
                                f"{result.stderr.strip() or result.stdout.strip()} {tail}".strip())

    def server_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 30.0) -> bool:
        """Fast shutdown (SIGINT to the postmaster); True once the server has exited."""
        pid = self.server_pid()
        if pid is None:
            return True
        if not hasattr(os, "pidfd_open"):   # not Linux: ask pg_ctl, which waits for the exit
            result = self._run([str(find_postgres_bin() / "pg_ctl"), "stop", "-w", "-m", "fast",
                                "-t", str(int(timeout)), "-D", str(self.pgdata)], timeout + 5)
            return result.returncode == 0
        try:
            waiter = os.pidfd_open(pid)   # the exit becomes an event to wait for
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([waiter], [], [], timeout)[0])
        finally:
            os.close(waiter)


@functools.lru_cache(maxsize=1)
def _server_locale() -> str:
    """C.UTF-8 where the system has it (case-insensitive search works for every script), else C."""
    try:
        available = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "C"
    return "C.UTF-8" if "c.utf8" in available.lower() else "C"


def _flock(fh: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise DatabaseError(f"timed out after {timeout:g} s waiting for {fh.name}") from None
            time.sleep(0.05)


# --------------------------------------------------------------------------- coordination


def ensure_database(dsn: str, connect_timeout: float = 5.0) -> None:
    """Create the DSN's database when the server says it does not exist (safe when racing)."""
    params = dsn_params(dsn)
    try:
        psycopg2.connect(dsn, connect_timeout=max(1, round(connect_timeout))).close()
        return
    except psycopg2.OperationalError as exc:
        if "does not exist" not in str(exc) or "database" not in str(exc):
            raise DatabaseError(f"cannot connect to {describe_target(dsn)}: {_clean_error(exc, dsn)}") from None
    name = params.get("dbname") or params.get("user")
    for maintenance in ("postgres", "template1"):
        try:
            admin = psycopg2.connect(psycopg2.extensions.make_dsn(dsn, dbname=maintenance),
                                     connect_timeout=max(1, round(connect_timeout)))
        except psycopg2.OperationalError:
            continue
        try:
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
            log.info("created database %s", name)
        except psycopg2.errors.DuplicateDatabase:
            pass
        except psycopg2.Error as exc:
            raise DatabaseError(f"database {name} does not exist and could not be created: "
                                f"{_clean_error(exc, dsn)}") from None
        finally:
            admin.close()
        return
    raise DatabaseError(f"database {name} does not exist on {describe_target(dsn)} and no maintenance "
                        "database was reachable to create it")


class DatabaseIntegrationManager:
    """Start-up and shutdown of the database for one DIMS process.

    `initialize_database_coordination()` reaches the server (starting the embedded one when
    no URL is configured), creates the database if needed, applies pending migrations under
    the advisory lock, and returns this process's pool. `shutdown()` closes the pool.
    """

    def __init__(self, config: Config, role: str = "main", pool_max: int | None = None):
        self.config = config
        self.role = role
        self.pool_max = pool_max or config.database.pool_max
        self.embedded = None if config.database.url else EmbeddedPostgres(config.data_dir)
        self.db: ConnectionManager | None = None

    def resolve_dsn(self) -> str:
        if self.embedded is not None:
            return self.embedded.ensure_running()
        return self.config.database.url

    def connection_manager(self) -> ConnectionManager:
        if self.db is None:
            dsn = self.resolve_dsn()
            ensure_database(dsn, self.config.database.connect_timeout)
            db_conf = self.config.database
            self.db = ConnectionManager(dsn, role=self.role, minconn=min(db_conf.pool_min, self.pool_max),
                                        maxconn=self.pool_max, checkout_timeout=db_conf.checkout_timeout,
                                        connect_timeout=db_conf.connect_timeout)
        return self.db

    def initialize_database_coordination(self, migrate: bool = True) -> ConnectionManager:
        db = self.connection_manager()
        if migrate:
            applied = Migrator(db).migrate()
            if applied:
                log.info("database ready: applied %s", ", ".join(m.label for m in applied))
        db.warm_up()
        return db

    def shutdown(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None
