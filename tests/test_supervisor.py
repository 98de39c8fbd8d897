"""The supervisor with real processes and signals: deaths, crash loops, rejected tokens, hangs,
its own death, reload, and the control socket. The sandbox plays Telegram."""

from __future__ import annotations

import json
import multiprocessing.connection as mpc
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from multiprocess_connection_manager import ConnectionManager
from control import CACHE_FIELDS, HANDSHAKE_TIMEOUT, read_authkey, request
from states import ALLOWED_MOVES, State
from telegram_sandbox import Sandbox
from tests.conftest import ROOT
from tests.support import TOKENS, Chat, DimsProcess, copy_installation, dims_env, write_config

SUPERVISOR_SETTINGS = """
[supervisor]
heartbeat_interval = 0.5
heartbeat_timeout = 3
backoff_initial = 0.05
backoff_max = 1
restart_window = 30
restart_budget = 3
fatal_cooldown = 600
stop_timeout = 5
"""


@pytest.fixture
def sandbox():
    with Sandbox() as sb:
        yield sb


class Fleet:
    """`python main.py` with a config, and a control-socket client for it."""

    def __init__(self, tmp_path: Path, database_url: str, sandbox, bots: dict[str, dict]):
        self.tmp_path, self.sandbox = tmp_path, sandbox
        self.home = Path(tempfile.mkdtemp(prefix="dims-sv-"))   # short: AF_UNIX paths are limited
        self.config = write_config(tmp_path / "dims.toml", bots, extra=SUPERVISOR_SETTINGS)
        self.env = dims_env(database_url, sandbox.api_url, self.home)
        self.env["TMPDIR"] = str(self.home)   # the forkserver's socket directory goes away with it
        self.process = DimsProcess(["--config", str(self.config)], self.env, tmp_path / "fleet.log")

    @property
    def socket(self) -> Path:
        return self.home / "dims.sock"

    def start(self, names: list[str], timeout: float = 60) -> "Fleet":
        self.process.start()
        for name in names:
            self.wait_for(name, ["RUNNING"], timeout)
        return self

    def ctl(self, payload: dict, timeout: float = 30) -> dict:
        return request(self.socket, read_authkey(self.home), {**payload, "timeout": timeout}, timeout=timeout + 5)

    def wait_for(self, name: str, states: list[str], timeout: float = 30) -> dict:
        """Block until the supervisor reports the bot in one of states (its own event, no polling)."""
        deadline_reached = None
        for _ in range(int(timeout * 10)):
            try:
                answer = self.ctl({"command": "wait", "name": name, "states": states}, timeout)
                assert answer["status"] == "ok", answer
                return answer["bot"]
            except (FileNotFoundError, ConnectionRefusedError) as exc:   # not listening yet
                deadline_reached = exc
                if self.process.process.poll() is not None:
                    raise AssertionError(f"supervisor exited: {self.process.log()[-3000:]}")
                select.select([], [], [], 0.1)
        raise AssertionError(f"control socket never answered: {deadline_reached}")

    def row(self, name: str) -> dict:
        return next(b for b in self.ctl({"command": "bot_list"})["bots"] if b["name"] == name)

    def close(self) -> None:
        if self.process.process and self.process.process.poll() is None:
            self.process.stop()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def make_fleet(tmp_path, database_url, sandbox):
    fleets = []

    def make(bots: dict[str, dict] | None = None) -> Fleet:
        fleet = Fleet(tmp_path, database_url, sandbox, bots or {"alpha": {}, "beta": {}})
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


def eventually(read, done, timeout: float = 10.0):
    """read() until done(value) holds, for at most timeout seconds; the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        select.select([], [], [], 0.05)
        value = read()
    return value


def pid_exits_within(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the state table


def test_every_state_can_be_left_and_stopped_is_reachable_from_everywhere():
    assert set(ALLOWED_MOVES) == set(State)
    reachable = {State.STOPPED}
    changed = True
    while changed:  # walk the table backwards from STOPPED
        changed = False
        for state, targets in ALLOWED_MOVES.items():
            if state not in reachable and targets & reachable:
                reachable.add(state)
                changed = True
    assert reachable == set(State)
    assert State.RUNNING not in ALLOWED_MOVES[State.STOPPED], "RUNNING only after STARTING and ready"


# --------------------------------------------------------------------------- with real processes


def test_killed_bot_is_back_and_answering_with_the_restart_counted(make_fleet, sandbox):
    fleet = make_fleet().start(["alpha", "beta"])
    beta_pid = fleet.row("beta")["pid"]
    old = fleet.row("alpha")
    os.kill(old["pid"], signal.SIGKILL)
    fleet.wait_for("alpha", ["BACKOFF", "STARTING"])
    back = fleet.wait_for("alpha", ["RUNNING"])
    assert back["pid"] != old["pid"] and back["restarts"] == 1
    assert "SIGKILL" in (back["last_error"] or "")
    assert "Alpha" in Chat(sandbox, TOKENS["alpha"], user_id=71).say("/start")["text"]
    assert fleet.row("beta")["pid"] == beta_pid
    db = ConnectionManager(fleet.env["DATABASE_URL"], role="test")
    query = "SELECT kind, state_to, pid, message FROM dims_events WHERE bot = 'alpha' ORDER BY id"
    # The supervisor writes its event log from a thread: wait (with a deadline) for the last row.
    events = eventually(lambda: db.fetchall(query), lambda rows: len(rows) >= 9 and rows[-1][1] == "RUNNING")
    db.close()
    assert ("exit", None, old["pid"], "killed by SIGKILL") in events
    log = fleet.process.log()
    assert f"WARNING dims.supervisor: bot alpha: RUNNING -> EXITED (pid {old['pid']}): killed by SIGKILL" in log
    assert "WARNING dims.supervisor: bot alpha: EXITED -> BACKOFF: restarting in" in log
    kinds = [kind for kind, *_ in events]
    assert kinds.count("start") == 2 and "restart" in kinds
    assert [to for kind, to, *_ in events if kind == "state"] == \
        ["STARTING", "RUNNING", "EXITED", "BACKOFF", "STARTING", "RUNNING"]


def test_crash_loop_backs_off_then_goes_fatal_and_recovers_on_bot_start(make_fleet, sandbox):
    # A 400 is the request's fault: not retried, so every start crashes (a 5xx would be waited out).
    sandbox.fault(TOKENS["beta"], "getMe", status=400, times=1000)
    fleet = make_fleet().start(["alpha"])
    fatal = fleet.wait_for("beta", ["FATAL"], timeout=60)
    assert fatal["restarts"] == 3 and "restarts within 30 s" in fleet.process.log()
    log = fleet.process.log()
    delays = [float(line.split("restarting in ")[1].split(" s")[0]) for line in log.splitlines()
              if "bot beta: EXITED -> BACKOFF" in line]
    assert len(delays) == 3 and delays[0] < delays[-1], delays   # the backoff grows
    sandbox.fault(TOKENS["beta"], "getMe", status=400, times=0)   # the cause is fixed
    answer = fleet.ctl({"command": "bot_start", "name": "beta"})
    assert answer["status"] == "ok" and answer["bot"]["state"] == "RUNNING"
    assert "Beta" in Chat(sandbox, TOKENS["beta"], user_id=72).say("/start")["text"]


def test_rejected_token_is_fatal_at_once_without_restarts_and_other_bots_untouched(make_fleet, sandbox, tmp_path):
    token = "7000009:AAFakeTokenForTestsOnly_revoked00000"
    sandbox.revoke(token)
    fleet = make_fleet({"alpha": {}, "gamma": {}})
    fleet.env["GAMMA_TOKEN"] = token
    fleet.start(["alpha"])
    alpha_pid = fleet.row("alpha")["pid"]
    fatal = fleet.wait_for("gamma", ["FATAL"])
    assert fatal["restarts"] == 0 and "token rejected" in fatal["last_error"]
    assert fleet.row("gamma")["restarts"] == 0
    assert fleet.row("alpha")["pid"] == alpha_pid and fleet.row("alpha")["state"] == "RUNNING"
    assert token not in fleet.process.log() and token.split(":")[1] not in fleet.process.log()
    health = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "system_health", "--json"],
                            env=fleet.env, capture_output=True, text=True, timeout=60)
    report = json.loads(health.stdout)
    assert health.returncode == 1 and report["status"] == "degraded"
    assert [b["status"] for b in report["bots"]] == ["ok", "down"]
    assert any("bot gamma: FATAL" in problem for problem in report["problems"])


def test_hung_bot_is_killed_by_the_watchdog_and_restarted(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    pid = fleet.row("alpha")["pid"]
    os.kill(pid, signal.SIGSTOP)
    fleet.wait_for("alpha", ["BACKOFF", "STARTING"], timeout=20)
    back = fleet.wait_for("alpha", ["RUNNING"])
    assert back["pid"] != pid and "no heartbeat" in fleet.process.log()
    assert "Alpha" in Chat(sandbox, TOKENS["alpha"], user_id=73).say("/start")["text"]


def test_killed_supervisor_leaves_no_orphans(make_fleet):
    fleet = make_fleet().start(["alpha", "beta"])
    pids = [fleet.row(n)["pid"] for n in ("alpha", "beta")]
    fleet.process.kill()
    for pid in pids:
        assert pid_exits_within(pid, 10), f"bot process {pid} outlived the supervisor"


def test_reload_adds_a_bot_and_leaves_the_others_running(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    pid = fleet.row("alpha")["pid"]
    write_config(fleet.config, {"alpha": {}, "beta": {"display_name": "Beta Added"}}, extra=SUPERVISOR_SETTINGS)
    os.kill(fleet.process.pid, signal.SIGHUP)
    fleet.wait_for("beta", ["RUNNING"])
    assert fleet.row("alpha")["pid"] == pid
    assert "Beta Added" in Chat(sandbox, TOKENS["beta"], user_id=74).say("/start")["text"]


def test_reload_restarts_only_changed_bots_and_stops_removed_ones(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {}, "beta": {}, "gamma": {}})
    fleet.env["GAMMA_TOKEN"] = "7000003:AAFakeTokenForTestsOnly_gamma0000000"
    fleet.start(["alpha", "beta", "gamma"])
    pids = {name: fleet.row(name)["pid"] for name in ("alpha", "beta", "gamma")}
    write_config(fleet.config, {"alpha": {}, "beta": {"display_name": "Beta Renamed"}}, extra=SUPERVISOR_SETTINGS)
    answer = fleet.ctl({"command": "reload"})
    assert (answer["added"], answer["changed"], answer["removed"]) == ([], ["beta"], ["gamma"])
    fleet.wait_for("beta", ["RUNNING"])
    assert "Beta Renamed" in Chat(sandbox, TOKENS["beta"], user_id=75).say("/start")["text"]
    assert pid_exits_within(pids["gamma"], 10)
    assert fleet.row("alpha")["pid"] == pids["alpha"] and fleet.row("beta")["pid"] != pids["beta"]
    listed = [b["name"] for b in fleet.ctl({"command": "bot_list"})["bots"]]
    assert listed == ["alpha", "beta"]


def test_reload_swapping_bots_at_the_connection_budget_keeps_the_supervisor_up(make_fleet, sandbox):
    tight = SUPERVISOR_SETTINGS + "\n[database]\nmax_connections = 9\n"   # room for 3 bot processes, not 4
    fleet = make_fleet({"alpha": {}, "beta": {}, "gamma": {}})
    fleet.env.update(GAMMA_TOKEN="7000003:AAFakeTokenForTestsOnly_gamma0000000",
                     DELTA_TOKEN="7000004:AAFakeTokenForTestsOnly_delta0000000")
    write_config(fleet.config, {"alpha": {}, "beta": {}, "gamma": {}}, extra=tight)
    fleet.start(["alpha", "beta", "gamma"])
    write_config(fleet.config, {"alpha": {}, "beta": {}, "delta": {}}, extra=tight)
    answer = fleet.ctl({"command": "reload"})
    assert (answer["added"], answer["removed"]) == (["delta"], ["gamma"])
    fleet.wait_for("delta", ["RUNNING"])   # started while gamma was still stopping
    assert "Delta" in Chat(sandbox, "7000004:AAFakeTokenForTestsOnly_delta0000000", user_id=76).say("/start")["text"]
    assert [b["name"] for b in fleet.ctl({"command": "bot_list"})["bots"]] == ["alpha", "beta", "delta"]


def test_bot_stop_survives_a_supervisor_restart(make_fleet, tmp_path):
    fleet = make_fleet().start(["alpha", "beta"])
    assert fleet.ctl({"command": "bot_stop", "name": "beta"})["bot"]["state"] == "STOPPED"
    assert fleet.process.stop() == 0
    again = make_fleet().start(["alpha"])
    assert again.row("beta")["state"] == "STOPPED"


def test_cache_stats_gives_a_bot_that_cannot_answer_every_field_as_null(make_fleet):
    fleet = make_fleet().start(["alpha", "beta"])
    fleet.ctl({"command": "bot_stop", "name": "beta"})
    bots = {b["name"]: b for b in fleet.ctl({"command": "cache_stats"})["bots"]}
    assert bots["beta"] == {"name": "beta", "state": "STOPPED", "unavailable": True, **dict.fromkeys(CACHE_FIELDS)}
    assert set(CACHE_FIELDS) <= set(bots["alpha"]) and "unavailable" not in bots["alpha"]
    assert bots["alpha"]["hits"] is not None


def test_control_socket_is_private_and_survives_bad_clients(make_fleet):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    assert (fleet.socket.stat().st_mode & 0o777) == 0o600
    assert ((fleet.home / "dims.key").stat().st_mode & 0o777) == 0o600
    with pytest.raises((mpc.AuthenticationError, EOFError, ConnectionError)):
        request(fleet.socket, b"wrong-key", {"command": "bot_list"})
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(fleet.socket))
        raw.sendall(b"\x00\x00\x00\x05garbage and more garbage")
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(str(fleet.socket))  # says nothing at all
    assert fleet.ctl({"command": "bot_list"})["status"] == "ok"
    assert fleet.ctl({"command": "no_such"})["status"] == "error"
    silent.close()
    assert "failed the handshake" in fleet.process.log()


def test_a_second_supervisor_refuses_and_names_the_running_one(make_fleet):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    second = subprocess.run([sys.executable, str(ROOT / "main.py"), "--multi", "--config", str(fleet.config)],
                            env=fleet.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another supervisor is running (pid {fleet.process.pid})" in second.stderr
    assert fleet.row("alpha")["state"] == "RUNNING"


def test_a_supervisor_with_another_key_on_the_same_socket_is_refused_and_the_cli_says_why(make_fleet):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    other = Path(tempfile.mkdtemp(prefix="dims-sv-other-"))   # another data directory: another key
    try:
        env = {**fleet.env, "DIMS_DATA_DIR": str(other), "DIMS_SOCKET": str(fleet.socket)}
        second = subprocess.run([sys.executable, str(ROOT / "main.py"), "--multi", "--config", str(fleet.config)],
                                env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"another supervisor, with another data directory (its own key), is running on {fleet.socket}" \
            in second.stderr
        listed = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "bot_list"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 1 and "Traceback" not in listed.stderr
        assert f"refused the key in {other / 'dims.key'}" in listed.stderr
        assert fleet.ctl({"command": "ping"})["pid"] == fleet.process.pid   # its socket is untouched
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_the_cli_gives_up_on_a_stopped_supervisor_at_the_handshake_deadline(make_fleet):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    os.kill(fleet.process.pid, signal.SIGSTOP)   # it still accepts (the kernel does), it never answers
    try:
        listed = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "bot_list"],
                                env=fleet.env, capture_output=True, text=True, timeout=30)
    finally:
        os.kill(fleet.process.pid, signal.SIGCONT)
    assert listed.returncode == 1
    assert f"cannot talk to the supervisor on {fleet.socket}: {fleet.socket} accepted the connection but no " \
           f"handshake came within {HANDSHAKE_TIMEOUT:g} s" in listed.stderr
    assert fleet.ctl({"command": "ping"})["pid"] == fleet.process.pid


def test_a_stale_socket_left_by_a_dead_supervisor_is_replaced(make_fleet):
    fleet = make_fleet({"alpha": {}})
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(fleet.socket))   # a socket file nobody listens on any more
    stale.close()
    fleet.start(["alpha"])
    assert "removing the stale control socket" in fleet.process.log()
    assert fleet.ctl({"command": "ping"})["pid"] == fleet.process.pid


def test_bot_restart_gives_the_bot_a_new_process_and_touches_no_other(make_fleet, sandbox):
    fleet = make_fleet().start(["alpha", "beta"])
    before = {name: fleet.row(name)["pid"] for name in ("alpha", "beta")}
    restarted = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "bot_restart", "alpha"],
                               env=fleet.env, capture_output=True, text=True, timeout=60)
    assert restarted.returncode == 0 and "bot alpha is RUNNING" in restarted.stdout
    assert fleet.row("alpha")["pid"] != before["alpha"] and fleet.row("beta")["pid"] == before["beta"]
    assert "Alpha" in Chat(sandbox, TOKENS["alpha"], user_id=76).say("/start")["text"]
    row = fleet.row("alpha")
    assert (row["restarts"], row["operator_restarts"]) == (0, 1), "RESTARTS counts crashes, not bot_restart"


def test_a_bot_whose_token_variable_is_missing_is_fatal_alone_and_the_cli_needs_no_token(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {}, "gamma": {}})   # GAMMA_TOKEN is not in the environment
    fleet.start(["alpha"])
    gamma = fleet.wait_for("gamma", ["FATAL"])
    assert gamma["pid"] is None and "environment variable GAMMA_TOKEN is not set" in gamma["last_error"]
    assert "ERROR dims.supervisor: bot gamma: STOPPED -> FATAL: cannot start" in fleet.process.log()
    assert "Alpha" in Chat(sandbox, TOKENS["alpha"], user_id=77).say("/start")["text"]
    shell = {k: v for k, v in fleet.env.items() if not k.endswith("_TOKEN")}   # an operator's shell: no tokens
    for command in (["bot_list"], ["cache_stats"], ["system_health"], ["db_status"]):
        result = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), *command, "--json"],
                                env=shell, capture_output=True, text=True, timeout=60)
        assert "is not set" not in result.stderr, (command, result.stderr)
        assert result.returncode in (0, 1) and json.loads(result.stdout), command   # 1: gamma makes health degraded
    health = json.loads(subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "system_health",
                                        "--json"], env=shell, capture_output=True, text=True, timeout=60).stdout)
    assert {b["name"]: b["status"] for b in health["bots"]} == {"alpha": "ok", "gamma": "down"}
    assert all("reason" in b for b in health["bots"]) and health["bots"][0]["reason"] is None


def test_chat_with_a_stopped_bot_says_it_is_not_answering_and_why(make_fleet):
    fleet = make_fleet().start(["alpha", "beta"])
    fleet.ctl({"command": "bot_stop", "name": "beta"})
    chat = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "chat", "beta", "--config",
                           str(fleet.config)], env=fleet.env, input="/start\n", capture_output=True, text=True, timeout=60)
    assert chat.returncode == 1, chat.stdout + chat.stderr
    assert "no answer" in chat.stdout and "bot beta is STOPPED (stopped by an operator; bot_start starts it)" in chat.stdout
    answered = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "chat", "alpha", "--config",
                               str(fleet.config)], env=fleet.env, input="/start\n", capture_output=True, text=True,
                              timeout=60)
    assert answered.returncode == 0 and "no answer" not in answered.stdout


def test_chat_with_no_demo_running_says_how_to_start_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "BOT_TOKEN", "TELEGRAM_API_URL"))}
    env["DIMS_DATA_DIR"] = str(tmp_path / "var")
    chat = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "chat", "alpha"], env=env,
                          input="", capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert chat.returncode == 2
    assert "bot 'alpha' is not configured (known: none)" in chat.stderr
    assert f"start it with {ROOT / 'run'}" in chat.stderr


def test_dims_linked_onto_the_path_manages_the_supervisor_of_its_installation_from_anywhere(tmp_path, database_url,
                                                                                            sandbox):
    installation = copy_installation(Path(tempfile.mkdtemp(prefix="dims-inst-")))   # short: AF_UNIX paths
    fleet = None
    try:
        write_config(installation / "dims.toml", {"alpha": {}}, extra=SUPERVISOR_SETTINGS)
        env = {k: v for k, v in dims_env(database_url, sandbox.api_url, installation).items() if k != "DIMS_DATA_DIR"}
        env["TMPDIR"] = str(installation)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        fleet = DimsProcess([], env, tmp_path / "fleet.log", program=installation / "main.py", cwd=elsewhere).start()
        link = tmp_path / "bin" / "dims"
        link.parent.mkdir()
        link.symlink_to(installation / "dims")
        shell = {k: v for k, v in env.items() if not k.endswith("_TOKEN")}   # an operator's shell
        listed = eventually(lambda: subprocess.run([sys.executable, str(link), "bot_list", "--json"], env=shell,
                                                   cwd=tmp_path, capture_output=True, text=True, timeout=60),
                            lambda r: r.returncode == 0 and '"RUNNING"' in r.stdout, timeout=60)
        assert listed.returncode == 0, listed.stderr + fleet.log()
        report = json.loads(listed.stdout)
        assert report["supervisor"]["socket"] == str(installation / "var" / "dims.sock")
        assert [(b["name"], b["state"]) for b in report["bots"]] == [("alpha", "RUNNING")]
        assert fleet.stop() == 0
    finally:
        if fleet is not None and fleet.process.poll() is None:
            fleet.kill()
        shutil.rmtree(installation, ignore_errors=True)


def _stat(pid: int) -> tuple[str, int]:
    """A process's short name (comm) and parent pid, from /proc."""
    text = Path(f"/proc/{pid}/stat").read_text()
    comm = text[text.index("(") + 1:text.rindex(")")]
    return comm, int(text[text.rindex(")") + 2:].split()[1])


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_every_process_is_named_for_ps_and_top(make_fleet):
    fleet = make_fleet().start(["alpha", "beta"])
    bot = fleet.row("alpha")["pid"]
    assert _stat(bot)[0] == "dims bot alpha" and _cmdline(bot) == "dims: bot alpha"
    assert _stat(fleet.process.pid)[0] == "dims supervisor" and _cmdline(fleet.process.pid) == "dims: supervisor"
    forkserver = _stat(bot)[1]
    assert _stat(forkserver)[0] == "dims forkserver" and _cmdline(forkserver) == "dims: forkserver"
    children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _stat_or_none(int(p.name), forkserver)]
    names = sorted(_cmdline(pid) for pid in children)
    assert names == ["dims: bot alpha", "dims: bot beta", "dims: database agent"], names


def test_no_bot_process_can_read_another_bots_token_from_its_environment(make_fleet, sandbox):
    fleet = make_fleet().start(["alpha", "beta"])
    for name in ("alpha", "beta"):
        environ = Path(f"/proc/{fleet.row(name)['pid']}/environ").read_bytes()
        assert b"_TOKEN=" not in environ, f"bot {name} sees a token variable"
    fleet.wait_for("alpha", ["RUNNING"])
    write_config(fleet.config, {"alpha": {"display_name": "Alpha Again"}, "beta": {}}, extra=SUPERVISOR_SETTINGS)
    assert fleet.ctl({"command": "reload"})["changed"] == ["alpha"], "reload still reads the tokens"
    fleet.wait_for("alpha", ["RUNNING"])
    assert "Alpha Again" in Chat(sandbox, TOKENS["alpha"], user_id=78).say("/start")["text"]


def _stat_or_none(pid: int, parent: int) -> bool:
    try:
        return _stat(pid)[1] == parent
    except (OSError, ValueError, IndexError):
        return False



def test_the_dims_launcher_lists_the_fleet_without_loading_the_heavy_layers(make_fleet, tmp_path):
    """`dims`, linked elsewhere as onto a PATH, is the CLI; a fleet command loads neither the
    database layer, nor logging, nor telegram (an operator command starts in tens of ms)."""
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    link = tmp_path / "bin" / "dims"
    link.parent.mkdir()
    link.symlink_to(ROOT / "dims")
    listed = subprocess.run([sys.executable, "-X", "importtime", str(link), "bot_list", "--json"], env=fleet.env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert [bot["name"] for bot in json.loads(listed.stdout)["bots"]] == ["alpha"]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in listed.stderr.splitlines() if line.startswith("import time:")}
    assert {"enhanced_ipc_commands", "control", "multiprocessing.connection"} <= loaded
    heavy = {"logging", "dataclasses", "csv", "psycopg2", "multiprocess_connection_manager", "telegram", "httpx"}
    assert not loaded & heavy
