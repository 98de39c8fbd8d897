"""The database layer against a real PostgreSQL: pools per process, checkout limits, replaced
sessions, concurrent migrators, drift, and the embedded server."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pytest

from config import load_config, pool_max_for
from multiprocess_connection_manager import (
    ConnectionManager, DatabaseError, DatabaseIntegrationManager, EmbeddedPostgres, MigrationError,
    Migrator, PoolTimeout, discover_migrations, ensure_database,
)
from tests.conftest import ROOT, reachable_tempdir

# --------------------------------------------------------------------------- the pool


def _child_backend_pid(manager: ConnectionManager, queue) -> None:
    queue.put((manager.fetchval("SELECT pg_backend_pid()"), manager.stats()["pid"]))


def test_forked_child_gets_its_own_pool_and_leaves_the_parents_session_alone(db):
    with db.transaction() as tx:
        parent_backend = tx.fetchval("SELECT pg_backend_pid()")
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_child_backend_pid, args=(db, queue))
    child.start()
    child_backend, child_pool_pid = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert child_backend != parent_backend
    assert child_pool_pid == child.pid
    # The child exited (and garbage-collected its inherited copy): the parent's session lives on.
    with db.transaction() as tx:
        assert tx.fetchval("SELECT pg_backend_pid()") == parent_backend
    assert db.stats()["replaced"] == 0


def test_application_name_names_the_process_role(db):
    assert db.fetchval("SELECT current_setting('application_name')") == "dims:test"


def test_exhausted_pool_waits_for_a_connection_then_fails_clearly(database_url):
    pool = ConnectionManager(database_url, role="tiny", maxconn=1, checkout_timeout=0.3)
    held = threading.Event()
    release = threading.Event()

    def hold():
        with pool.transaction():
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    with pytest.raises(PoolTimeout, match=r"no database connection became free within 0.3 s .*all 1 of the tiny pool"):
        pool.fetchval("SELECT 1")

    # A waiter is served as soon as the holder gives its connection back.
    pool.checkout_timeout = 10
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.fetchval("SELECT 42")))
    waiter.start()
    release.set()
    waiter.join(10)
    holder.join(10)
    assert got == [42]
    stats = pool.stats()
    assert stats["timeouts"] == 1 and stats["waits"] >= 2 and stats["size"] == 1
    pool.close()


def _server_connections(dsn: str, role: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (f"dims:{role}",))
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("idle_timeout, left", [(0.3, 1), (60.0, 3)])
def test_connections_idle_past_the_idle_timeout_are_closed_down_to_minconn(database_url, idle_timeout, left):
    role = f"idle-{int(idle_timeout * 10)}"
    pool = ConnectionManager(database_url, role=role, minconn=1, maxconn=4, idle_timeout=idle_timeout)
    try:
        with pool.transaction(), pool.transaction(), pool.transaction():   # a burst: three at once
            pass
        assert _server_connections(database_url, role) == 3
        time.sleep(0.4)   # the pool idles past the short timeout (not past the long one)
        assert pool.fetchval("SELECT 1") == 1   # a use after the pause lets the pool shrink
        deadline = time.monotonic() + 5
        while _server_connections(database_url, role) != left:   # a closed session ends a moment later
            assert time.monotonic() < deadline, _server_connections(database_url, role)
            time.sleep(0.02)
        stats = pool.stats()
        assert stats["size"] == left and stats["released"] == 3 - left
    finally:
        pool.close()


def test_connection_killed_by_the_server_is_replaced_transparently(db, pg_admin_dsn):
    first = db.fetchval("SELECT pg_backend_pid()")
    admin = psycopg2.connect(pg_admin_dsn)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s, 10000)", (first,))  # waits until it has exited
        assert cur.fetchone()[0] is True
    admin.close()
    second = db.fetchval("SELECT pg_backend_pid()")
    assert second != first
    assert db.stats()["replaced"] == 1


def test_failed_transaction_rolls_back_and_the_connection_is_reused(db):
    db.execute("CREATE TABLE t (x int PRIMARY KEY)")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        with db.transaction() as tx:
            tx.execute("INSERT INTO t VALUES (1)")
            tx.execute("INSERT INTO t VALUES (1)")
    assert db.fetchval("SELECT count(*) FROM t") == 0
    assert db.stats()["created"] == 1


def test_pool_sizes_stay_inside_the_connection_budget():
    conf = load_config(env={}).database
    assert pool_max_for(conf, 1) == conf.pool_max
    assert pool_max_for(conf.__class__(pool_max=10, max_connections=50), 10) == 3   # (50 - 3) // 10 - 1
    with pytest.raises(Exception, match="database.max_connections = 10 is too small for 10 bot processes"):
        pool_max_for(conf.__class__(max_connections=10), 10)


# --------------------------------------------------------------------------- migrations


def _write_migrations(directory: Path, count: int) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "0001_log.sql").write_text("CREATE TABLE applied_log (version int, at timestamptz DEFAULT now());\n"
                                            "INSERT INTO applied_log (version) VALUES (1);\n")
    for version in range(2, count + 1):
        (directory / f"{version:04d}_step_{version}.sql").write_text(
            f"SELECT pg_sleep(0.05);\nINSERT INTO applied_log (version) VALUES ({version});\n")


def _migrate_in_process(dsn: str, directory: str, barrier, results) -> None:
    manager = ConnectionManager(dsn, role="migrator", maxconn=1)
    barrier.wait(30)
    try:
        applied = Migrator(manager, Path(directory)).migrate()
        results.put(("ok", [m.version for m in applied]))
    except Exception as exc:  # reported to the test, which fails on it
        results.put(("error", repr(exc)))


def test_eight_concurrent_migrators_apply_each_migration_exactly_once(database_url, tmp_path):
    _write_migrations(tmp_path / "m", 5)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_process, args=(database_url, str(tmp_path / "m"), barrier, results))
             for _ in range(8)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    applied_versions = sorted(v for _, versions in outcomes for v in versions)
    assert applied_versions == [1, 2, 3, 4, 5]
    db = ConnectionManager(database_url, role="check")
    assert db.fetchall("SELECT version, count(*) FROM applied_log GROUP BY version ORDER BY version") == \
        [(v, 1) for v in range(1, 6)]
    status = Migrator(db, tmp_path / "m").status()
    assert (len(status.applied), status.pending, status.drifted) == (5, [], [])
    db.close()


def test_changed_applied_migration_is_drift_and_blocks_migrating(db, tmp_path):
    _write_migrations(tmp_path, 2)
    Migrator(db, tmp_path).migrate()
    (tmp_path / "0002_step_2.sql").write_text("SELECT 1;\n")
    (tmp_path / "0003_more.sql").write_text("CREATE TABLE more (x int);\n")
    status = Migrator(db, tmp_path).status()
    assert [d["name"] for d in status.drifted] == ["0002_step_2"]
    assert "file changed since it was applied" in status.drifted[0]["reason"]
    assert [m.label for m in status.pending] == ["0003_more"]
    with pytest.raises(MigrationError, match="drifted, refusing to migrate: 0002_step_2"):
        Migrator(db, tmp_path).migrate()
    assert db.fetchval("SELECT to_regclass('more')") is None
    (tmp_path / "0002_step_2.sql").unlink()
    assert "file is missing" in Migrator(db, tmp_path).status().drifted[0]["reason"]


def test_failing_migration_is_rolled_back_with_its_history_row(db, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (x int);\n")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half (x int);\nSELECT * FROM no_such_table;\n")
    with pytest.raises(MigrationError, match="0002_bad failed and was rolled back: .*no_such_table"):
        Migrator(db, tmp_path).migrate()
    assert db.fetchval("SELECT to_regclass('half')") is None
    assert [m.label for m in Migrator(db, tmp_path).status().pending] == ["0002_bad"]


def test_dry_run_lists_pending_and_applies_nothing(db):
    pending = Migrator(db).migrate(dry_run=True)
    assert [m.label for m in pending] == [m.label for m in discover_migrations()]
    assert db.fetchval("SELECT to_regclass('dims_schema_migrations')") is None


def test_misnamed_migration_file_is_refused(tmp_path):
    (tmp_path / "1_first.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="NNNN_name.sql"):
        discover_migrations(tmp_path)


def test_core_migration_creates_the_supervisor_tables(db):
    Migrator(db).migrate()
    tables = {r[0] for r in db.fetchall("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"dims_bots", "dims_events", "dims_schema_migrations"} <= tables


def test_integration_manager_creates_the_database_and_migrates(pg_admin_dsn, tmp_path):
    import psycopg2.extensions as ext
    dsn = ext.make_dsn(pg_admin_dsn, dbname=f"dims_created_{os.getpid()}")
    config = load_config(env={"DATABASE_URL": dsn}, data_dir=tmp_path)
    manager = DatabaseIntegrationManager(config, role="test")
    try:
        db = manager.initialize_database_coordination()
        assert db.fetchval("SELECT count(*) FROM dims_schema_migrations") == len(discover_migrations())
    finally:
        manager.shutdown()
        admin = psycopg2.connect(pg_admin_dsn)
        admin.autocommit = True
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "dims_created_{os.getpid()}" WITH (FORCE)')
        admin.close()


def test_a_database_name_with_quotes_and_spaces_is_created_as_named(pg_admin_dsn):
    import psycopg2.extensions as ext
    import psycopg2.sql as sql
    name = f'dims "odd" name; {os.getpid()}'
    try:
        ensure_database(ext.make_dsn(pg_admin_dsn, dbname=name))
        conn = psycopg2.connect(ext.make_dsn(pg_admin_dsn, dbname=name))
        with conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone()[0] == name
        conn.close()
    finally:
        admin = psycopg2.connect(pg_admin_dsn)
        admin.autocommit = True
        admin.cursor().execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


# --------------------------------------------------------------------------- embedded server


def _start_embedded(home: str, results) -> None:
    try:
        server = EmbeddedPostgres(Path(home))
        server.ensure_running()
        results.put(("ok", server.server_pid()))
    except Exception as exc:
        results.put(("error", repr(exc)))


def test_processes_starting_the_embedded_server_at_once_get_one_server():
    home = reachable_tempdir("dims-test-embedded-")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_start_embedded, args=(str(home), results)) for _ in range(4)]
    try:
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        assert all(kind == "ok" for kind, _ in outcomes), outcomes
        assert len({pid for _, pid in outcomes}) == 1
    finally:
        for proc in procs:
            proc.join(30)
        assert EmbeddedPostgres(home).stop()
        shutil.rmtree(home, ignore_errors=True)


def _as_ordinary_user(home: str, results) -> None:
    """In a forked child: drop root to `nobody`, then start the embedded server as that user."""
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    _start_embedded(home, results)


@pytest.mark.skipif(os.geteuid() != 0, reason="running as an ordinary user already; the root path needs root")
def _stand_in(cwd: Path, lock_dir: Path) -> subprocess.Popen:
    """A live process named as the postmaster in lock_dir's postmaster.pid, working in cwd."""
    stand_in = subprocess.Popen(["sleep", "60"], cwd=cwd)
    (lock_dir / "postmaster.pid").write_text(f"{stand_in.pid}\n{lock_dir}\n")
    return stand_in


def test_a_server_whose_lock_file_exists_before_its_socket_is_waited_for_not_given_up_on():
    # A postmaster writes postmaster.pid before it makes its socket: a process asking then must
    # wait for it (it used to fail at once with "No such file or directory").
    home = reachable_tempdir("dims-test-pg-early-")
    server = EmbeddedPostgres(home)
    try:
        server.ensure_running()
        assert server.stop()
        stand_in = _stand_in(server.pgdata, server.pgdata)   # "running", no socket yet
        assert server.running_pid() == stand_in.pid
        results: list = []
        waiter = threading.Thread(target=lambda: results.append(_outcome(server.ensure_running, 60)))
        waiter.start()
        time.sleep(0.5)   # the waiter meets the lock file without a socket
        stand_in.kill()   # and the "postmaster" goes away: the waiter starts the server itself
        stand_in.wait(10)
        waiter.join(90)
        assert results and results[0] == server.dsn, results
        assert server.is_accepting()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _outcome(call, *args):
    try:
        return call(*args)
    except Exception as exc:
        return exc


def test_a_stale_lock_file_naming_an_unrelated_process_is_not_taken_for_the_server(tmp_path):
    home = reachable_tempdir("dims-test-pg-stale-")
    server = EmbeddedPostgres(home)
    server.pgdata.mkdir(parents=True)
    stranger = _stand_in(tmp_path, server.pgdata)   # the pid, reused by something else
    try:
        assert server.server_pid() == stranger.pid and server.running_pid() is None
        assert server.stop()
        assert stranger.poll() is None, "db_stop must never signal a process that is not the server"
    finally:
        stranger.kill()
        stranger.wait(10)
        shutil.rmtree(home, ignore_errors=True)


def test_embedded_server_runs_as_postgres_for_root_and_as_the_user_otherwise():
    root_home = reachable_tempdir("dims-test-asroot-")
    user_home = reachable_tempdir("dims-test-asuser-")
    os.chown(user_home, pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    try:
        as_root = EmbeddedPostgres(root_home)
        as_root.ensure_running()
        assert (root_home / "postgres" / "data").stat().st_uid == pwd.getpwnam("postgres").pw_uid
        child = ctx.Process(target=_as_ordinary_user, args=(str(user_home), results))
        child.start()
        kind, pid = results.get(timeout=120)
        child.join(30)
        assert kind == "ok", pid
        assert Path(f"/proc/{pid}").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        assert EmbeddedPostgres(root_home).stop()
        assert EmbeddedPostgres(user_home).stop()
        shutil.rmtree(root_home, ignore_errors=True)
        shutil.rmtree(user_home, ignore_errors=True)


def test_root_without_a_reachable_data_dir_puts_the_cluster_where_postgres_can_reach_it(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root needs a directory the postgres user can reach")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    server = EmbeddedPostgres(private)
    assert str(server.root).startswith("/var/tmp/dims-postgres-")


def test_missing_postgres_binaries_give_install_advice(monkeypatch):
    import embedded_postgres
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(embedded_postgres, "_BIN_GLOBS", ())
    with pytest.raises(DatabaseError, match="apt-get install postgresql.*DATABASE_URL"):
        embedded_postgres.find_postgres_bin()


def test_the_start_up_lock_is_taken_once_its_holder_lets_go_and_given_up_at_the_deadline(tmp_path):
    from embedded_postgres import _flock
    path = tmp_path / "postgres.lock"
    with open(path, "a") as holder, open(path, "a") as waiter:   # two open files: flock treats them apart
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(DatabaseError, match=r"timed out after 0.3 s waiting for .*postgres\.lock"):
            _flock(waiter, 0.3)
        assert 0.3 <= time.monotonic() - started < 5

        release = threading.Timer(0.2, fcntl.flock, (holder, fcntl.LOCK_UN))
        release.start()
        started = time.monotonic()
        _flock(waiter, 60)
        release.join()
        assert time.monotonic() - started < 10, "the released lock was taken long before the deadline"
        with pytest.raises(BlockingIOError):
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)   # and it is the waiter's now


# --------------------------------------------------------------------------- the layer's shape

LAYER = ("db_pool", "migrator", "embedded_postgres", "multiprocess_connection_manager")
MUST_NOT_LOAD = {   # each file's docstring says what it must not import; a fresh interpreter checks
    "db_pool": {"migrator", "embedded_postgres", "multiprocess_connection_manager", "telegram"},
    "migrator": {"embedded_postgres", "multiprocess_connection_manager", "telegram"},
    "embedded_postgres": {"migrator", "multiprocess_connection_manager", "telegram"},
    "multiprocess_connection_manager": {"telegram", "girls_manager", "bot", "supervisor"},
}


@pytest.mark.parametrize("module", LAYER)
def test_each_database_file_imports_only_what_sits_below_it(module):
    probe = subprocess.run([sys.executable, "-c", f"import sys, {module}; print(sys.modules[{module!r}].__doc__ "
                            "is not None); print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr[-2000:]
    has_docstring, loaded = probe.stdout.splitlines()
    assert has_docstring == "True", f"{module} opens with a docstring"
    assert not MUST_NOT_LOAD[module] & set(loaded.split()), f"{module} loaded {MUST_NOT_LOAD[module] & set(loaded.split())}"


def test_callers_find_every_database_name_on_the_face():
    import db_pool
    import embedded_postgres
    import migrator
    import multiprocess_connection_manager as face
    homes: dict[str, object] = {}
    for module in (db_pool, migrator, embedded_postgres):   # lowest first: a name's home is where it is defined
        for name in vars(module):
            homes.setdefault(name, module)
    assert {"ConnectionManager", "Transaction", "DatabaseError", "PoolTimeout", "MigrationError",
            "is_database_outage", "Migrator", "discover_migrations", "EmbeddedPostgres",
            "DatabaseIntegrationManager"} <= set(face.__all__)
    for name in face.__all__:
        if name in homes:
            assert getattr(face, name) is getattr(homes[name], name), f"{name} is the same object as in its home"
        else:
            assert getattr(face, name).__module__ == face.__name__, name
