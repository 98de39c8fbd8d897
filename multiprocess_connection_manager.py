"""The database layer's start-up path, and its face: the one module the rest of DIMS imports.

`DatabaseIntegrationManager` is what every DIMS process (the supervisor, each bot child, the
operator CLI) calls to start and stop its database: find or start the server (the embedded one
when no URL is configured), create the database if it is missing (`ensure_database`), migrate
under the advisory lock, and hand back this process's own pool.

The layer is one concept per file, imported in one direction:

    db_pool            errors, DSN helpers, the per-process psycopg2 pool
    migrator           migrations (imports db_pool)
    embedded_postgres  the embedded server (imports db_pool)
    this module        the start-up path (imports all three)

This module re-exports the names callers use (`__all__`), so `girls_manager`, `bot`,
`supervisor`, `demo`, the CLI, the tests and the benchmarks import from here alone. Imports the
standard library, psycopg2, `config` and the three modules above; nothing else of DIMS, never
telegram.
"""

from __future__ import annotations

import logging

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.sql

from config import Config
from connection_budget import embedded_max_connections
from db_pool import (
    ConnectionManager, DatabaseError, PoolStats, PoolTimeout, Transaction, clean_error, describe_target,
    dsn_params, is_database_outage, refuses_us,
)
from embedded_postgres import EmbeddedPostgres, find_postgres_bin
from migrator import (
    MIGRATION_LOCK_KEY, MIGRATIONS_DIR, Migration, MigrationError, MigrationStatus, Migrator, discover_migrations,
)

__all__ = [
    # db_pool
    "ConnectionManager", "Transaction", "PoolStats", "DatabaseError", "PoolTimeout", "is_database_outage",
    "refuses_us", "describe_target", "dsn_params",
    # migrator
    "Migrator", "Migration", "MigrationStatus", "MigrationError", "discover_migrations", "MIGRATIONS_DIR",
    "MIGRATION_LOCK_KEY",
    # embedded_postgres
    "EmbeddedPostgres", "find_postgres_bin",
    # the start-up path
    "ensure_database", "DatabaseIntegrationManager",
]

log = logging.getLogger(__name__)


def ensure_database(dsn: str, connect_timeout: float = 5.0) -> None:
    """Create the DSN's database when the server says it does not exist (safe when racing)."""
    params = dsn_params(dsn)
    try:
        psycopg2.connect(dsn, connect_timeout=max(1, round(connect_timeout))).close()
        return
    except psycopg2.OperationalError as exc:
        if "does not exist" not in str(exc) or "database" not in str(exc):
            raise DatabaseError(f"cannot connect to {describe_target(dsn)}: {clean_error(exc, dsn)}") from None
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
                cur.execute(psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(name)))
            log.info("created database %s", name)
        except psycopg2.errors.DuplicateDatabase:
            pass
        except psycopg2.Error as exc:
            raise DatabaseError(f"database {name} does not exist and could not be created: "
                                f"{clean_error(exc, dsn)}") from None
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
        self.embedded = None if config.database.url else EmbeddedPostgres(
            config.data_dir, max_connections=embedded_max_connections(config.database))
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
