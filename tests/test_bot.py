"""The bot end to end: a real `main.py --single` process, the sandbox as Telegram, a real
PostgreSQL. Every user and admin command of the contract, paging and buttons, hostile input,
the durable inbox across kill -9 and a database restart, and no token in the logs."""

from __future__ import annotations

import collections
import json
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import pytest

from girls_manager import GirlsManager
from multiprocess_connection_manager import ConnectionManager, EmbeddedPostgres, Migrator
from telegram_sandbox import Sandbox
from tests.conftest import ROOT, reachable_tempdir
from tests.support import ADMIN, TOKENS, Chat, DimsProcess, button_data, buttons, dims_env, write_config

TOKEN = TOKENS["alpha"]
NAMES = ["Alice", "Bella", "Chloe", "Daria", "Eva", "Freya", "Greta", "Hanna", "Irina", "Julia", "Katya"]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def roster_db(database_url):
    db = ConnectionManager(database_url, role="test-seed")
    Migrator(db).migrate()
    girls = GirlsManager(db, "test-seed")
    for index, name in enumerate(NAMES):
        girls.add(name, f"{name} likes chess and long walks.", ["blonde" if index % 2 else "brunette", "tall"])
    yield girls
    girls.close()
    db.close()


@pytest.fixture
def running_bot(tmp_path, database_url, roster_db, sandbox):
    config = write_config(tmp_path / "dims.toml")
    env = dims_env(database_url, sandbox.api_url, tmp_path / "var")
    with DimsProcess(["--single", "--config", str(config), "--log-level", "DEBUG"], env, tmp_path / "bot.log") as proc:
        Chat(sandbox, TOKEN, user_id=999).wait_until_answering()
        yield proc


def test_start_names_the_bot_and_counts_its_profiles(running_bot, sandbox):
    reply = Chat(sandbox, TOKEN).say("/start")
    assert "Alpha" in reply["text"] and f"{len(NAMES)} profiles" in reply["text"]


def test_help_shows_admin_commands_to_admins_only(running_bot, sandbox):
    user_help = Chat(sandbox, TOKEN).say("/help")["text"]
    admin_help = Chat(sandbox, TOKEN, ADMIN).say("/help")["text"]
    for command in ("/girls", "/find", "/fav", "/favs"):
        assert command in user_help and command in admin_help
    assert "/add" not in user_help and "/delete" not in user_help
    assert "/add" in admin_help and "/edit" in admin_help and "/delete" in admin_help


def test_girls_pages_through_the_roster_and_opens_a_card(running_bot, sandbox):
    chat = Chat(sandbox, TOKEN)
    first = chat.say("/girls")
    assert "of 11" in first["text"] and "page 1 of 2" in first["text"]
    names = [b["text"] for b in buttons(first)]
    assert names[:8] == NAMES[:8] and "Next »" in names and "« Previous" not in names
    assert all(len(b["callback_data"].encode()) <= 64 for b in buttons(first))

    second = chat.press(first, "Next »")
    assert second["edited"] and second["message_id"] == first["message_id"]
    assert [b["text"] for b in buttons(second)][:3] == NAMES[8:] and "page 2 of 2" in second["text"]

    card = chat.press(second, "Julia")
    assert card["text"].startswith("Julia") and "chess" in card["text"] and "#tall" in card["text"]
    back = chat.press(card, "Back")
    assert "page 2 of 2" in back["text"]


def test_favourites_from_the_card_and_by_name(running_bot, sandbox):
    chat = Chat(sandbox, TOKEN, user_id=2002)
    card = chat.press(chat.say("/girls"), "Bella")
    starred = chat.press(card, "Add to favourites")
    assert "In your favourites" in [b["text"] for b in buttons(starred)][0]
    answers = [c for c in sandbox.calls(TOKEN, "answerCallbackQuery")
               if "Bella added to your favourites" in json.dumps(c)]
    assert answers
    assert "Bella" in [b["text"] for b in buttons(chat.say("/favs"))]
    assert chat.say("/fav Chloe")["text"] == "Chloe added to your favourites."
    assert chat.say("/fav bella")["text"] == "Bella removed from your favourites."
    assert [b["text"] for b in buttons(chat.say("/favs"))] == ["Chloe"]
    assert chat.say("/fav Nobody")["text"] == ("No profile named 'Nobody'. "
                                               "Check the spelling, or look the name up with /find TEXT or /girls.")
    other = Chat(sandbox, TOKEN, user_id=2003)
    assert "no favourites yet" in other.say("/favs")["text"]


def test_find_matches_name_bio_and_tag_or_says_nothing_matched(running_bot, sandbox):
    chat = Chat(sandbox, TOKEN)
    assert [b["text"] for b in buttons(chat.say("/find IRI"))] == ["Irina"]
    assert len(buttons(chat.say("/find blonde"))) == 5
    assert len(buttons(chat.say("/find CHESS"))) == len(NAMES)
    nothing = chat.say("/find zebra")
    assert "Nothing matched “zebra”" in nothing["text"] and not buttons(nothing)
    assert "Tell me what to look for" in chat.say("/find")["text"]


def test_find_with_more_matches_than_it_shows_says_so(running_bot, sandbox, roster_db):
    extra = [f"Model {n:02d}" for n in range(1, 11)]   # 11 + 10 profiles: all play chess
    for name in extra[:9]:
        roster_db.add(name, "Plays chess.")
    chat = Chat(sandbox, TOKEN, user_id=4004)
    exactly = chat.say("/find chess")
    assert exactly["text"] == "20 profiles match “chess”:" and len(buttons(exactly)) == 20
    roster_db.add(extra[9], "Plays chess.")
    more = chat.say("/find CHESS")   # another text: a fresh read, whenever the bot hears of the add
    assert more["text"].startswith("More than 20 profiles match “CHESS”; here are the first 20.")
    assert "narrow it down" in more["text"]
    in_order = sorted(NAMES + extra, key=str.lower)
    assert [b["text"] for b in buttons(more)] == in_order[:20]


def test_admin_commands_change_the_roster(running_bot, sandbox, roster_db):
    admin = Chat(sandbox, TOKEN, ADMIN)
    assert admin.say("/add Zoe | Loves jazz. | singer, tall")["text"].startswith("Added Zoe.")
    assert roster_db.get_any("Zoe").tags == ("singer", "tall")
    assert "Updated Zoe" in admin.say("/edit Zoe bio Plays the saxophone.")["text"]
    assert roster_db.get_any("Zoe").bio == "Plays the saxophone."
    assert "hidden" in admin.say("/hide Zoe")["text"]
    assert "Nothing matched" in Chat(sandbox, TOKEN).say("/find saxophone")["text"]
    assert "visible again" in admin.say("/show Zoe")["text"]
    assert [b["text"] for b in buttons(Chat(sandbox, TOKEN).say("/find saxophone"))] == ["Zoe"]
    assert "deleted" in admin.say("/delete Zoe")["text"]
    assert "Nothing matched" in Chat(sandbox, TOKEN).say("/find saxophone")["text"]


def test_non_admins_are_refused_and_nothing_changes(running_bot, sandbox, roster_db):
    chat = Chat(sandbox, TOKEN)
    for command in ("/add Mallory | sneaky", "/edit Alice bio hacked", "/hide Alice", "/show Alice", "/delete Alice"):
        reply = chat.say(command)["text"]
        assert "for this bot's admins only" in reply, command
    assert roster_db.get_any("Alice").bio == "Alice likes chess and long walks."
    assert roster_db.get_any("Alice").visible
    with pytest.raises(Exception):
        roster_db.get_any("Mallory")


def test_bad_admin_arguments_get_a_usable_answer(running_bot, sandbox, roster_db):
    admin = Chat(sandbox, TOKEN, ADMIN)
    assert admin.say("/add")["text"].startswith("Usage: /add NAME | BIO")
    assert admin.say("/edit Alice colour red")["text"].startswith("Usage: /edit NAME FIELD VALUE")
    assert admin.say("/add alice | Another one")["text"] == (
        "A profile named 'Alice' already exists. To change that profile, use /edit Alice FIELD VALUE.")
    roster_db.add("Anna Maria")
    assert admin.say("/add anna maria")["text"].endswith("use /edit Anna Maria | FIELD | VALUE.")
    assert admin.say("/edit Alice name bella")["text"] == (
        "A profile named 'Bella' already exists. Pick a name no other profile has.")
    assert admin.say("/add Long | " + "x" * 1200)["text"] == "Bio is 1200 characters; the limit is 1000."
    for command in ("/edit Nobody bio x", "/hide Nobody", "/show Nobody", "/delete Nobody"):
        assert admin.say(command)["text"] == ("No profile named 'Nobody'. "
                                              "Check the spelling, or look the name up with /find TEXT or /girls."), command
    assert admin.say("/delete")["text"] == "Usage: /delete NAME"
    assert [p.name for p in roster_db.page(0, 50).items] == NAMES[:1] + ["Anna Maria"] + NAMES[1:]
    assert roster_db.get_any("Alice").bio == "Alice likes chess and long walks."


def test_a_tag_with_a_space_is_refused_by_add_and_edit_not_split_in_two(running_bot, sandbox, roster_db):
    admin = Chat(sandbox, TOKEN, ADMIN)
    rule = "Tags: 'Bad Tag' must match [a-z0-9_-]{1,32}."
    assert admin.say("/add Nora | Plays the harp. | music, Bad Tag")["text"] == rule
    assert admin.say("/edit Alice tags Bad Tag")["text"] == rule
    with pytest.raises(Exception):
        roster_db.get_any("Nora")
    assert roster_db.get_any("Alice").tags == ("brunette", "tall")
    assert admin.say("/add Nora | Plays the harp. | Music, harp")["text"].endswith("Tags: #music #harp")


def test_a_profile_with_a_photo_is_sent_as_a_photo_card(running_bot, sandbox, roster_db):
    roster_db.edit("Alice", "photo", "https://example.org/alice.jpg")
    chat = Chat(sandbox, TOKEN, user_id=3003)
    card = chat.press(chat.say("/girls"), "Alice")
    assert card.get("photo") and card["caption"].startswith("Alice")


def test_an_edit_from_another_process_is_seen_on_the_next_read(running_bot, sandbox, database_url, tmp_path):
    chat = Chat(sandbox, TOKEN)
    assert "11 profiles" in chat.say("/start")["text"]       # the bot has the count cached now
    cli = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), "girls_add", "Yara",
                          "--bio", "From the CLI"], env=dims_env(database_url, sandbox.api_url, tmp_path / "v"),
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "12 profiles" in chat.say("/start")["text"]


def test_hostile_input_gets_sensible_answers_and_the_bot_keeps_serving(running_bot, sandbox):
    chat = Chat(sandbox, TOKEN, user_id=6006)
    assert "/help" in chat.say("x" * 4096)["text"]
    assert "Nothing matched" in chat.say("/find '; DROP TABLE dims_girls; --")["text"]
    assert "Nothing matched" in chat.say("/find %_%\\")["text"]
    long_find = chat.say("/find " + "y" * 4000)["text"]
    assert "Nothing matched" in long_find and len(long_find) < 200
    assert "Nothing matched “💃🏻”" in chat.say("/find 💃🏻")["text"]
    assert "I don't know /nonsense" in chat.say("/nonsense")["text"]
    assert "I don't know" in chat.say("/" + "z" * 30)["text"]
    first = chat.say("/girls")
    for data in ("p:999999:0", "g:notanumber", "f:1", "x" * 64, "p:1:0:extra"):
        sandbox.press(TOKEN, 6006, first["message_id"], data, forge=True)
    sent = chat.send("/start")
    assert sandbox.wait_for_reply(TOKEN, 6006, after_seq=sent["seq"], timeout=20,
                                  match=lambda event: "Alpha" in (event.get("text") or ""))
    answered = [c for c in sandbox.calls(TOKEN, "answerCallbackQuery") if "no longer" in json.dumps(c)]
    assert len(answered) >= 4
    assert any("no longer available. Send /girls for the current list." in json.dumps(c) for c in answered)
    assert "Nothing matched" in chat.say("/find Ünïcødé ʕ•ᴥ•ʔ")["text"]


def test_sigterm_stops_the_bot_cleanly(running_bot, sandbox):
    assert running_bot.stop() == 0
    log = running_bot.log()
    assert "stopped after" in log
    assert TOKEN not in log and TOKEN.split(":")[1] not in log
    assert "HTTP Request" in log or "getUpdates" in log  # the log did record API traffic


# --------------------------------------------------------------------------- the durable inbox


def _burst(sandbox, users: list[int], count: int) -> dict[str, int]:
    """count /find messages spread over users; returns {tag: user_id}."""
    sent = {}
    for index in range(count):
        user = users[index % len(users)]
        tag = f"m{index:03d}q"
        sandbox.send(TOKEN, user, f"/find {tag}")
        sent[tag] = user
    return sent


def _answers(sandbox, users: list[int]) -> collections.Counter:
    seen = collections.Counter()
    for user in users:
        for event in sandbox.messages(TOKEN, user, after_seq=0):
            match = re.search(r"“(m\d{3}q)”", event.get("text") or "")
            if match and not event.get("edited"):
                seen[match.group(1)] += 1
    return seen


def _wait_for_answers(sandbox, users: list[int], tags, timeout: float) -> collections.Counter:
    deadline = time.monotonic() + timeout
    while True:
        seen = _answers(sandbox, users)
        if set(tags) <= set(seen) or time.monotonic() > deadline:
            return seen
        sandbox.messages(TOKEN, users[0], after_seq=_last_seq(sandbox, users[0]), wait=1.0)


def _last_seq(sandbox, user: int) -> int:
    events = sandbox.messages(TOKEN, user, after_seq=0)
    return events[-1]["seq"] if events else 0


def _in_hand_tags(db) -> set[str]:
    """The oldest pending update of each chat: those are the ones whose handlers were running."""
    rows = db.fetchall("SELECT DISTINCT ON (payload->'message'->'chat'->>'id') payload->'message'->>'text' "
                       "FROM dims_inbox WHERE status = 'pending' "
                       "ORDER BY payload->'message'->'chat'->>'id', update_id")
    return {text.split()[-1] for (text,) in rows}


def test_killed_bot_answers_every_message_of_a_burst_after_restart_and_only_cut_ones_may_repeat(
        tmp_path, database_url, roster_db):
    users = [101, 102, 103, 104, 105]
    config = write_config(tmp_path / "dims.toml")
    with Sandbox() as sandbox:
        env = dims_env(database_url, sandbox.api_url, tmp_path / "var")
        args = ["--single", "--config", str(config)]
        with DimsProcess(args, env, tmp_path / "first.log") as first:
            Chat(sandbox, TOKEN, user_id=999).wait_until_answering()
            sent = _burst(sandbox, users, 100)
            deadline = time.monotonic() + 30
            while sum(_answers(sandbox, users).values()) < 20 and time.monotonic() < deadline:
                sandbox.messages(TOKEN, users[0], after_seq=_last_seq(sandbox, users[0]), wait=1.0)
            first.kill()
        in_hand = _in_hand_tags(roster_db.db)   # at most one per chat: chats are handled concurrently
        answered_before = _answers(sandbox, users)
        assert 20 <= sum(answered_before.values()) < 100, "the kill must land in the middle of the burst"
        with DimsProcess(args, env, tmp_path / "second.log"):
            seen = _wait_for_answers(sandbox, users, sent, timeout=60)
    assert set(seen) == set(sent), f"unanswered: {sorted(set(sent) - set(seen))}"
    # A reply already sent by a handler that was cut short may be sent again when its update
    # is handled again (Telegram cannot deduplicate); every completed update is done once.
    duplicates = {tag for tag, n in seen.items() if n > 1}
    assert duplicates <= in_hand, f"answered twice: {duplicates} (in hand at the kill: {in_hand})"
    assert len(in_hand) <= len(users) and max(seen.values()) <= 2


def test_database_restart_in_the_middle_of_a_burst_loses_nothing(tmp_path):
    users = [201, 202, 203]
    home = reachable_tempdir("dims-test-restart-")
    server = EmbeddedPostgres(home)
    dsn = server.ensure_running()
    config = write_config(tmp_path / "dims.toml")
    try:
        with Sandbox() as sandbox:
            env = dims_env(dsn, sandbox.api_url, tmp_path / "var")
            with DimsProcess(["--single", "--config", str(config)], env, tmp_path / "bot.log") as proc:
                Chat(sandbox, TOKEN, user_id=999).wait_until_answering()
                first_half = _burst(sandbox, users, 20)
                assert server.stop()
                second_half = {f"m{int(t[1:4]) + 20:03d}q": u for t, u in first_half.items()}
                for tag, user in second_half.items():
                    sandbox.send(TOKEN, user, f"/find {tag}")
                server.ensure_running()
                seen = _wait_for_answers(sandbox, users, {**first_half, **second_half}, timeout=90)
                assert proc.process.poll() is None, "the bot must ride out the outage"
            assert set(seen) == set(first_half) | set(second_half)
            assert "database unreachable" in proc.log()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_during_a_database_outage_the_retry_delay_grows_is_logged_once_per_doubling_and_health_says_why(tmp_path):
    home = reachable_tempdir("dims-test-outage-")
    server = EmbeddedPostgres(home)
    dsn = server.ensure_running()
    config = write_config(tmp_path / "dims.toml", extra="[supervisor]\nheartbeat_interval = 0.5\nheartbeat_timeout = 30\n")
    short = Path(tempfile.mkdtemp(prefix="dims-out-"))
    try:
        with Sandbox() as sandbox:
            env = dims_env(dsn, sandbox.api_url, short)
            env["TMPDIR"] = str(short)
            with DimsProcess(["--config", str(config)], env, tmp_path / "fleet.log") as fleet:
                Chat(sandbox, TOKEN, user_id=999).wait_until_answering()
                assert server.stop()
                outage_started = time.monotonic()
                seq = sandbox.send(TOKEN, 301, "/start")["seq"]   # fetched, but it cannot be stored
                log = _wait_for(lambda: fleet.log(), lambda text: "retrying in 3.2 s" in text, timeout=30)
                elapsed = time.monotonic() - outage_started
                delays = [float(d) for d in re.findall(r"bot alpha: WARNING .*database unreachable.*retrying in "
                                                       r"([\d.]+) s", log)]
                assert delays[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2], delays   # one line per doubling
                assert len(delays) <= 6 + 2, f"{len(delays)} retry warnings in {elapsed:.1f} s"
                health = _cli_json(env, "system_health")
                bot = next(b for b in health["bots"] if b["name"] == "alpha")
                assert bot["status"] == "degraded" and "database unreachable" in bot["reason"], bot
                assert health["status"] == "down"   # the database itself is down
                server.ensure_running()
                reply = sandbox.wait_for_reply(TOKEN, 301, after_seq=seq, timeout=30)
                assert "Alpha" in reply["text"], "nothing was lost"
                healthy = _wait_for(lambda: _cli_json(env, "system_health"),
                                    lambda h: h["bots"][0]["status"] == "ok", timeout=20)
                assert healthy["bots"][0]["reason"] is None
                assert "database: working again after" in fleet.log()
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)


def _cli_json(env: dict, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "enhanced_ipc_commands.py"), *args, "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    return json.loads(result.stdout)


def _wait_for(read, done, timeout: float):
    """read() until done(value), for at most timeout seconds (each read is itself an event: a
    log line written, a health answer); the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value):
        assert time.monotonic() < deadline, f"not within {timeout} s: {str(value)[-2000:]}"
        select.select([], [], [], 0.1)
        value = read()
    return value


def test_inbox_stores_a_redelivery_once_and_a_reused_update_id_as_new(db):
    from inbox import Inbox
    Migrator(db).migrate()
    inbox = Inbox(db, "alpha", 7000001)
    first = {"update_id": 5, "message": {"message_id": 1, "text": "/start"}}
    assert inbox.store([first]) == {5}
    inbox.mark_done([5])
    assert inbox.store([first]) == set(), "Telegram redelivered it: already handled"
    assert inbox.pending() == []
    reused = {"update_id": 5, "message": {"message_id": 77, "text": "/girls"}}
    assert inbox.store([reused]) == {5}, "a new update that reuses an old id is not a duplicate"
    assert inbox.pending() == [(5, reused)]
    assert inbox.mark_failed(5, "boom") is False and inbox.mark_failed(5, "boom") is False
    assert inbox.mark_failed(5, "boom") is True
    assert inbox.counts() == {"backlog": 0, "dead": 1}


# --------------------------------------------------------------------------- Telegram failures


def test_a_handler_that_keeps_failing_is_parked_as_dead_and_the_user_is_told(running_bot, sandbox, roster_db):
    from inbox import MAX_ATTEMPTS
    chat = Chat(sandbox, TOKEN, user_id=8008)
    sandbox.fault(TOKEN, "sendMessage", status=400, times=MAX_ATTEMPTS, description="Bad Request: injected fault")
    assert "could not handle that message" in chat.say("/start", timeout=30)["text"]
    status, attempts, error = roster_db.db.fetchone(
        "SELECT status, attempts, error FROM dims_inbox WHERE payload->'message'->'from'->>'id' = '8008'")
    assert (status, attempts) == ("dead", MAX_ATTEMPTS) and "Injected fault" in error
    assert "Alpha" in chat.say("/start")["text"]


def test_a_4xx_that_is_not_a_400_is_the_requests_fault_and_not_retried_as_a_blip(running_bot, sandbox, roster_db):
    # python-telegram-bot raises a 413 (or a 414, a 422) as the NetworkError it raises for a 5xx,
    # which would be retried for retry_for (ten minutes) as a Telegram outage.
    from inbox import MAX_ATTEMPTS
    chat = Chat(sandbox, TOKEN, user_id=8015)
    sandbox.fault(TOKEN, "sendMessage", status=413, times=MAX_ATTEMPTS, description="Request Entity Too Large")
    assert "could not handle that message" in chat.say("/start", timeout=30)["text"]
    status, attempts, error = _inbox_row(roster_db.db, 8015)
    assert (status, attempts) == ("dead", MAX_ATTEMPTS) and "Request Entity Too Large (413)" in error, error
    assert "Telegram calls fail" not in running_bot.log()


def _inbox_row(db, user_id: int) -> tuple:
    return db.fetchone("SELECT status, attempts, error FROM dims_inbox "
                       "WHERE payload->'message'->'from'->>'id' = %s ORDER BY update_id DESC LIMIT 1", (str(user_id),))


def test_a_telegram_blip_on_sends_is_waited_out_and_the_reply_arrives(running_bot, sandbox, roster_db):
    # Before: 3 quick handler attempts, each failing on its send, parked the update as dead and the
    # apology failed too. Now only the failed call is retried, and nothing counts as the handler's.
    chat = Chat(sandbox, TOKEN, user_id=8011)
    sandbox.fault(TOKEN, "sendMessage", status=502, times=3)
    sandbox.fault(TOKEN, "sendMessage", kind="disconnect", times=1)
    sandbox.fault(TOKEN, "sendMessage", status=429, retry_after=1, times=1)
    reply = chat.say("/start", timeout=30)
    assert "Alpha" in reply["text"]
    statuses = [call["status"] for call in sandbox.calls(TOKEN, "sendMessage")][-8:]
    assert statuses.count(502) == 3 and statuses.count(0) == 1 and statuses.count(429) == 1
    deadline = time.monotonic() + 10
    while _inbox_row(roster_db.db, 8011)[0] != "done" and time.monotonic() < deadline:
        time.sleep(0.05)   # the done mark is written just after the reply
    assert _inbox_row(roster_db.db, 8011)[:2] == ("done", 0)
    log = running_bot.log()
    assert "Telegram calls fail (sendMessage" in log and "parked as dead" not in log
    assert "sending: working again" in log


def test_a_reply_is_not_sent_again_when_the_seen_bookkeeping_after_it_fails(running_bot, sandbox, database_url,
                                                                           roster_db):
    # Found by the chaos bench: PostgreSQL restarted just after a reply went out, the user's
    # first/last-seen write that follows every reply failed, and the whole update ran again: the
    # user got the answer twice. The write now fails alone and is tried on their next message.
    chat = Chat(sandbox, TOKEN, user_id=8014)
    deadline = time.monotonic() + 10
    while not roster_db.db.fetchone("SELECT 1 FROM dims_users WHERE user_id = 999"):
        assert time.monotonic() < deadline, "the fixture's user was never recorded"
        time.sleep(0.05)   # its bookkeeping, just after its reply, must not meet the lock
    locker = psycopg2.connect(database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE dims_users IN EXCLUSIVE MODE")   # the bot's write waits on it
            first = chat.say("/start")
            assert "Alpha" in first["text"]
            deadline = time.monotonic() + 10
            while True:   # watched from another session: this one's view of the activity is frozen
                waiting = [pid for pid, in roster_db.db.fetchall(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO dims_users%' AND query LIKE '%8014%'")]
                if waiting:
                    break
                assert time.monotonic() < deadline, "the bot never wrote its bookkeeping"
                time.sleep(0.05)
            roster_db.db.fetchval("SELECT pg_terminate_backend(%s)", (waiting[0],))   # as a restart would
        locker.rollback()
    finally:
        locker.close()
    chat.send("/help")   # this chat's updates run in order: a repeat of /start's reply would come first
    reply = sandbox.wait_for_reply(TOKEN, 8014, after_seq=first["seq"], timeout=20)
    assert reply["text"].startswith("What you can do here"), f"the /start reply was sent again: {reply['text']!r}"
    deadline = time.monotonic() + 10
    while not roster_db.db.fetchone("SELECT 1 FROM dims_users WHERE user_id = 8014"):
        assert time.monotonic() < deadline, "the user was never recorded"
        time.sleep(0.05)
    assert _inbox_row(roster_db.db, 8014)[:2] == ("done", 0)
    assert "could not record user 8014 as seen" in running_bot.log()


def test_a_chat_waiting_out_telegram_does_not_hold_up_the_other_chats(running_bot, sandbox):
    from bot import MAX_CONCURRENT_UPDATES
    chats = [Chat(sandbox, TOKEN, user_id=8100 + n) for n in range(MAX_CONCURRENT_UPDATES + 1)]
    lists = [chat.say("/girls") for chat in chats]
    sandbox.fault(TOKEN, "editMessageText", status=503, times=5_000)
    for chat, first in zip(chats, lists):   # every slot's chat now waits on a failing edit
        chat.seq = sandbox.press(TOKEN, chat.user_id, first["message_id"], button_data(first, "Next »"))["seq"]
    deadline = time.monotonic() + 20
    while len([c for c in sandbox.calls(TOKEN, "editMessageText") if c["status"] == 503]) < len(chats) * 2:
        assert time.monotonic() < deadline, "the edits were not retried"
        sandbox.messages(TOKEN, 1, wait=0.05)
    other = Chat(sandbox, TOKEN, user_id=8199)
    assert "Alpha" in other.say("/start", timeout=5)["text"]   # not behind the waiting chats
    failed = len([c for c in sandbox.calls(TOKEN, "editMessageText") if c["status"] == 503])
    logged = running_bot.log().count("Telegram calls fail")
    assert logged <= 8 < failed, (logged, failed)   # once per doubling of the delay, not per call
    sandbox.fault(TOKEN, "editMessageText", times=0)
    for chat in chats:
        edited = chat.next(timeout=30)
        assert edited["edited"] and "page 2 of 2" in edited["text"]


def test_a_button_press_answered_too_late_for_telegram_still_shows_its_result(running_bot, sandbox):
    # After a long blip, Telegram refuses to answer a press made too long ago; the handler must
    # not fail (and in the end be parked as dead) for that: the edit still shows the next page.
    chat = Chat(sandbox, TOKEN, user_id=8013)
    first = chat.say("/girls")
    sandbox.fault(TOKEN, "answerCallbackQuery", status=400, times=5, description="Bad Request: query is too old "
                  "and response timeout expired or query ID is invalid")   # and it stays too old
    chat.seq = sandbox.press(TOKEN, chat.user_id, first["message_id"], button_data(first, "Next »"))["seq"]
    edited = chat.next(timeout=10)
    assert edited["edited"] and "page 2 of 2" in edited["text"]
    assert [c["status"] for c in sandbox.calls(TOKEN, "answerCallbackQuery")][-1:] == [400], "answered once"
    sandbox.fault(TOKEN, "answerCallbackQuery", times=0)
    assert "could no longer be answered" in running_bot.log() and "ERROR" not in running_bot.log()


def test_a_favourite_toggled_on_a_card_that_cannot_be_edited_is_toggled_once_and_said_once(running_bot, sandbox,
                                                                                            roster_db):
    # The toggle is done and answered before the card's buttons are edited; an edit Telegram
    # refuses (the message is gone, or unchanged) ran the whole update again: toggled three
    # times, contradicting answers, and in the end an apology.
    chat = Chat(sandbox, TOKEN, user_id=8016)
    card = chat.press(chat.say("/girls"), "Bella")
    sandbox.fault(TOKEN, "editMessageReplyMarkup", status=400, times=5, description="Bad Request: message to edit not found")
    press = sandbox.press(TOKEN, 8016, card["message_id"], button_data(card, "Add to favourites"))
    pressed = press["update_id"]
    deadline = time.monotonic() + 20
    while (row := roster_db.db.fetchone(
            "SELECT status, attempts FROM dims_inbox WHERE bot_id = %s AND update_id = %s",
            (int(TOKEN.split(":")[0]), pressed))) is None or row[0] == "pending":
        assert time.monotonic() < deadline, f"the press was not handled: {row}"
        time.sleep(0.05)
    sandbox.fault(TOKEN, "editMessageReplyMarkup", times=0)
    assert row == ("done", 0)
    said = [c for c in sandbox.calls(TOKEN, "answerCallbackQuery")
            if c["params"].get("callback_query_id") == press["callback_query_id"]]
    assert len(said) == 1 and "added to your favourites" in json.dumps(said[0]), said
    assert "Bella" in [b["text"] for b in buttons(chat.say("/favs"))]


def test_a_bot_whose_start_waits_out_telegram_stops_at_once_on_sigterm(tmp_path, database_url, roster_db, sandbox):
    sandbox.fault(TOKEN, "getMe", status=502, times=5_000)
    env = dims_env(database_url, sandbox.api_url, tmp_path / "var")
    try:
        proc = DimsProcess(["--single", "--config", str(write_config(tmp_path / "dims.toml"))], env,
                           tmp_path / "bot.log").start()
        _wait_for(proc.log, lambda text: "Telegram calls fail (getMe" in text, timeout=30)
        assert proc.stop(timeout=5) == 0, "a stop must not wait for Telegram to answer"
        assert "stopped before Telegram answered" in proc.log()
    finally:
        sandbox.fault(TOKEN, "getMe", times=0)


def test_a_telegram_outage_past_retry_for_parks_the_update_with_the_reason(tmp_path, database_url, roster_db,
                                                                             sandbox):
    config = write_config(tmp_path / "dims.toml", extra="[telegram]\nretry_for = 2\n")
    env = dims_env(database_url, sandbox.api_url, tmp_path / "var")
    with DimsProcess(["--single", "--config", str(config)], env, tmp_path / "bot.log") as proc:
        Chat(sandbox, TOKEN, user_id=999).wait_until_answering()
        chat = Chat(sandbox, TOKEN, user_id=8012)
        sandbox.fault(TOKEN, "sendMessage", status=500, times=5_000)
        chat.send("/help")
        deadline = time.monotonic() + 30
        while (_inbox_row(roster_db.db, 8012) or ("",))[0] != "dead":
            assert time.monotonic() < deadline, f"not parked: {_inbox_row(roster_db.db, 8012)}"
            sandbox.messages(TOKEN, 1, wait=0.1)
        status, attempts, error = _inbox_row(roster_db.db, 8012)
        assert "sendMessage failed for 2 s (the bound is 2 s)" in error and attempts == 0
        assert "sending: working again" not in proc.log(), "a call that gave up is no sign of recovery"
        sandbox.fault(TOKEN, "sendMessage", times=0)
        from bot import MAINTAIN_EVERY_S
        deadline = time.monotonic() + MAINTAIN_EVERY_S + 10
        while "sending: working again" not in proc.log():   # the bot asks Telegram (getMe) by itself
            assert time.monotonic() < deadline, "the recovery was never seen without a message to send"
            time.sleep(0.1)
        assert "Alpha" in chat.say("/start", timeout=30)["text"]   # the bot carries on
        assert "update" in proc.log() and "the bound is 2 s" in proc.log()


def test_rate_limits_and_server_errors_on_polling_are_waited_out(running_bot, sandbox):
    chat = Chat(sandbox, TOKEN, user_id=8009)
    sandbox.fault(TOKEN, "getUpdates", status=429, retry_after=1, times=1)
    sandbox.fault(TOKEN, "getUpdates", status=502, times=2)
    assert "Alpha" in chat.say("/start")["text"]      # delivered by the poll already waiting
    assert "What you can do here" in chat.say("/help", timeout=30)["text"]   # after the faults
    statuses = [call["status"] for call in sandbox.calls(TOKEN, "getUpdates")]
    assert 429 in statuses and statuses.count(502) >= 2
    assert "Telegram asks to wait 1" in running_bot.log()


def test_another_poller_on_the_token_is_reported_and_the_bot_carries_on(running_bot, sandbox):
    import urllib.error
    import urllib.request
    reported = "another process is polling this bot's token (409 Conflict)"
    deadline = time.monotonic() + 30
    while reported not in running_bot.log() and time.monotonic() < deadline:
        if sandbox.health()["waiting"]["getUpdates"] == 1:   # the bot's long poll is waiting
            try:   # a newer poller: Telegram ends the bot's poll with 409 ...
                with urllib.request.urlopen(f"{sandbox.api_url}{TOKEN}/getUpdates?timeout=1", timeout=10) as answer:
                    answer.read()
            except urllib.error.HTTPError as exc:   # ... and the bot's next poll ends ours
                assert exc.code == 409
        else:
            sandbox.messages(TOKEN, 1, wait=0.05)  # a short pause that is also a request
    assert reported in running_bot.log()
    assert "Alpha" in Chat(sandbox, TOKEN, user_id=8010).say("/start", timeout=30)["text"]


def test_a_rejected_token_ends_single_mode_with_status_78(tmp_path, database_url, sandbox):
    token = "7000010:AAFakeTokenForTestsOnly_revoked11111"
    sandbox.revoke(token)
    config = write_config(tmp_path / "dims.toml")
    env = {**dims_env(database_url, sandbox.api_url, tmp_path / "var"), "ALPHA_TOKEN": token}
    result = subprocess.run([sys.executable, str(ROOT / "main.py"), "--single", "--config", str(config)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78
    assert "Telegram rejected this bot's token" in result.stderr
    assert token.split(":")[1] not in result.stdout + result.stderr


def test_done_updates_are_pruned_after_the_retention_period(db):
    from inbox import Inbox
    Migrator(db).migrate()
    inbox = Inbox(db, "alpha", 7000001)
    inbox.store([{"update_id": n, "message": {"text": str(n)}} for n in (1, 2, 3, 4)])
    inbox.mark_done([1, 2, 3])
    db.execute("UPDATE dims_inbox SET done_at = now() - interval '4 days' WHERE update_id IN (1, 2)")
    for _ in range(3):
        inbox.mark_failed(4, "boom")
    assert inbox.prune(older_than_s=3 * 24 * 3600) == 2
    assert db.fetchall("SELECT update_id, status FROM dims_inbox ORDER BY update_id") == [(3, "done"), (4, "dead")]
