"""The operator's database commands as real processes: concurrent db_migrate, db_status on the
embedded server, an unreachable server, and configuration errors; and the CLI's argument parsing."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from enhanced_ipc_commands import COMMANDS, build_parser, named_command
from multiprocess_connection_manager import EmbeddedPostgres, discover_migrations
from tests.conftest import ROOT, reachable_tempdir
from tests.support import copy_installation

CLI = [sys.executable, str(ROOT / "enhanced_ipc_commands.py")]


def run_cli(*args: str, env: dict[str, str], timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_db_migrate_eight_times_at_once_applies_every_migration_once(cli_env):
    procs = [subprocess.Popen([*CLI, "db_migrate", "--json"], env=cli_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 8, outputs
    applied = [name for out, _ in outputs for name in json.loads(out)["migrations"]]
    assert sorted(applied) == [m.label for m in discover_migrations()]

    status = run_cli("db_status", "--json", env=cli_env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["connected"] is True
    assert report["migrations"]["pending"] == 0
    assert report["migrations"]["drifted"] == []
    assert report["migrations"]["applied"] == len(discover_migrations())
    assert any(c["process"] == "dims:cli" for c in report["connections"])


def test_db_migrate_dry_run_lists_and_applies_nothing(cli_env):
    result = run_cli("db_migrate", "--dry-run", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("would apply: 0001_core")
    status = json.loads(run_cli("--json", "db_status", env=cli_env).stdout)
    assert status["migrations"]["applied"] == 0
    assert status["migrations"]["pending"] == len(discover_migrations())


def test_db_status_with_nothing_configured_starts_the_embedded_server_and_then_reuses_it(tmp_path):
    home = reachable_tempdir("dims-test-cli-embedded-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "DATABASE_URL"))}
    try:
        first = run_cli("db_status", "--json", env=env, cwd=home)
        assert first.returncode == 0, first.stderr
        second = run_cli("db_status", "--json", env=env, cwd=home)
        assert second.returncode == 0, second.stderr
        one, two = json.loads(first.stdout), json.loads(second.stdout)
        assert one["embedded"] and one["connected"]
        assert one["server_started"] == two["server_started"]
        assert (home / "var" / "postgres" / "data" / "PG_VERSION").exists()
        human = run_cli("db_status", env=env, cwd=home)
        assert "(embedded)" in human.stdout and "PostgreSQL 15" in human.stdout
    finally:
        EmbeddedPostgres(home / "var").stop()
        shutil.rmtree(home, ignore_errors=True)


def test_db_stop_stops_the_embedded_server_unless_dims_uses_it_and_system_health_does_not_restart_it():
    home = reachable_tempdir("dims-test-cli-stop-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "DATABASE_URL"))}
    server = EmbeddedPostgres(home / "var")
    try:
        assert run_cli("db_status", env=env, cwd=home).returncode == 0     # starts it
        bot = psycopg2.connect(server.dsn, application_name="dims:bot:alpha")   # a DIMS process using it
        refused = run_cli("db_stop", env=env, cwd=home)
        assert refused.returncode == 1 and "in use by dims:bot:alpha (1)" in refused.stderr
        assert server.is_accepting()
        forced = run_cli("db_stop", "--force", "--json", env=env, cwd=home)
        assert forced.returncode == 0, forced.stderr
        report = json.loads(forced.stdout)
        assert report["stopped"] and report["users"] == [{"process": "dims:bot:alpha", "connections": 1}]
        assert not server.is_accepting() and server.server_pid() is None
        bot.close()
        health = run_cli("system_health", "--json", env=env, cwd=home)
        assert health.returncode == 1
        database = json.loads(health.stdout)["database"]
        assert database["status"] == "down" and "is not running" in database["reason"]
        assert not server.is_accepting()                                  # the health check started nothing
        again = run_cli("db_stop", env=env, cwd=home)
        assert again.returncode == 0 and "is not running" in again.stdout
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_db_stop_leaves_a_configured_database_server_alone(cli_env):
    refused = run_cli("db_stop", env=cli_env)
    assert refused.returncode == 2 and "database.url or DATABASE_URL" in refused.stderr


def test_refused_database_fails_at_once_naming_the_host_without_the_password(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    env = dict(os.environ, DATABASE_URL=f"postgresql://dims:s3cretPassw0rd@127.0.0.1:{port}/dims",
               DIMS_DATA_DIR=str(tmp_path))
    for args in (["db_status"], ["db_status", "--json"], ["db_migrate"]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1
        assert "127.0.0.1" in result.stdout + result.stderr
        assert "s3cretPassw0rd" not in result.stdout + result.stderr


def test_silent_database_times_out_within_the_connect_timeout_plus_a_second(tmp_path):
    """A server that accepts TCP and never speaks: db_status gives up after connect_timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted = []
    stop = threading.Event()

    def accept_and_stay_silent():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_stay_silent, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    config = tmp_path / "dims.toml"
    config.write_text(f'[database]\nurl = "postgresql://ops:pa55word@127.0.0.1:{port}/dims"\nconnect_timeout = 2\n')
    try:
        started = time.monotonic()
        result = run_cli("db_status", "--json", "--config", str(config), env=dict(os.environ), timeout=30)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["connected"] is False and "127.0.0.1" in report["error"]
    assert "pa55word" not in result.stdout + result.stderr
    assert elapsed < 2 + 1 + 0.5, f"took {elapsed:.1f} s"  # connect timeout + a second (+ interpreter start)


@pytest.mark.parametrize("content, key, reason", [
    ('[database]\npool_max = "four"\n', "database.pool_max", "expected an integer, got a string"),
    ('[database]\npool_maxx = 4\n', "database.pool_maxx", "unknown key"),
    ('[[bots]]\nname = "Alpha!"\ntoken = "1:abc"\n', "bots[0].name", "must match"),
    ('[supervisor]\nstop_timeout = -1\n', "supervisor.stop_timeout", "must be greater than 0"),
    ('[database\nurl = 1\n', "not valid TOML", "line 1"),
])
def test_bad_config_file_exits_2_naming_the_file_the_key_and_the_reason(tmp_path, content, key, reason):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = run_cli("db_status", "--config", str(config), env=dict(os.environ))
    assert result.returncode == 2
    assert str(config) in result.stderr and key in result.stderr and reason in result.stderr
    assert result.stdout == ""


def test_a_missing_token_variable_is_an_error_only_for_the_process_that_runs_the_bot(cli_env, tmp_path):
    config = tmp_path / "tokens.toml"
    config.write_text('[[bots]]\nname = "alpha"\ntoken_env = "NO_SUCH_VAR_FOR_DIMS"\n')
    for command in ("db_status", "db_migrate"):
        result = run_cli(command, "--config", str(config), env=cli_env)
        assert result.returncode == 0, result.stderr
    listed = run_cli("bot_list", "--config", str(config), env=cli_env)
    assert listed.returncode == 3 and "not running" in listed.stderr      # no supervisor: said, no token asked
    single = subprocess.run([sys.executable, str(ROOT / "main.py"), "--single", "--config", str(config)],
                            env=cli_env, capture_output=True, text=True, timeout=60)
    assert single.returncode == 2
    assert str(config) in single.stderr and "bots[0].token_env" in single.stderr
    assert "NO_SUCH_VAR_FOR_DIMS is not set" in single.stderr


def test_usage_errors_exit_2(cli_env):
    assert run_cli("no_such_command", env=cli_env).returncode == 2
    assert run_cli("db_migrate", "--dry-runn", env=cli_env).returncode == 2
    assert run_cli("db_status", "--config", "/nonexistent/dims.toml", env=cli_env).returncode == 2


@pytest.mark.parametrize("argv, named", [
    (["bot_list"], "bot_list"),
    (["--json", "bot_stop", "alpha", "--timeout", "3"], "bot_stop"),
    (["--config", "bot_list", "db_status"], "db_status"),      # a configuration file named like a command
    (["--config=bot_list", "--json", "girls_add", "Ann"], "girls_add"),
    (["--conf", "bot_list", "db_status"], None),               # an abbreviation: the whole parser decides
    (["-h", "bot_list"], None),
    (["bot_lis"], None),
    (["--config"], None),
    ([], None),
])
def test_a_plain_command_line_names_its_command(argv, named):
    assert named_command(argv) == named


@pytest.mark.parametrize("argv", [
    ["bot_list"], ["--json", "bot_stop", "alpha", "--timeout", "3"], ["--config", "bot_list", "db_status"],
    ["--config=x.toml", "girls_add", "Ann", "--tags", "a,b", "--json"], ["cache_stats"], ["db_migrate", "--dry-run"],
])
def test_the_parser_built_for_one_command_parses_like_the_whole_one(argv):
    assert named_command(argv) is not None
    assert build_parser(only=named_command(argv)).parse_args(argv) == build_parser().parse_args(argv)


@pytest.mark.parametrize("args, error", [
    (["no_such_command", "--json"], "invalid choice: 'no_such_command'"),
    (["--json", "bot_stop"], "the following arguments are required: NAME"),
    (["--json", "db_status", "--config", "/nonexistent/dims.toml"], "configuration error: /nonexistent/dims.toml"),
    (["--json", "chat", "alpha"], "chat is a conversation on this terminal"),
])
def test_with_json_even_a_usage_or_configuration_error_is_one_json_object(cli_env, args, error):
    result = run_cli(*args, env=cli_env)
    assert result.returncode == 2
    assert error in json.loads(result.stdout)["error"]
    assert error in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_command_gets_a_suggestion_and_both_entry_points_have_a_version(cli_env):
    typo = run_cli("bot_lst", env=cli_env)
    assert typo.returncode == 2 and "invalid choice: 'bot_lst'" in typo.stderr and "did you mean bot_list?" in typo.stderr
    far = run_cli("frobnicate", env=cli_env)
    assert far.returncode == 2 and "did you mean" not in far.stderr
    from version import __version__
    for program in (ROOT / "enhanced_ipc_commands.py", ROOT / "main.py", ROOT / "dims"):
        shown = subprocess.run([sys.executable, str(program), "--version"], env=cli_env, capture_output=True,
                               text=True, timeout=30)
        assert (shown.returncode, shown.stdout.strip()) == (0, f"DIMS {__version__}"), program


def test_main_help_tells_the_demo_mode_the_environment_and_the_exit_codes(cli_env):
    shown = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], env=cli_env, capture_output=True,
                           text=True, timeout=30)
    assert shown.returncode == 0
    for text in ("demo", "DATABASE_URL", "TELEGRAM_API_URL", "DIMS_CONFIG", "DIMS_DATA_DIR", "DIMS_SOCKET",
                 "BOT_TOKEN", "exit status", "--version", "SIGHUP"):
        assert text in shown.stdout, text


def test_the_cli_finds_the_installations_config_from_any_directory_and_names_what_it_tried(tmp_path, cli_env):
    installation = copy_installation(tmp_path / "dims-install")
    (installation / "dims.toml").write_text('[[bots]]\nname = "alpha"\ntoken_env = "ALPHA_TOKEN"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "bin" / "dims"
    link.parent.mkdir()
    link.symlink_to(installation / "dims")
    env = {k: v for k, v in cli_env.items() if not k.startswith("DIMS_")}
    listed = subprocess.run([sys.executable, str(link), "bot_list"], env=env, cwd=elsewhere, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode == 3
    socket_path = installation / "var" / "dims.sock"
    assert f"no control socket at {socket_path}" in listed.stderr
    assert f"data directory {installation / 'var'}, the default, var beside {installation / 'dims.toml'}" \
        in listed.stderr
    (installation / "dims.toml").unlink()
    nothing = subprocess.run([sys.executable, str(link), "bot_list"], env=env, cwd=elsewhere, capture_output=True,
                             text=True, timeout=60)
    assert nothing.returncode == 3
    assert f"data directory {elsewhere / 'var'}, the default, var in the working directory" in nothing.stderr
    assert str(installation / "dims.toml") in nothing.stderr      # where it looked for a configuration


def test_a_database_command_without_the_requirements_says_what_to_install(tmp_path, cli_env):
    installation = copy_installation(tmp_path / "bare")       # no virtual environment beside it
    bare = subprocess.run([sys.executable, "-S", str(installation / "dims"), "db_status"], env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2, bare.stderr
    assert "Traceback" not in bare.stderr and "ModuleNotFoundError" not in bare.stderr
    assert "needs the Python package 'psycopg2'" in bare.stderr
    assert f"{installation / 'run'}" in bare.stderr and "pip install -r" in bare.stderr
    fleet = subprocess.run([sys.executable, "-S", str(installation / "dims"), "bot_list"], env=cli_env,
                           capture_output=True, text=True, timeout=60)
    assert fleet.returncode == 3, fleet.stderr      # a fleet command needs nothing beyond the standard library
    main = subprocess.run([sys.executable, "-S", str(installation / "main.py")], env=cli_env, capture_output=True,
                          text=True, timeout=60)
    assert main.returncode == 2 and "Traceback" not in main.stderr and "python-telegram-bot" in main.stderr


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="no .venv: ./run makes it")
def test_a_database_command_on_a_python_without_the_requirements_runs_in_the_installations_venv(cli_env):
    result = subprocess.run([sys.executable, "-S", str(ROOT / "dims"), "db_status", "--json"], env=cli_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["connected"] is True


def test_help_lists_every_command(cli_env):
    shown = run_cli("--help", env=cli_env)
    assert shown.returncode == 0
    assert all(name in shown.stdout for name in COMMANDS)
    assert run_cli("--json", "bot_stop", env=cli_env).returncode == 2   # NAME missing: the subcommand's usage
