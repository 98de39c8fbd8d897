"""A bot that starts while PostgreSQL is down: under the supervisor (restarted after a kill -9
during the outage) and alone (`--single`). It waits for the database, says so in bot_list and
its log (once per doubling), can be stopped meanwhile, never spends its restart budget on the
outage, and answers what users sent as soon as the database is back. Real processes, a real
PostgreSQL of the test's own (so it can be stopped), the sandbox as Telegram."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from telegram_sandbox import Sandbox
from tests.conftest import ROOT, private_postgres
from tests.support import ADMIN, TOKENS, Chat, DimsProcess, dims_env, write_config
from tests.test_bot import _cli_json, _wait_for

TOKEN = TOKENS["alpha"]


@pytest.fixture
def own_postgres():
    with private_postgres("dims-test-start-outage-") as server:
        yield server


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="dims-so-"))   # a short path: the control socket lives here
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _row(env: dict, name: str) -> dict:
    return next(b for b in _cli_json(env, "bot_list")["bots"] if b["name"] == name)


def _ctl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_bot_killed_during_a_database_outage_waits_for_it_and_never_goes_fatal(tmp_path, own_postgres,
                                                                                short_dir):
    # Before: the restarted bot exited 75 at once, again and again; with this budget of 2 it was
    # FATAL within a second, and stayed so for fatal_cooldown after the database was back.
    config = write_config(tmp_path / "dims.toml", {"alpha": {"display_name": "Alpha", "admins": [ADMIN]},
                                                    "beta": {"display_name": "Beta"}},
                          extra="[supervisor]\nheartbeat_interval = 0.5\nrestart_budget = 2\n"
                                "start_timeout = 3\nfatal_cooldown = 300\n")
    with Sandbox() as sandbox:
        env = dims_env(own_postgres.ensure_running(), sandbox.api_url, short_dir)
        env["TMPDIR"] = str(short_dir)
        with DimsProcess(["--config", str(config)], env, tmp_path / "fleet.log") as fleet:
            Chat(sandbox, TOKEN, user_id=999).wait_until_answering()
            Chat(sandbox, TOKENS["beta"], user_id=999).wait_until_answering()
            assert own_postgres.stop()
            os.kill(_row(env, "alpha")["pid"], signal.SIGKILL)
            seq = sandbox.send(TOKEN, 401, "/start")["seq"]   # waits in Telegram meanwhile
            row = _wait_for(lambda: _row(env, "alpha"),
                            lambda r: r["state"] == "STARTING" and "waiting for the database" in (r["problem"] or ""),
                            timeout=20)
            assert row["restarts"] == 1 and row["pid"]
            health = _cli_json(env, "system_health")
            alpha = next(b for b in health["bots"] if b["name"] == "alpha")
            assert alpha["status"] == "down" and "waiting for the database" in alpha["reason"], alpha
            deadline = time.monotonic() + 6   # twice start_timeout: not killed as hung, no budget spent
            while time.monotonic() < deadline:
                row = _row(env, "alpha")
                assert row["state"] == "STARTING" and row["restarts"] == 1, row
            # A stop asked for while it waits is done at once, and a start waits again.
            assert _ctl(env, "bot_stop", "alpha").returncode == 0
            assert _row(env, "alpha")["state"] == "STOPPED"
            assert "stopped before the database answered" in fleet.log()
            started = _ctl(env, "bot_start", "alpha")   # answered as soon as the bot says what it waits for
            assert started.returncode == 1 and "bot alpha is STARTING: waiting for the database" in started.stderr, \
                started
            assert _row(env, "alpha")["state"] == "STARTING"
            own_postgres.ensure_running()
            reply = sandbox.wait_for_reply(TOKEN, 401, after_seq=seq, timeout=30)
            assert "Alpha" in reply["text"], "the message sent during the outage was answered"
            row = _wait_for(lambda: _row(env, "alpha"), lambda r: r["state"] == "RUNNING", timeout=20)
            assert row["restarts"] == 1 and row["problem"] is None
            assert "database: working again after" in fleet.log()
            assert fleet.process.poll() is None


def test_a_single_bot_started_while_the_database_is_down_waits_and_logs_once_per_doubling(tmp_path, own_postgres,
                                                                                         short_dir):
    dsn = own_postgres.ensure_running()
    assert own_postgres.stop()
    config = write_config(tmp_path / "dims.toml")
    with Sandbox() as sandbox:
        env = dims_env(dsn, sandbox.api_url, short_dir)
        seq = sandbox.send(TOKEN, 402, "/start")["seq"]
        with DimsProcess(["--single", "--config", str(config)], env, tmp_path / "bot.log") as proc:
            log = _wait_for(proc.log, lambda text: "retrying in 3.2 s" in text, timeout=30)
            delays = [float(d) for d in re.findall(r"waiting for the database to start.*retrying in ([\d.]+) s", log)]
            assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2], delays   # one line per doubling
            assert proc.process.poll() is None, "it waits; it does not exit"
            own_postgres.ensure_running()
            assert "Alpha" in sandbox.wait_for_reply(TOKEN, 402, after_seq=seq, timeout=30)["text"]
            assert "database: working again after" in proc.log()


def test_a_single_bot_waiting_for_the_database_stops_at_once_on_sigterm(tmp_path, own_postgres, short_dir):
    dsn = own_postgres.ensure_running()
    assert own_postgres.stop()
    with Sandbox() as sandbox:
        proc = DimsProcess(["--single", "--config", str(write_config(tmp_path / "dims.toml"))],
                           dims_env(dsn, sandbox.api_url, short_dir), tmp_path / "bot.log").start()
        _wait_for(proc.log, lambda text: "waiting for the database to start" in text, timeout=30)
        assert proc.stop(timeout=5) == 0
        assert "stopped before the database answered" in proc.log()


def test_a_database_that_refuses_the_bot_ends_its_start_at_once(tmp_path, own_postgres, short_dir):
    dsn = own_postgres.ensure_running() + " user=nobody_here"
    with Sandbox() as sandbox:
        proc = DimsProcess(["--single", "--config", str(write_config(tmp_path / "dims.toml"))],
                           dims_env(dsn, sandbox.api_url, short_dir), tmp_path / "bot.log").start()
        assert proc.process.wait(30) == 75
        assert "cannot start" in proc.log() and "waiting for the database" not in proc.log()
