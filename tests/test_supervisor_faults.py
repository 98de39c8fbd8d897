"""The supervisor when the processes it depends on fail: the forkserver killed, stopped or dying
while it starts a bot, and the database agent killed. Real processes and signals; the sandbox
plays Telegram. Each is one bot's (or the agent's) trouble, never the supervisor's death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support import Chat, TOKENS
from tests.test_supervisor import eventually, make_fleet, pid_exits_within, sandbox  # noqa: F401 (fixtures)


def processes_named(comm: str) -> list[int]:
    """Pids of this user's processes whose kernel name is `comm` (zombies included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def state_of(pid: int) -> str:
    """The process's state letter (Z: a zombie), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (ppid := parent_of(int(entry.name))) is not None:
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def forkserver_of(fleet) -> int:
    # main.py's own child: a process just forked from it (a bot, the agent) bears its name too
    # until it names itself
    pids = [p for p in processes_named("dims forkserver") if parent_of(p) == fleet.process.pid
            and state_of(p) not in ("Z", "")]
    assert len(pids) == 1, pids
    return pids[0]


def agent_of(fleet) -> int:
    pids = [p for p in processes_named("dims db agent") if p in descendants(fleet.process.pid)
            and state_of(p) not in ("Z", "")]
    assert len(pids) == 1, pids
    return pids[0]


def test_a_killed_forkserver_is_reaped_and_replaced_and_its_bots_come_back_without_spending_their_budget(
        make_fleet, sandbox):
    fleet = make_fleet().start(["alpha", "beta"])
    forkserver = forkserver_of(fleet)
    os.kill(forkserver, signal.SIGKILL)
    for name in ("alpha", "beta"):
        row = eventually(lambda: fleet.row(name), lambda r: r["state"] == "RUNNING" and r["restarts"] >= 1, 30)
        assert row["state"] == "RUNNING", fleet.process.log()[-3000:]
        assert "stopped with its forkserver, which died" in row["last_error"], row["last_error"]
    assert eventually(lambda: state_of(forkserver), lambda s: s == "", 10) == "", "the dead forkserver is a zombie"
    assert forkserver_of(fleet) != forkserver
    log = fleet.process.log()
    assert f"the forkserver (pid {forkserver}) died; starting a new one" in log
    assert "exit status 255" not in log
    assert Chat(sandbox, TOKENS["alpha"]).say("/start")["text"]
    # three more forkserver deaths within the restart window (budget 3) leave the bots RUNNING
    for _ in range(3):
        forkserver = forkserver_of(fleet)
        os.kill(forkserver, signal.SIGKILL)
        eventually(lambda: forkserver_of_or_none(fleet), lambda p: p not in (None, forkserver), 30)
        fleet.wait_for("alpha", ["RUNNING"], 30)
        fleet.wait_for("beta", ["RUNNING"], 30)
    assert fleet.row("alpha")["state"] == "RUNNING" and fleet.row("beta")["state"] == "RUNNING"
    assert fleet.process.process.poll() is None


def forkserver_of_or_none(fleet) -> int | None:
    try:
        return forkserver_of(fleet)
    except AssertionError:
        return None


def test_a_stopped_forkserver_never_stalls_the_loop_and_is_replaced_after_the_spawn_deadline(make_fleet, sandbox):
    from host import SPAWN_DEADLINE_S
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    forkserver = forkserver_of(fleet)
    os.kill(forkserver, signal.SIGSTOP)
    try:
        old_pid = fleet.row("alpha")["pid"]
        os.kill(old_pid, signal.SIGKILL)   # its restart goes to the stopped forkserver
        began = time.monotonic()
        listed = eventually(lambda: fleet.row("alpha"), lambda r: r["state"] == "STARTING" and r["pid"] is None, 10)
        assert listed["state"] == "STARTING", listed
        for _ in range(5):   # the loop answers while the start hangs
            asked = time.monotonic()
            fleet.ctl({"command": "bot_list"}, timeout=2)
            assert time.monotonic() - asked < 2
        fleet.wait_for("alpha", ["RUNNING"], SPAWN_DEADLINE_S + 30)
        assert time.monotonic() - began >= SPAWN_DEADLINE_S * 0.9
    finally:
        try:
            os.kill(forkserver, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert pid_exits_within(forkserver, 10), "the stuck forkserver was not killed"
    log = fleet.process.log()
    assert f"the forkserver (pid {forkserver}) did not start dims-bot-alpha within" in log
    assert "forkserver died while starting the process" in log
    assert fleet.process.process.poll() is None


def test_a_killed_database_agent_is_seen_at_once_restarted_and_reported(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {}}).start(["alpha"])
    agent = agent_of(fleet)
    os.kill(agent, signal.SIGKILL)
    log_line = f"the database agent (pid {agent}) killed by SIGKILL; starting it again"
    assert eventually(lambda: fleet.process.log(), lambda text: log_line in text, 5).count(log_line) == 1
    status = eventually(lambda: fleet.ctl({"command": "bot_list"})["supervisor"]["database_agent"],
                        lambda s: s["state"] == "up" and s["restarts"] == 1, 30)
    assert status["state"] == "up" and status["restarts"] == 1 and status["pid"] != agent, status
    assert "killed by SIGKILL" in status["last_error"]
    new_agent = agent_of(fleet)
    assert new_agent == status["pid"]
    # the new agent writes the event log: a bot_stop after the death is recorded
    from multiprocess_connection_manager import ConnectionManager
    db = ConnectionManager(fleet.env["DATABASE_URL"], role="test")
    try:
        before = db.fetchval("SELECT coalesce(max(id), 0) FROM dims_events")
        fleet.ctl({"command": "bot_stop", "name": "alpha"})
        fleet.wait_for("alpha", ["STOPPED"])
        query = "SELECT count(*) FROM dims_events WHERE id > %s AND bot = 'alpha' AND state_to = 'STOPPED'"
        assert eventually(lambda: db.fetchval(query, (before,)), lambda n: n >= 1, 10) == 1
    finally:
        db.close()


def test_neither_the_forkserver_nor_the_database_agent_holds_a_token_in_its_environment(make_fleet):
    fleet = make_fleet().start(["alpha", "beta"])
    for what, pid in (("forkserver", forkserver_of(fleet)), ("database agent", agent_of(fleet))):
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"_TOKEN=" not in environ, f"the {what} sees a token variable"
        assert not any(token.encode() in environ for token in TOKENS.values()), f"the {what} sees a token"


HOST_RACE = """
import multiprocessing.forkserver, os, select, signal, sys, threading
sys.path.insert(0, {root!r})
import host

machine = host.Host()
assert machine.spawn(host._prepare_forkserver, (), "forkserver").wait(30)
pid = machine._forkserver_pid
release, held = threading.Event(), threading.Event()
real = multiprocessing.forkserver.ensure_running
def held_up():   # the spawner's next start waits here: no new forkserver until released
    held.set()
    release.wait(30)
    real()
multiprocessing.forkserver.ensure_running = held_up
machine.spawn(host._prepare_forkserver, (), "blocker")
assert held.wait(10), "the spawner never took the blocker"
os.kill(pid, signal.SIGKILL)
select.select([machine.forkserver_sentinel()], [], [], 10)
assert machine.forkserver_exited() == pid
print("died" if machine.forkserver_died(pid) else "alive", flush=True)
os._exit(0)   # the spawner stays held: no new forkserver outlives us holding our output pipes
"""


def test_a_bot_that_exits_after_its_forkserver_was_seen_dead_but_before_a_new_one_started_is_counted_as_its_death(
        tmp_path):
    """The CI race: the loop saw the forkserver die, the spawner had not yet started another, and
    the bot's exit status 255 then read as the bot's own crash."""
    script = HOST_RACE.format(root=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["died"], done.stdout + done.stderr[-2000:]
