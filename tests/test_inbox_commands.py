"""The operator's inbox commands as real processes against a real PostgreSQL: inbox_list,
inbox_retry and inbox_discard with --json and as tables, every bad input with its exit status,
and, under a running supervisor with the sandbox as Telegram, a dead update retried until the
user gets the answer (or dead again, then discarded) with system_health degraded, then ok."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inbox import MAX_ATTEMPTS, Inbox
from multiprocess_connection_manager import Migrator
from tests.conftest import ROOT
from tests.support import TOKENS, Chat, write_config
from tests.test_supervisor import eventually, make_fleet, sandbox  # noqa: F401 (fixtures)

CLI = [sys.executable, str(ROOT / "enhanced_ipc_commands.py")]
ALPHA_ID = int(TOKENS["alpha"].split(":")[0])
USER = 5005


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str, env: dict[str, str]) -> tuple[int, dict]:
    """The exit status and the one JSON object a command printed with --json."""
    result = run_cli(*args, "--json", env=env)
    return result.returncode, json.loads(result.stdout)


def message(update_id: int, text: str, user: int = USER) -> dict:
    sender = {"id": user, "is_bot": False, "first_name": "Ann"}
    return {"update_id": update_id, "message": {"message_id": update_id, "date": 0, "text": text, "from": sender,
                                                "chat": {"id": user, "type": "private"}}}


def press(update_id: int, data: str, user: int = USER) -> dict:
    sender = {"id": user, "is_bot": False, "first_name": "Ann"}
    return {"update_id": update_id, "callback_query": {
        "id": str(update_id), "from": sender, "chat_instance": "1", "data": data,
        "message": {"message_id": 1, "date": 0, "chat": {"id": user, "type": "private"}, "text": "menu"}}}


def park_as_dead(inbox: Inbox, update: dict, error: str) -> None:
    inbox.store([update])
    for _ in range(MAX_ATTEMPTS):
        inbox.mark_failed(update["update_id"], error)


def status_of(db, update_id: int) -> tuple:
    return db.fetchone("SELECT status, attempts, error FROM dims_inbox WHERE update_id = %s", (update_id,))


@pytest.fixture
def env(cli_env, tmp_path):
    """The CLI's environment: bots alpha and beta configured, no supervisor, no token."""
    config = write_config(tmp_path / "dims.toml", {"alpha": {}, "beta": {}})
    return {**cli_env, "DIMS_CONFIG": str(config)}


@pytest.fixture
def inbox(db):
    """Alpha's inbox: updates 1 and 2 dead (a message, a button), 3 pending, 4 done."""
    Migrator(db).migrate()
    alpha = Inbox(db, "alpha", ALPHA_ID)
    park_as_dead(alpha, message(1, "/find   tea\nplease " + "x" * 200), "BadRequest: injected fault")
    park_as_dead(alpha, press(2, "g:17"), f"NetworkError: POST https://api.example/bot{TOKENS['alpha']}/sendMessage")
    alpha.store([message(3, "/start"), message(4, "/help")])
    alpha.mark_done([4])
    return alpha


# --------------------------------------------------------------------------- inbox_list


def test_inbox_list_shows_the_dead_updates_newest_first_with_error_chat_and_preview(env, inbox):
    code, listed = cli_json("inbox_list", "alpha", env=env)
    assert code == 0
    assert listed["bot"] == "alpha" and listed["counts"] == {"pending": 1, "dead": 2, "discarded": 0, "done": 1}
    button, text = listed["updates"]
    assert {k: button[k] for k in ("update_id", "status", "attempts", "chat_id", "preview")} == {
        "update_id": 2, "status": "dead", "attempts": MAX_ATTEMPTS, "chat_id": USER, "preview": "button: g:17"}
    assert text["update_id"] == 1 and text["error"] == "BadRequest: injected fault"
    assert text["preview"].startswith("/find tea please xxx") and len(text["preview"]) == 80
    assert all(0 <= u["age_s"] < 60 for u in listed["updates"])
    assert set(text) == {"update_id", "status", "attempts", "age_s", "error", "chat_id", "preview"}

    table = run_cli("inbox_list", "alpha", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "bot alpha: 2 dead, 1 pending"
    assert lines[1].split() == ["UPDATE_ID", "STATUS", "ATTEMPTS", "AGE", "CHAT", "PREVIEW", "ERROR"]
    assert lines[2].startswith("2 ") and "button: g:17" in lines[2] and lines[3].startswith("1 ")
    assert "inbox_retry alpha ID... (or --all)" in lines[4] and "inbox_discard alpha" in lines[4]


def test_inbox_list_never_shows_a_token_even_one_inside_a_stored_error(env, inbox):
    secret = TOKENS["alpha"].split(":")[1]
    for args in (["inbox_list", "alpha"], ["inbox_list", "alpha", "--json"], ["inbox_list", "alpha", "--status", "all"]):
        result = run_cli(*args, env=env)
        assert result.returncode == 0 and "NetworkError" in result.stdout
        assert secret not in result.stdout + result.stderr


def test_inbox_list_shows_pending_or_every_status_and_at_most_n(env, inbox):
    _, pending = cli_json("inbox_list", "alpha", "--status", "pending", env=env)
    assert [(u["update_id"], u["status"], u["error"]) for u in pending["updates"]] == [(3, "pending", None)]
    _, every = cli_json("inbox_list", "alpha", "--status", "all", env=env)
    assert sorted(u["update_id"] for u in every["updates"]) == [1, 2, 3, 4]
    _, newest = cli_json("inbox_list", "alpha", "--status", "all", "-n", "1", env=env)
    assert len(newest["updates"]) == 1
    empty = run_cli("inbox_list", "beta", env=env)      # configured, nothing stored yet
    assert (empty.returncode, empty.stdout.strip()) == (0, "bot beta: 0 dead, 0 pending; no dead updates")


def test_a_bot_no_longer_configured_can_still_have_its_dead_updates_listed_and_discarded(env, inbox, db):
    park_as_dead(Inbox(db, "gone", 7000099), message(1, "/start"), "BadRequest: boom")
    code, listed = cli_json("inbox_list", "gone", env=env)
    assert code == 0 and [u["update_id"] for u in listed["updates"]] == [1]
    assert cli_json("inbox_discard", "gone", "--all", env=env) == (0, {"bot": "gone", "discarded": [1], "not_dead": []})


# --------------------------------------------------------------------------- inbox_retry and inbox_discard


def test_retried_updates_are_pending_again_and_handled_when_the_bot_next_runs(env, inbox, db):
    code, retried = cli_json("inbox_retry", "alpha", "1", env=env)
    assert code == 0
    assert retried["retried"] == [1] and retried["not_dead"] == [] and retried["woken"] is False
    assert "the supervisor is not running: bot alpha handles them when it next runs" == retried["note"]
    assert status_of(db, 1) == ("pending", 0, "BadRequest: injected fault"), "the last error stays until it succeeds"
    assert status_of(db, 2)[0] == "dead"
    assert [update_id for update_id, _ in inbox.pending()] == [1, 3]    # what the bot picks up next

    inbox.mark_done([1])                                                # the handler succeeded this time
    _, listed = cli_json("inbox_list", "alpha", env=env)
    assert [u["update_id"] for u in listed["updates"]] == [2]

    human = run_cli("inbox_retry", "alpha", "--all", env=env)
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines() == ["retried 1 dead update of bot alpha: 2",
                                         "the supervisor is not running: bot alpha handles them when it next runs"]
    for _ in range(MAX_ATTEMPTS):                                      # ... and fails every attempt again
        inbox.mark_failed(2, "BadRequest: still broken")
    assert status_of(db, 2) == ("dead", MAX_ATTEMPTS, "BadRequest: still broken")


def test_discarded_updates_leave_the_dead_list_are_never_handled_and_are_pruned(env, inbox, db):
    human = run_cli("inbox_discard", "alpha", "2", "1", "2", env=env)
    assert human.returncode == 0, human.stderr
    assert human.stdout.strip() == "discarded 2 dead updates of bot alpha: 1, 2"
    assert [update_id for update_id, _ in inbox.pending()] == [3]
    assert inbox.store([press(2, "g:17")]) == set(), "Telegram sending it again does not bring it back"
    _, listed = cli_json("inbox_list", "alpha", env=env)
    assert listed["updates"] == [] and listed["counts"]["discarded"] == 2 and listed["counts"]["dead"] == 0
    _, every = cli_json("inbox_list", "alpha", "--status", "all", env=env)
    assert {u["update_id"]: u["status"] for u in every["updates"]} == {1: "discarded", 2: "discarded", 3: "pending",
                                                                       4: "done"}
    assert inbox.prune(older_than_s=3600) == 0
    assert inbox.prune(older_than_s=0) == 3                             # the discarded two and the done one
    assert [update_id for (update_id,) in db.fetchall("SELECT update_id FROM dims_inbox")] == [3]


def test_ids_that_are_not_dead_are_named_and_left_alone(env, inbox, db):
    code, partly = cli_json("inbox_discard", "alpha", "1", "3", "99", env=env)
    assert code == 0 and partly["discarded"] == [1]
    assert partly["not_dead"] == [{"update_id": 3, "status": "pending"}, {"update_id": 99, "status": None}]
    human = run_cli("inbox_retry", "alpha", "2", "4", env=env)
    assert human.returncode == 0
    assert "left alone, not dead updates of bot alpha: 4 (done)" in human.stdout.splitlines()
    assert (status_of(db, 3)[0], status_of(db, 4)[0]) == ("pending", "done")

    none = run_cli("inbox_retry", "alpha", "3", "99", env=env)          # nothing named is dead: failed
    assert none.returncode == 1 and none.stdout == ""
    assert "nothing to retry: not dead updates of bot alpha: 3 (pending), 99 (no such update)" in none.stderr
    code, refused = cli_json("inbox_discard", "alpha", "4", env=env)
    assert code == 1 and refused["not_dead"] == [{"update_id": 4, "status": "done"}]
    assert "4 (done)" in refused["error"]
    nothing_dead = run_cli("inbox_discard", "alpha", "--all", env=env)   # --all with none dead: nothing to do
    assert (nothing_dead.returncode, nothing_dead.stdout.strip()) == (0, "bot alpha has no dead updates: none discarded")


@pytest.mark.parametrize("args, says", [
    (["inbox_list", "gamma"], "bot 'gamma' is not configured and has no updates in the inbox (known: alpha, beta)"),
    (["inbox_retry", "gamma", "--all"], "bot 'gamma' is not configured"),
    (["inbox_discard", "gamma", "1"], "bot 'gamma' is not configured"),
    (["inbox_retry", "alpha", "one"], "argument ID: invalid int value: 'one'"),
    (["inbox_discard", "alpha", "1", "2x"], "invalid int value: '2x'"),
    (["inbox_retry", "alpha"], "name the dead updates to retry (their update ids, as inbox_list alpha shows them), "
                               "or give --all"),
    (["inbox_discard", "alpha"], "name the dead updates to discard"),
    (["inbox_retry", "alpha", "1", "--all"], "name update ids or give --all, not both"),
    (["inbox_list", "alpha", "--status", "lost"], "argument --status: invalid choice: 'lost'"),
    (["inbox_list", "alpha", "-n", "0"], "argument -n: must be 1 or more, not 0"),
    (["inbox_list", "alpha", "-n", "many"], "argument -n: expected a whole number, got 'many'"),
    (["inbox_list"], "the following arguments are required: BOT"),
])
def test_bad_input_exits_2_and_says_what_is_wrong(env, inbox, db, args, says):
    before = db.fetchall("SELECT update_id, status, attempts FROM dims_inbox ORDER BY update_id")
    result = run_cli(*args, env=env)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    code, answer = cli_json(*args, env=env)
    assert code == 2 and says in answer["error"]
    assert db.fetchall("SELECT update_id, status, attempts FROM dims_inbox ORDER BY update_id") == before


def test_a_retry_or_discard_naming_nothing_asks_for_the_bot_and_no_more(env):
    for command in ("inbox_retry", "inbox_discard"):
        result = run_cli(command, env=env)     # the ids are optional (--all): only BOT is required
        assert result.returncode == 2 and result.stderr.splitlines()[-1].endswith(
            "the following arguments are required: BOT"), result.stderr


# --------------------------------------------------------------------------- under a running supervisor


def health(fleet) -> tuple[int, dict]:
    return cli_json("system_health", "--config", str(fleet.config), env=fleet.env)


def inbox_cli(fleet, *args: str) -> tuple[int, dict]:
    return cli_json(*args, "--config", str(fleet.config), env=fleet.env)


def test_a_dead_update_retried_under_the_supervisor_is_answered_and_health_is_ok_again(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {"display_name": "Alpha"}}).start(["alpha"])
    token = TOKENS["alpha"]
    chat = Chat(sandbox, token, user_id=USER)
    assert "Alpha" in chat.say("/start")["text"]
    sandbox.fault(token, "sendMessage", status=400, times=MAX_ATTEMPTS, description="Bad Request: injected fault")
    assert "could not handle that message" in chat.say("/help")["text"]     # the update is dead now

    code, report = health(fleet)
    assert (code, report["status"]) == (1, "degraded"), report
    alpha = report["bots"][0]
    assert alpha["status"] == "ok" and alpha["inbox"]["dead"] == 1 and alpha["inbox"]["oldest_dead_age_s"] >= 0
    assert [p for p in report["problems"] if p.startswith("bot alpha: 1 dead update in the inbox, the oldest "
                                                          "received ") and "inbox_list alpha" in p], report["problems"]
    _, listed = inbox_cli(fleet, "inbox_list", "alpha")
    (dead,) = listed["updates"]
    assert (dead["preview"], dead["chat_id"], dead["attempts"]) == ("/help", USER, MAX_ATTEMPTS)
    assert "injected fault" in dead["error"].lower()

    code, retried = inbox_cli(fleet, "inbox_retry", "alpha", "--all")
    assert code == 0 and retried["retried"] == [dead["update_id"]] and retried["woken"] is True, retried
    # Well before the bot's own pass over the inbox (every 30 s): the wake did it.
    assert "What you can do here" in chat.next(timeout=10)["text"]
    assert "woken: handling the inbox's pending updates now" in fleet.process.log()
    code, report = eventually(lambda: health(fleet), lambda answer: answer[0] == 0, timeout=20)
    assert report["status"] == "ok" and report["bots"][0]["inbox"] == {"pending": 0, "dead": 0,
                                                                      "oldest_dead_age_s": None}, report
    _, listed = inbox_cli(fleet, "inbox_list", "alpha", "--status", "all")
    assert {u["update_id"]: u["status"] for u in listed["updates"]}[dead["update_id"]] == "done"


def test_a_retried_update_that_fails_again_is_dead_again_and_once_discarded_health_is_ok(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {"display_name": "Alpha"}}).start(["alpha"])
    token = TOKENS["alpha"]
    chat = Chat(sandbox, token, user_id=USER + 1)
    sandbox.fault(token, "sendMessage", status=400, times=MAX_ATTEMPTS, description="Bad Request: first fault")
    assert "could not handle that message" in chat.say("/start", timeout=30)["text"]
    sandbox.fault(token, "sendMessage", status=400, times=MAX_ATTEMPTS, description="Bad Request: second fault")
    code, retried = inbox_cli(fleet, "inbox_retry", "alpha", "--all")
    assert code == 0 and retried["woken"] is True
    assert "could not handle that message" in chat.next(timeout=10)["text"]   # failed every attempt again
    _, listed = inbox_cli(fleet, "inbox_list", "alpha")
    (dead,) = listed["updates"]
    assert dead["attempts"] == MAX_ATTEMPTS and "second fault" in dead["error"].lower()
    assert health(fleet)[1]["status"] == "degraded"

    assert inbox_cli(fleet, "inbox_discard", "alpha", str(dead["update_id"])) == (
        0, {"bot": "alpha", "discarded": [dead["update_id"]], "not_dead": []})
    code, report = health(fleet)
    assert (code, report["status"], report["problems"]) == (0, "ok", []), report


def test_a_retry_for_a_stopped_bot_is_handled_when_it_starts_again(make_fleet, sandbox):
    fleet = make_fleet({"alpha": {"display_name": "Alpha"}}).start(["alpha"])
    token = TOKENS["alpha"]
    chat = Chat(sandbox, token, user_id=USER + 2)
    sandbox.fault(token, "sendMessage", status=400, times=MAX_ATTEMPTS)
    assert "could not handle that message" in chat.say("/start", timeout=30)["text"]
    assert fleet.ctl({"command": "bot_stop", "name": "alpha"})["status"] == "ok"
    code, retried = inbox_cli(fleet, "inbox_retry", "alpha", "--all")
    assert code == 0 and retried["woken"] is False
    assert retried["note"] == "bot alpha is STOPPED: it handles them when it runs again"
    assert fleet.ctl({"command": "bot_start", "name": "alpha"})["status"] == "ok"
    assert "Alpha" in chat.next(timeout=20)["text"]
