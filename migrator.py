"""Migrations: ordered, named, checksummed SQL files, each applied with its history row in one
transaction, under a PostgreSQL advisory lock.

`discover_migrations()` reads `migrations/NNNN_name.sql`; `Migrator(db).status()` compares them
with the `dims_schema_migrations` history (applied, pending, drifted) and `Migrator(db).migrate()`
applies what is pending. Migrators in any number of processes serialise on the lock, so each
migration is applied exactly once; an applied migration whose file changed or vanished is drift,
and migrating refuses until it is resolved.

Called by the start-up path (`multiprocess_connection_manager`, which re-exports these names for
the CLI's `db_status` and `db_migrate`) and by the tests. Imports the standard library, psycopg2
and `db_pool`; never the embedded server, the start-up path, `config` or telegram.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors

from db_pool import ConnectionManager, DatabaseError, Transaction

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x44494D53_4D494752  # "DIMSMIGR": the advisory lock for migrators


class MigrationError(DatabaseError):
    """Migrations cannot run: drift, a broken file, or a failing statement."""


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
