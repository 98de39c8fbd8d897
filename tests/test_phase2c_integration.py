"""The smoke test: every layer imports, and `python main.py` runs a two-bot fleet that answers
Telegram users and is operated from the CLI, then stops cleanly on SIGTERM. Also the demo that
runs when nothing is configured. Real PostgreSQL, real processes, the sandbox as Telegram."""

from __future__ import annotations

import importlib
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from telegram_sandbox import Sandbox
from tests.conftest import ROOT
from tests.support import TOKENS, Chat, DimsProcess, dims_env, write_config

LAYERS = ["config", "backoff", "states", "version", "pipe_protocol", "process_setup", "control", "host",
          "db_pool", "migrator", "embedded_postgres", "multiprocess_connection_manager", "roster_rules",
          "roster_cache", "girls_manager", "inbox", "handlers", "bot", "bot_process", "database_agent", "supervisor",
          "roster_files", "health", "inbox_commands", "control_requests", "cli_output", "enhanced_ipc_commands",
          "telegram_sandbox", "demo", "main"]


def cli(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str, env: dict[str, str]) -> tuple[int, dict]:
    result = cli(*args, "--json", env=env)
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("layer", LAYERS)
def test_every_layer_imports(layer):
    module = importlib.import_module(layer)
    assert module.__doc__, f"{layer} opens with a docstring"


def test_cli_imports_no_telegram():
    probe = subprocess.run([sys.executable, "-c", "import sys, enhanced_ipc_commands; "
                            "print(any(m.startswith(('telegram', 'httpx')) for m in sys.modules))"],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "False"


def test_two_bots_answer_are_operated_from_the_cli_and_stop_cleanly(tmp_path, database_url):
    home = Path(tempfile.mkdtemp(prefix="dims-smoke-"))
    config = write_config(tmp_path / "dims.toml", {"alpha": {"display_name": "Alpha"}, "beta": {"display_name": "Beta"}})
    with Sandbox() as sandbox:
        env = dims_env(database_url, sandbox.api_url, home)
        env.update(DIMS_CONFIG=str(config), TMPDIR=str(home))
        with DimsProcess([], env, tmp_path / "fleet.log") as fleet:
            assert "Alpha" in Chat(sandbox, TOKENS["alpha"]).wait_until_answering()["text"]
            assert "Beta" in Chat(sandbox, TOKENS["beta"]).wait_until_answering()["text"]

            code, listing = cli_json("bot_list", env=env)
            assert code == 0 and {b["name"]: b["state"] for b in listing["bots"]} == {"alpha": "RUNNING", "beta": "RUNNING"}
            pids = [b["pid"] for b in listing["bots"]]
            assert "alpha" in cli("bot_list", env=env).stdout

            code, health = cli_json("system_health", env=env)
            assert (code, health["status"]) == (0, "ok"), health
            assert health["database"]["migrations"]["pending"] == 0
            assert [(b["status"], b["reason"]) for b in health["bots"]] == [("ok", None), ("ok", None)]

            stopped = cli("bot_stop", "beta", env=env)
            assert stopped.returncode == 0 and "bot beta is STOPPED" in stopped.stdout
            code, listing = cli_json("bot_list", env=env)
            assert [b["state"] for b in listing["bots"]] == ["RUNNING", "STOPPED"]
            assert listing["bots"][0]["pid"] == pids[0], "bot_stop touches no other bot"
            started = cli("bot_start", "beta", env=env)
            assert started.returncode == 0 and "bot beta is RUNNING" in started.stdout
            assert "Beta" in Chat(sandbox, TOKENS["beta"], user_id=77).say("/start")["text"]

            code, status = cli_json("db_status", env=env)
            assert code == 0 and {p["bot"] for p in status["pools"]} == {"alpha", "beta"}
            assert {"dims:bot:alpha", "dims:bot:beta"} <= {c["process"] for c in status["connections"]}

            code, cache = cli_json("cache_stats", env=env)
            assert code == 0 and {b["name"] for b in cache["bots"]} == {"alpha", "beta"}
            assert cli("bot_start", "gamma", env=env).returncode == 2

            assert fleet.stop() == 0
            log = fleet.log()
        assert cli("bot_list", env=env).returncode == 3
    shutil.rmtree(home, ignore_errors=True)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert "STOPPING -> STOPPED" in log
    for token in TOKENS.values():
        assert token not in log and token.split(":")[1] not in log


def test_with_nothing_configured_main_runs_the_demo(tmp_path, database_url):
    home = Path(tempfile.mkdtemp(prefix="dims-demo-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "BOT_TOKEN", "TELEGRAM_API_URL"))}
    env.update(DATABASE_URL=database_url, DIMS_DATA_DIR=str(home), PYTHONUNBUFFERED="1", TMPDIR=str(home))
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py")], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        seen = []
        while not any("RUNNING" in line and "bot beta" in line for line in seen) or \
                not any("RUNNING" in line and "bot alpha" in line for line in seen):
            seen.append(lines.get(timeout=60))
        assert any("DIMS demo: 2 bots" in line for line in seen)
        assert any("enhanced_ipc_commands.py chat alpha" in line for line in seen)
        chat = cli("chat", "alpha", env=env, stdin="/start\n/girls\n#2\n")
        assert chat.returncode == 0, chat.stderr
        assert "Demo Alpha" in chat.stdout and "12 profiles" in chat.stdout
        assert "[1] Ada" in chat.stdout and "Bianca" in chat.stdout
        process.terminate()
        assert process.wait(30) == 0
        assert not (home / "demo.toml").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        shutil.rmtree(home, ignore_errors=True)


def _start_demo(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    """`python main.py` with nothing configured, once both demo bots are RUNNING; its output so far."""
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py")], env=env, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    while not all(any("RUNNING" in line and f"bot {name}:" in line for line in seen) for name in ("alpha", "beta")):
        seen.append(lines.get(timeout=60))
    return process, seen


def test_a_second_demo_is_refused_before_it_prints_or_changes_anything(tmp_path, database_url):
    home = Path(tempfile.mkdtemp(prefix="dims-demo2-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "BOT_TOKEN", "TELEGRAM_API_URL"))}
    env.update(DATABASE_URL=database_url, DIMS_DATA_DIR=str(home), PYTHONUNBUFFERED="1", TMPDIR=str(home))
    first, _ = _start_demo(env, tmp_path)
    try:
        demo_config = (home / "demo.toml").read_text()
        second = subprocess.run([sys.executable, str(ROOT / "main.py")], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 1
        assert f"another supervisor is running (pid {first.pid})" in second.stderr
        assert "DIMS demo" not in second.stdout + second.stderr, "no banner for a demo that does not run"
        assert (home / "demo.toml").read_text() == demo_config, "the running demo's configuration is untouched"
        chat = cli("chat", "alpha", env=env, stdin="/start\n")
        assert chat.returncode == 0 and "Demo Alpha" in chat.stdout, chat.stderr
        first.terminate()
        assert first.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("bots", [{"alpha": {}}, {}], ids=["fleet", "demo"])
def test_an_unreachable_database_stops_main_with_status_1_naming_the_host(tmp_path, bots):
    config = write_config(tmp_path / "dims.toml", bots,
                          extra='[database]\nurl = "postgresql://dims:n0tShown@127.0.0.1:1/dims"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "DATABASE_URL", "BOT_TOKEN"))}
    env.update(DIMS_DATA_DIR=str(tmp_path / "var"), TMPDIR=str(tmp_path), **{"ALPHA_TOKEN": TOKENS["alpha"]})
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "127.0.0.1" in result.stderr and "n0tShown" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_when_the_supervisor_cannot_run_one_bot_runs_anyway_with_a_warning(tmp_path, database_url):
    config = write_config(tmp_path / "dims.toml", {"alpha": {"display_name": "Alpha"}, "beta": {}})
    with Sandbox() as sandbox:
        env = dims_env(database_url, sandbox.api_url, tmp_path / "var")
        env["DIMS_SOCKET"] = "/dev/null/dims.sock"   # a control socket that cannot be made
        multi = subprocess.run([sys.executable, str(ROOT / "main.py"), "--multi", "--config", str(config)],
                               env=env, capture_output=True, text=True, timeout=60)
        assert multi.returncode == 1 and "the supervisor cannot run: cannot open the control socket" in multi.stderr
        with DimsProcess(["--config", str(config)], env, tmp_path / "fallback.log") as fallback:
            assert "Alpha" in Chat(sandbox, TOKENS["alpha"]).wait_until_answering()["text"]
            assert fallback.stop() == 0
        log = fallback.log()
    assert "WARNING" in log and "falling back to single-bot mode with bot 'alpha'" in log
    assert "cannot open the control socket /dev/null/dims.sock" in log
