"""The embedded PostgreSQL: a private cluster for DIMS alone, run from the system's binaries.

`EmbeddedPostgres(data_dir).ensure_running()` finds initdb and pg_ctl (`find_postgres_bin()`),
creates the cluster under `{data_dir}/postgres` on first use, starts it with a unix socket only
and returns its DSN; processes starting it at the same time serialise on a file lock and get one
server, started with the `max_connections` it is given. A server already running is never started
a second time: one that does not let us in yet (starting up, recovering) is waited for, one whose
connections are all taken is an error saying so; `running_pid()` trusts a lock file's pid only
if that process works in this cluster. As root it runs the server as the `postgres` OS user.
`stop()` is a fast shutdown.

Called by the start-up path (`multiprocess_connection_manager`, which re-exports it for the CLI's
`db_stop` and `system_health`), the test fixtures and the benchmarks. Imports the standard
library, psycopg2, `backoff` and `db_pool` (for `DatabaseError`); never the migrator, the
start-up path, `config` or telegram.
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
import time
from pathlib import Path
from typing import Any

import psycopg2

from backoff import Backoff
from db_pool import DatabaseError, server_is_full

log = logging.getLogger(__name__)

_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin",
              "/opt/homebrew/opt/postgresql*/bin", "/usr/local/opt/postgresql*/bin",
              "/Applications/Postgres.app/Contents/Versions/*/bin")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for ".s.PGSQL.5432"
LOCK_POLL_FIRST = 0.01  # s: the first wait for the start-up lock; the waits double from here
LOCK_POLL_CAP = 0.1     # s: and stop growing here, so a released lock is taken soon


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

    def __init__(self, data_dir: Path, max_connections: int | None = None):
        """`max_connections`: the server's, when this call starts it (None: PostgreSQL's default,
        100); a server already running keeps its own."""
        self.data_dir = Path(data_dir).absolute()
        self.max_connections = max_connections
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
        return self.refusal() is None

    def refusal(self) -> str | None:
        """None when the server lets us in; else why not, in the server's words (or the driver's,
        when nothing listens)."""
        try:
            conn = psycopg2.connect(f"host={self.socket_dir} port={self.PORT} user={self.SUPERUSER} "
                                    "dbname=postgres connect_timeout=2")
        except psycopg2.OperationalError as exc:
            return " ".join(str(exc).split()) or "no answer"
        conn.close()
        return None

    def running_pid(self) -> int | None:
        """The postmaster's pid while one runs on this cluster, whether or not it lets anyone in:
        the pid its lock file names, if that process works in this cluster's data directory (a
        stale lock file's pid may since belong to anything)."""
        pid = self.server_pid()
        if pid is None:
            return None
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except FileNotFoundError:
            return None
        except OSError:   # no /proc (not Linux), or not ours to read: a live process is all that can be told
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return pid
        return pid if Path(cwd) == self.pgdata.resolve() else None

    def ensure_running(self, timeout: float = 60.0) -> str:
        """Start the server unless it already runs; return its DSN. A running server that does
        not let us in yet (starting up, recovering, its socket not made yet) is waited for, up to
        `timeout`, never started a second time; one whose connections are all taken is a
        DatabaseError saying so at once."""
        deadline = time.monotonic() + timeout
        if self._wait_while_running(deadline) is None:
            return self.dsn
        bin_dir = find_postgres_bin()
        lock_path = self.data_dir / "postgres.lock"
        with open(lock_path, "a") as lock:
            _flock(lock, timeout)
            if self._wait_while_running(deadline) is None:   # someone else started it while we waited
                return self.dsn
            self._own_dir(self.root)
            self._own_dir(self.socket_dir)
            if self.root != self.data_dir / "postgres":
                (self.data_dir / "postgres.location").write_text(f"{self.root}\n")
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(bin_dir, timeout)
            self._start(bin_dir, timeout)
        return self.dsn

    def _wait_while_running(self, deadline: float) -> str | None:
        """None once the server lets us in; while a postmaster runs on this cluster and does not,
        wait (DatabaseError when all its connections are taken, or at the deadline); else why
        nothing answered (nothing runs: the caller may start it)."""
        delays = Backoff(0.05, 1.0)
        while True:
            refusal = self.refusal()
            if refusal is None:
                return None
            pid = self.running_pid()
            if pid is None:
                return refusal
            if server_is_full(refusal):
                raise DatabaseError(f"the embedded PostgreSQL in {self.pgdata} (pid {pid}) runs but lets no one in: "
                                    f"too many connections, every slot of its max_connections is taken ({refusal})")
            if time.monotonic() >= deadline:
                raise DatabaseError(f"the embedded PostgreSQL in {self.pgdata} (pid {pid}) runs but lets no one in: "
                                    f"{refusal}")
            time.sleep(min(delays.next(), max(0.0, deadline - time.monotonic())))

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
        options = ["-o", f"-c max_connections={self.max_connections}"] if self.max_connections else []
        result = self._run([str(bin_dir / "pg_ctl"), "start", "-w", "-t", str(int(timeout)), "-D", str(self.pgdata),
                            "-l", str(self.log_file), *options], timeout + 5)
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
        """Fast shutdown (SIGINT to the postmaster); True once the server has exited (or none ran:
        a stale lock file's pid is never signalled)."""
        pid = self.running_pid()
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
    """Take an exclusive lock on `fh`, waiting up to `timeout` s for another process to let go.

    The holder is usually starting the server (a few seconds at most), so the waits start short
    and stay small: the lock is taken soon after it is released.
    """
    deadline = time.monotonic() + timeout
    delays = Backoff(LOCK_POLL_FIRST, LOCK_POLL_CAP)
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseError(f"timed out after {timeout:g} s waiting for {fh.name}") from None
            time.sleep(min(delays.next(), remaining))
