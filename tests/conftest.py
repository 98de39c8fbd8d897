"""Shared fixtures: a real PostgreSQL server for the test session, a fresh database per test.

The server is DIMS's own embedded PostgreSQL, started in a temporary directory (as the
`postgres` OS user when the tests run as root). Set DIMS_TEST_DATABASE_URL to a superuser DSN
to run against a server you already have instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg2
import psycopg2.extensions
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from multiprocess_connection_manager import ConnectionManager, EmbeddedPostgres  # noqa: E402


def reachable_tempdir(prefix: str) -> Path:
    """A temporary directory the `postgres` OS user can enter too (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def private_postgres(prefix: str, subdir: str = "", max_connections: int | None = None):
    """A PostgreSQL of a test's own (the embedded server in a fresh directory, `subdir` of it
    when given: DIMS's data directory), running; stopped and removed afterwards."""
    home = reachable_tempdir(prefix)
    server = EmbeddedPostgres(home / subdir if subdir else home, max_connections=max_connections)
    try:
        server.ensure_running()
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_dsn():
    """A superuser DSN on a running server, for the whole session."""
    external = os.environ.get("DIMS_TEST_DATABASE_URL")
    if external:
        yield external
        return
    home = reachable_tempdir("dims-test-pg-")
    server = EmbeddedPostgres(home)
    dsn = server.ensure_running()
    try:
        yield psycopg2.extensions.make_dsn(dsn, dbname="postgres")
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def create_database(admin_dsn: str) -> str:
    name = f"dims_test_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return psycopg2.extensions.make_dsn(admin_dsn, dbname=name)


def drop_database(admin_dsn: str, dsn: str) -> None:
    name = psycopg2.extensions.parse_dsn(dsn)["dbname"]
    conn = psycopg2.connect(admin_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def database_url(pg_admin_dsn):
    """The DSN of a new, empty database, dropped after the test."""
    dsn = create_database(pg_admin_dsn)
    yield dsn
    drop_database(pg_admin_dsn, dsn)


@pytest.fixture
def db(database_url):
    manager = ConnectionManager(database_url, role="test", maxconn=4, checkout_timeout=5)
    yield manager
    manager.close()


@pytest.fixture
def cli_env(database_url, tmp_path):
    """Environment for running DIMS commands as subprocesses against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "DATABASE_URL", "BOT_TOKEN"))}
    env.update(DATABASE_URL=database_url, DIMS_DATA_DIR=str(tmp_path / "var"), PYTHONUNBUFFERED="1")
    return env
