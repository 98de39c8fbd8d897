"""The database connection budget: the arithmetic (pure), the embedded server sized for the
configured budget, a server too small for the fleet refused at start (exit 2, both settings
named), and a running server whose slots are all taken reported as such by db_status and
system_health, which never try to start a second one. Real PostgreSQL servers, real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import psycopg2
import pytest

from config import DatabaseConfig
from connection_budget import embedded_max_connections, need, refusal
from multiprocess_connection_manager import EmbeddedPostgres
from tests.conftest import ROOT, private_postgres, reachable_tempdir
from tests.support import write_config
from tests.test_supervisor import SUPERVISOR_SETTINGS, Fleet, sandbox  # noqa: F401 (fixture)

CLI = [sys.executable, str(ROOT / "enhanced_ipc_commands.py")]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "DATABASE_URL", "BOT_TOKEN"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


# --------------------------------------------------------------------------- the arithmetic


def test_a_fleet_needs_its_pools_a_listener_each_and_the_reserve():
    db = DatabaseConfig(pool_max=4, max_connections=80)
    assert need(db, 2).total == 2 * (4 + 1) + 3
    assert need(db, 20).pool == 2 and need(db, 20).total == 20 * (2 + 1) + 3   # the pools shrink to fit 80


def test_a_server_that_holds_the_fleet_is_not_refused():
    assert refusal(DatabaseConfig(), 10, 100, 3, "the server") is None


def test_a_server_too_small_is_refused_naming_both_settings_and_a_budget_that_fits():
    text = refusal(DatabaseConfig(max_connections=1000), 40, 100, 3, "database dims on db:5432 as dims")
    assert "needs up to 203 database connections (40 bot processes x (pool 4 + 1 listener) + 3" in text
    assert "max_connections = 100 with superuser_reserved_connections = 3, so 97" in text
    assert "set [database] max_connections = 97" in text and "database dims on db:5432" in text


def test_a_server_too_small_for_even_the_smallest_pools_says_how_big_it_must_be():
    text = refusal(DatabaseConfig(max_connections=1000), 60, 100, 3, "the server")
    assert ("raise the server's max_connections to 306 or more (or to 126, with [database] max_connections = "
            "123), or run fewer bots") in text


def test_the_embedded_server_started_with_a_smaller_budget_is_to_be_stopped_and_started_again():
    text = refusal(DatabaseConfig(max_connections=1000), 40, 100, 3, "the server", embedded=True)
    assert "stop it (enhanced_ipc_commands.py db_stop, once DIMS is stopped)" in text


def test_postgresql_16s_reserved_connections_are_kept_from_the_fleet_too():
    text = refusal(DatabaseConfig(), 2, 20, 3, "the server", reserved=5)   # 2 x 5 + 3 = 13 > 20 - 8
    assert "superuser_reserved_connections = 3 and reserved_connections = 5, so 12 for everyone else" in text
    assert refusal(DatabaseConfig(), 2, 21, 3, "the server", reserved=5) is None


def test_the_embedded_server_is_given_the_whole_budget_and_spare_but_never_less_than_the_default():
    assert embedded_max_connections(DatabaseConfig(max_connections=80)) == 100
    assert embedded_max_connections(DatabaseConfig(max_connections=1000)) == 1010


# --------------------------------------------------------------------------- real servers


@pytest.fixture
def small_server():
    """A PostgreSQL of 12 connections (3 of them for superusers), as an external server would be."""
    with private_postgres("dims-test-budget-", max_connections=12) as server:
        yield server


def test_the_embedded_server_dims_starts_fits_the_configured_budget(tmp_path):
    home = reachable_tempdir("dims-test-budget-embedded-")
    config = write_config(home / "dims.toml", {}, extra="[database]\nmax_connections = 300\n")
    try:
        started = subprocess.run([*CLI, "db_status", "--json", "--config", str(config)], env=_env(),
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        conn = psycopg2.connect(EmbeddedPostgres(home / "var").dsn)
        with conn, conn.cursor() as cur:
            cur.execute("SHOW max_connections")
            assert cur.fetchone()[0] == "310"
        conn.close()
    finally:
        EmbeddedPostgres(home / "var").stop()
        shutil.rmtree(home, ignore_errors=True)


def test_a_fleet_the_server_cannot_hold_is_refused_at_start_with_exit_2(small_server, tmp_path):
    bots = {f"bot{n}": {} for n in range(3)}   # 3 x (4 + 1) + 3 = 18 > 12 - 3
    config = write_config(tmp_path / "dims.toml", bots)
    env = _env(DATABASE_URL=small_server.dsn, DIMS_DATA_DIR=str(tmp_path / "var"),
               **{f"BOT{n}_TOKEN": f"700000{n}:AAFakeTokenForTestsOnly_budget{n:08d}" for n in range(3)})
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--multi", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "needs up to 18 database connections" in done.stderr
    assert "max_connections = 12 with superuser_reserved_connections = 3, so 9" in done.stderr
    assert "set [database] max_connections = 9" in done.stderr
    assert "bot bot0: started" not in done.stderr


def test_single_refuses_a_server_that_cannot_hold_even_one_bot(tmp_path):
    # 4 for non-superusers; one bot needs 4 + 1 + 3
    with private_postgres("dims-test-budget-single-", max_connections=7) as server:
        config = write_config(tmp_path / "dims.toml")
        env = _env(DATABASE_URL=server.dsn, DIMS_DATA_DIR=str(tmp_path / "var"),
                   ALPHA_TOKEN="7000001:AAFakeTokenForTestsOnly_alpha00000000")
        done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--single", "--config", str(config)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "max_connections = 7 with superuser_reserved_connections = 3, so 4" in done.stderr


def test_a_full_embedded_server_is_reported_as_full_and_never_started_twice():
    with private_postgres("dims-test-budget-full-", subdir="var", max_connections=6) as server:
        home = server.data_dir.parent
        pid = server.server_pid()
        held = []
        try:
            while True:   # take every slot, the superusers' too
                try:
                    held.append(psycopg2.connect(server.dsn.replace("dbname=dims", "dbname=postgres")))
                except psycopg2.OperationalError as exc:
                    assert "too many clients" in str(exc)
                    break
            env = _env()
            status = subprocess.run([*CLI, "db_status"], env=env, cwd=home, capture_output=True, text=True,
                                    timeout=60)
            assert status.returncode == 1
            out = status.stdout + status.stderr
            assert "too many connections" in out and f"(pid {pid}) runs but lets no one in" in out, out
            assert "lock file" not in out and "did not start" not in out
            health = subprocess.run([*CLI, "system_health", "--json"], env=env, cwd=home, capture_output=True,
                                    text=True, timeout=60)
            assert health.returncode == 1
            database = json.loads(health.stdout)["database"]
            assert database["status"] == "down" and "too many connections" in database["reason"], database
            assert server.server_pid() == pid
            assert "starting the embedded PostgreSQL" not in status.stderr + health.stderr
        finally:
            for conn in held:
                conn.close()


def test_a_reload_the_server_cannot_hold_is_refused_and_the_fleet_runs_on(small_server, tmp_path, sandbox):
    fleet = Fleet(tmp_path, small_server.dsn, sandbox, {"alpha": {}})   # 1 x (4 + 1) + 3 = 8: fits in 9
    try:
        fleet.start(["alpha"])
        pid = fleet.row("alpha")["pid"]
        write_config(fleet.config, {"alpha": {}, "beta": {}}, extra=SUPERVISOR_SETTINGS)   # 13: does not
        answer = fleet.ctl({"command": "reload"})
        assert answer["status"] == "error", answer
        assert "not reloaded: the fleet needs up to 13 database connections" in answer["reason"]
        assert [b["name"] for b in fleet.ctl({"command": "bot_list"})["bots"]] == ["alpha"]
        assert fleet.row("alpha")["pid"] == pid
    finally:
        fleet.close()
