"""Tests of telegram_sandbox: the Bot API emulator, its user side, its clients and its CLI.

An unmodified python-telegram-bot Application runs against the sandbox for the behaviour DIMS
relies on; raw HTTP calls pin down Telegram's semantics (offsets, long polls, 409/401/404, the
400 validations); results are checked against the Bot API spec by walking it. Every wait has a
deadline and waits for an event (a message, an in-flight call), never for a fixed sleep.
"""

import asyncio
import datetime
import http.client
import io
import itertools
import json
import os
import pathlib
import pty
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import pytest
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import NetworkError, RetryAfter
from telegram.ext import (AIORateLimiter, Application, ApplicationBuilder, CallbackQueryHandler,
                          CommandHandler, ContextTypes, MessageHandler, filters)

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import telegram_sandbox  # noqa: E402 (needs the repository on sys.path)
from telegram_sandbox import (Sandbox, SandboxClient, SandboxError, SandboxProcess,  # noqa: E402
                              chat)

FULL_SPEC = REPO.parent / "shared" / "bot-api" / "api.json"
DEADLINE_S = 10.0
PTB_TOKEN = "777000:PtbTestBotSecret"
_bot_ids = itertools.count(500_001)


# -- helpers ---------------------------------------------------------------------------------

def png(width: int, height: int) -> bytes:
    """A real PNG image of the given size (black), made with the standard library."""
    row = b"\x00" + b"\x00\x00\x00" * width
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


def new_token() -> str:
    bot_id = next(_bot_ids)
    return f"{bot_id}:Secret-{bot_id}"


class BotApi:
    """Raw Bot API calls over one keep-alive connection: (status, decoded body)."""

    def __init__(self, sandbox: SandboxClient, token: str):
        url = urllib.parse.urlsplit(sandbox.url)
        self.connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        self.token = token

    def __call__(self, method: str, params: dict | None = None, **kw) -> tuple[int, dict]:
        params = {**(params or {}), **kw}
        body = urllib.parse.urlencode(
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()})
        return self.raw(method, body.encode(), "application/x-www-form-urlencoded")

    def raw(self, method: str, body: bytes, content_type: str, headers: dict | None = None,
            path: str | None = None) -> tuple[int, dict]:
        self.connection.request("POST", path or f"/bot{self.token}/{method}", body=body,
                                headers={"Content-Type": content_type, **(headers or {})})
        response = self.connection.getresponse()
        return response.status, json.loads(response.read())

    def ok(self, method: str, params: dict | None = None, **kw):
        status, body = self(method, params, **kw)
        assert (status, body.get("ok")) == (200, True), body
        return body["result"]

    def close(self) -> None:
        self.connection.close()


def in_thread(function, *args):
    """Starts function(*args) in a thread; returns a getter for its result with a deadline."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=function(*args)), daemon=True)
    thread.start()

    def result(timeout: float = DEADLINE_S):
        thread.join(timeout)
        assert not thread.is_alive(), f"no result within {timeout} s"
        return box["result"]
    return result


def wait_until(condition, timeout: float = DEADLINE_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def poll_in_flight(sandbox: Sandbox, token: str, count: int = 1):
    """Waits until the bot's count-th getUpdates call is waiting (status not yet known)."""
    return wait_until(lambda: [c for c in sandbox.calls(token, "getUpdates")
                               if c["status"] is None][count - 1:], what="long poll start")


def retry_after_seconds(error: RetryAfter) -> float:
    value = error.retry_after
    return value.total_seconds() if isinstance(value, datetime.timedelta) else value


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sb():
    with Sandbox() as sandbox:
        yield sandbox


@pytest.fixture
def token() -> str:
    return new_token()


@pytest.fixture
def api(sb, token):
    client = BotApi(sb, token)
    yield client
    client.close()


@pytest.fixture
def user(sb, token) -> int:
    """A user who has written to the bot, so the bot may write to them."""
    sb.send(token, 9001, "hi")
    return 9001


@pytest.fixture(scope="module")
def spec() -> dict:
    path = FULL_SPEC if FULL_SPEC.is_file() else telegram_sandbox.SPEC_PATH
    return json.loads(path.read_text(encoding="utf-8"))


async def start_handler(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    keyboard = InlineKeyboardMarkup([
        [InlineKeyboardButton("Alice", callback_data="pick:alice"),
         InlineKeyboardButton("Bob", callback_data="pick:bob")],
        [InlineKeyboardButton("Next »", callback_data="page:2")]])
    await update.effective_message.reply_text("Welcome! Pick one:", reply_markup=keyboard)


async def pick_handler(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    await query.answer(f"saved {query.data}")
    await query.edit_message_text(f"You chose {query.data.partition(':')[2]}")


async def photo_handler(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    sent = await update.effective_message.reply_photo(png(640, 480), caption="a profile")
    file = await context.bot.get_file(sent.photo[-1].file_id)
    data = await file.download_as_bytearray()
    await update.effective_message.reply_text(f"downloaded {len(data)} bytes, "
                                              f"{sent.photo[-1].width}x{sent.photo[-1].height}")


async def echo_handler(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.effective_message.reply_text(f"echo: {update.effective_message.text}")


class RunningApplication:
    """A PTB Application polling the sandbox in its own thread and event loop."""

    def __init__(self, application: Application):
        self.application = application
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Application:
        self.thread.start()
        assert self.ready.wait(DEADLINE_S), "PTB application did not start polling"
        return self.application

    def __exit__(self, *exc_info) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(DEADLINE_S)

    async def _main(self) -> None:
        self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
        async with self.application:
            await self.application.start()
            await self.application.updater.start_polling(timeout=20, poll_interval=0)
            self.ready.set()
            await self.stop_event.wait()
            await self.application.updater.stop()
            await self.application.stop()


def ptb_application(sandbox: Sandbox, token: str, **builder) -> Application:
    app_builder = (ApplicationBuilder().token(token).base_url(sandbox.api_url)
                   .base_file_url(sandbox.file_url))
    for name, value in builder.items():
        app_builder = getattr(app_builder, name)(value)
    return app_builder.build()


@pytest.fixture(scope="module")
def ptb_bot(sb):
    """The tiny bot of these tests: /start with buttons, a button edit, /photo, an echo."""
    application = ptb_application(sb, PTB_TOKEN)
    application.add_handler(CommandHandler("start", start_handler))
    application.add_handler(CommandHandler("photo", photo_handler))
    application.add_handler(CallbackQueryHandler(pick_handler))
    application.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, echo_handler))
    with RunningApplication(application):
        yield PTB_TOKEN


# -- a real python-telegram-bot Application ---------------------------------------------------

def test_ptb_start_command_is_answered_with_an_inline_keyboard(sb, ptb_bot):
    sent = sb.send(ptb_bot, 101, "/start")
    reply = sb.wait_for_reply(ptb_bot, 101, after_seq=sent["seq"], timeout=DEADLINE_S)
    assert reply["text"] == "Welcome! Pick one:"
    rows = reply["reply_markup"]["inline_keyboard"]
    assert [[b["callback_data"] for b in row] for row in rows] == [
        ["pick:alice", "pick:bob"], ["page:2"]]


def test_ptb_command_addressed_to_the_bot_username_reaches_the_command_handler(sb, ptb_bot):
    username = telegram_sandbox.bot_username(int(ptb_bot.partition(":")[0]))
    sent = sb.send(ptb_bot, 102, f"/start@{username}")
    reply = sb.wait_for_reply(ptb_bot, 102, after_seq=sent["seq"], timeout=DEADLINE_S)
    assert reply["text"] == "Welcome! Pick one:"


def test_ptb_button_press_edits_the_message_and_the_answer_is_recorded(sb, ptb_bot):
    sent = sb.send(ptb_bot, 103, "/start")
    menu = sb.wait_for_reply(ptb_bot, 103, after_seq=sent["seq"], timeout=DEADLINE_S)
    pressed = sb.press(ptb_bot, 103, menu["message_id"], "pick:bob")
    edit = sb.wait_for_reply(ptb_bot, 103, after_seq=pressed["seq"], timeout=DEADLINE_S)
    assert (edit["message_id"], edit["edited"], edit["text"]) == (
        menu["message_id"], True, "You chose bob")
    assert edit["reply_markup"] is None, "editMessageText without reply_markup drops the keyboard"
    answers = [c for c in sb.calls(ptb_bot, "answerCallbackQuery")
               if c["params"]["callback_query_id"] == pressed["callback_query_id"]]
    assert [(a["params"]["text"], a["status"]) for a in answers] == [("saved pick:bob", 200)]


def test_ptb_plain_text_is_echoed(sb, ptb_bot):
    sent = sb.send(ptb_bot, 104, "hello there")
    reply = sb.wait_for_reply(ptb_bot, 104, after_seq=sent["seq"], timeout=DEADLINE_S)
    assert reply["text"] == "echo: hello there"


def test_ptb_uploaded_photo_comes_back_through_get_file(sb, ptb_bot):
    sent = sb.send(ptb_bot, 105, "/photo")
    photo = sb.wait_for_reply(ptb_bot, 105, after_seq=sent["seq"], timeout=DEADLINE_S)
    assert photo["caption"] == "a profile"
    assert (photo["photo"][-1]["width"], photo["photo"][-1]["height"]) == (640, 480)
    report = sb.wait_for_reply(ptb_bot, 105, after_seq=photo["seq"], timeout=DEADLINE_S)
    assert report["text"] == f"downloaded {len(png(640, 480))} bytes, 640x480"


def test_ptb_commands_set_are_the_commands_got(sb, token):
    async def scenario():
        async with ptb_application(sb, token) as application:
            await application.bot.set_my_commands([("girls", "Browse"), ("help", "Help")])
            commands = await application.bot.get_my_commands()
            await application.bot.delete_my_commands()
            return commands, await application.bot.get_my_commands()
    commands, after_delete = asyncio.run(scenario())
    assert [(c.command, c.description) for c in commands] == [("girls", "Browse"),
                                                               ("help", "Help")]
    assert after_delete == ()


# -- results and parameters against the spec --------------------------------------------------

def test_every_served_method_exists_in_the_spec(spec):
    assert set(telegram_sandbox.SERVED_METHODS) <= set(spec["methods"])


def missing_required(spec: dict, value, types: list[str], where: str) -> list[str]:
    """Paths of required fields the value lacks, walking the spec type by type."""
    if value is None:
        return []
    for type_name in types:
        if type_name.startswith("Array of "):
            if isinstance(value, list):
                return [p for i, item in enumerate(value) for p in
                        missing_required(spec, item, [type_name[9:]], f"{where}[{i}]")]
            continue
        entry = spec["types"].get(type_name)
        if entry is None:
            return []
        if not isinstance(value, dict):
            continue
        if entry.get("subtypes"):
            candidates = [missing_required(spec, value, [s], where) for s in entry["subtypes"]]
            return min(candidates, key=len)
        gaps = [f"{where}.{f['name']} ({type_name})" for f in entry.get("fields", [])
                if f["required"] and f["name"] not in value]
        return gaps + [p for f in entry.get("fields", []) if f["name"] in value
                       for p in missing_required(spec, value[f["name"]], f["types"],
                                                 f"{where}.{f['name']}")]
    return []


def exercise_every_method(sb: Sandbox, api: BotApi, token: str) -> dict:
    """A result of every served method, made with valid parameters."""
    sb.send(token, 4242, "/start")
    markup = {"inline_keyboard": [[{"text": "A", "callback_data": "a"}]]}
    results = {"getUpdates": api.ok("getUpdates"), "getMe": api.ok("getMe")}
    text = api.ok("sendMessage", chat_id=4242, text="hi", reply_markup=markup)
    pressed = sb.press(token, 4242, text["message_id"], "a")
    results["getUpdates"] += api.ok("getUpdates", offset=pressed["update_id"])
    status, photo = api.raw("sendPhoto", *multipart({"chat_id": "4242", "caption": "c"},
                                                     {"photo": ("p.png", png(1000, 500))}))
    assert status == 200, photo
    results.update(
        sendMessage=text, sendPhoto=photo["result"],
        editMessageText=api.ok("editMessageText", chat_id=4242, message_id=text["message_id"],
                               text="new", reply_markup=markup),
        editMessageReplyMarkup=api.ok("editMessageReplyMarkup", chat_id=4242,
                                      message_id=text["message_id"]),
        editMessageCaption=api.ok("editMessageCaption", chat_id=4242,
                                  message_id=photo["result"]["message_id"], caption="d"),
        answerCallbackQuery=api.ok("answerCallbackQuery",
                                   callback_query_id=pressed["callback_query_id"]),
        sendChatAction=api.ok("sendChatAction", chat_id=4242, action="typing"),
        setMyCommands=api.ok("setMyCommands", commands=[{"command": "a", "description": "b"}]),
        getMyCommands=api.ok("getMyCommands"),
        deleteMyCommands=api.ok("deleteMyCommands"),
        getFile=api.ok("getFile", file_id=photo["result"]["photo"][0]["file_id"]),
        deleteMessage=api.ok("deleteMessage", chat_id=4242, message_id=text["message_id"]),
        setWebhook=api.ok("setWebhook", url="https://example.org/hook"),
        getWebhookInfo=api.ok("getWebhookInfo"),
        deleteWebhook=api.ok("deleteWebhook"),
        logOut=api.ok("logOut"),
        close=api.ok("close"),
    )
    return results


def test_every_result_has_the_required_fields_of_its_spec_type(sb, api, token, spec):
    results = exercise_every_method(sb, api, token)
    assert set(results) == set(telegram_sandbox.SERVED_METHODS)
    kinds = {"callback_query", "message"}
    assert kinds <= {k for u in results["getUpdates"] for k in u}, "both update kinds checked"
    for method, result in results.items():
        returns = spec["methods"][method]["returns"]
        assert missing_required(spec, result, returns, method) == [], method


def test_spec_walk_notices_a_missing_required_field(spec):
    message = {"message_id": 1, "date": 0, "chat": {"id": 1}}
    assert missing_required(spec, message, ["Message"], "m") == ["m.chat.type (Chat)"]


def test_a_call_without_the_required_parameters_of_the_spec_is_refused(spec, api):
    needing = [m for m in telegram_sandbox.SERVED_METHODS
               if any(f["required"] for f in spec["methods"][m].get("fields", []))]
    assert len(needing) >= 8
    for method in needing:
        status, body = api(method)
        assert (status, body["ok"]) == (400, False), method
        assert body["description"].startswith("Bad Request: "), body


# -- getUpdates ------------------------------------------------------------------------------

def test_updates_stay_until_a_later_offset_confirms_them(sb, api, token):
    ids = [sb.send(token, 11, f"m{i}")["update_id"] for i in range(3)]
    assert [u["update_id"] for u in api.ok("getUpdates")] == ids
    assert [u["update_id"] for u in api.ok("getUpdates")] == ids, "unconfirmed updates stay"
    assert [u["update_id"] for u in api.ok("getUpdates", offset=ids[1])] == ids[1:]
    assert [u["update_id"] for u in api.ok("getUpdates")] == ids[1:], "below offset is gone"
    assert api.ok("getUpdates", offset=ids[2] + 1) == []


def test_negative_offset_keeps_only_the_last_updates(sb, api, token):
    ids = [sb.send(token, 12, f"m{i}")["update_id"] for i in range(4)]
    assert [u["update_id"] for u in api.ok("getUpdates", offset=-1)] == ids[-1:]
    assert [u["update_id"] for u in api.ok("getUpdates")] == ids[-1:], "the rest is forgotten"


def test_limit_caps_the_batch_between_1_and_100(sb, api, token):
    ids = [sb.send(token, 13, f"m{i}")["update_id"] for i in range(3)]
    assert [u["update_id"] for u in api.ok("getUpdates", limit=2)] == ids[:2]
    assert [u["update_id"] for u in api.ok("getUpdates", limit=0)] == ids[:1]


def test_long_poll_answers_as_soon_as_an_update_arrives(sb, api, token):
    poll_timeout = 30
    result = in_thread(api.ok, "getUpdates", {"timeout": poll_timeout})
    poll_in_flight(sb, token)
    sent_at = time.monotonic()
    update_id = sb.send(token, 14, "wake up")["update_id"]
    updates = result(poll_timeout)
    assert [u["update_id"] for u in updates] == [update_id]
    assert time.monotonic() - sent_at < poll_timeout / 10


def test_long_poll_without_updates_ends_after_its_timeout(sb, api):
    started = time.monotonic()
    assert api.ok("getUpdates", timeout=1) == []
    assert 0.9 <= time.monotonic() - started < 3


def test_allowed_updates_is_remembered_between_calls(sb, api, token):
    assert api.ok("getUpdates", allowed_updates=["callback_query"]) == []
    dropped = sb.send(token, 15, "filtered out")
    assert dropped["update_id"] is None
    assert api.ok("getUpdates") == [], "the filter is still in force without allowed_updates"
    assert api.ok("getUpdates", allowed_updates=[]) == []
    assert sb.send(token, 15, "kept")["update_id"] is not None


def test_newer_poller_terminates_the_older_with_409(sb, token):
    older, newer = BotApi(sb, token), BotApi(sb, token)
    try:
        first = in_thread(older, "getUpdates", {"timeout": 30})
        poll_in_flight(sb, token)
        assert newer("getUpdates") == (200, {"ok": True, "result": []})
        status, body = first()
        assert (status, body["description"]) == (409, telegram_sandbox.CONFLICT_POLLER)
    finally:
        older.close()
        newer.close()


def test_health_of_a_bot_says_whether_it_polls_and_when_it_last_did(sb, api, token):
    bot_id = int(token.partition(":")[0])
    assert sb.health(token)["bot"] == {
        "id": bot_id, "username": telegram_sandbox.bot_username(bot_id), "polling": False,
        "last_poll_age_s": None, "webhook": False, "pending_updates": 0}
    poll = in_thread(api, "getUpdates", {"timeout": 5})
    poll_in_flight(sb, token)
    assert sb.health(token)["bot"]["polling"] is True
    sb.send(token, 1, "hi")
    assert poll()[0] == 200
    bot = sb.health(token)["bot"]
    assert bot["polling"] is False and 0 <= bot["last_poll_age_s"] < DEADLINE_S
    assert bot["pending_updates"] == 1, "not confirmed by a later offset yet"
    api.ok("setWebhook", url="https://example.org/hook")
    assert sb.health(token)["bot"]["webhook"] is True
    assert "bot" not in sb.health()


def test_a_long_poll_whose_client_leaves_ends_at_once(sb, token):
    client = BotApi(sb, token)
    client.connection.request("POST", f"/bot{token}/getUpdates", body=b"timeout=30",
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    poll_in_flight(sb, token)
    client.close()
    wait_until(lambda: not sb.health(token)["bot"]["polling"], what="the abandoned poll's end")
    assert sb.calls(token, "getUpdates")[-1]["status"] == 0, "0: the connection went away"


def test_polling_while_a_webhook_is_set_is_409_until_it_is_deleted(sb, api, token):
    sb.send(token, 16, "pending")
    api.ok("setWebhook", url="https://example.org/hook")
    status, body = api("getUpdates")
    assert (status, body["description"]) == (409, telegram_sandbox.CONFLICT_WEBHOOK)
    info = api.ok("getWebhookInfo")
    assert (info["url"], info["pending_update_count"]) == ("https://example.org/hook", 1)
    api.ok("deleteWebhook")
    assert len(api.ok("getUpdates")) == 1


def test_setting_a_webhook_ends_a_long_poll_in_progress_with_409(sb, api, token):
    other = BotApi(sb, token)
    try:
        poll = in_thread(other, "getUpdates", {"timeout": 30})
        poll_in_flight(sb, token)
        api.ok("setWebhook", url="https://example.org/hook")
        status, body = poll()
        assert (status, body["description"]) == (409, telegram_sandbox.CONFLICT_WEBHOOK)
    finally:
        other.close()


def test_webhook_must_be_https_on_a_telegram_port(api):
    assert api("setWebhook", url="http://example.org/hook")[1]["description"] == (
        "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
    assert api("setWebhook", url="https://example.org:8080/")[0] == 400


def test_delete_webhook_can_drop_pending_updates(sb, api, token):
    sb.send(token, 17, "old")
    api.ok("deleteWebhook", drop_pending_updates=True)
    assert api.ok("getUpdates") == []


# -- errors: 401, 404, 400 -------------------------------------------------------------------

@pytest.mark.parametrize("bad_token", ["nocolon", "abc:def", "123:", ":abc", "123:a b"])
def test_token_not_of_telegram_shape_is_401_unauthorized(sb, bad_token):
    client = BotApi(sb, "")
    try:
        path = f"/bot{urllib.parse.quote(bad_token)}/getMe"
        assert client.raw("getMe", b"", "text/plain", path=path) == (
            401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
    finally:
        client.close()


def test_another_secret_for_a_known_bot_id_or_a_revoked_token_is_401(sb, api, token):
    api.ok("getMe")
    impostor = BotApi(sb, token.partition(":")[0] + ":OtherSecret")
    try:
        assert impostor("getMe")[0] == 401
    finally:
        impostor.close()
    sb.revoke(token)
    assert api("getMe")[0] == 401


def test_unknown_method_is_404_and_an_unserved_spec_method_is_501(api):
    assert api("sendTelepathy") == (404, {"ok": False, "error_code": 404,
                                          "description": "Not Found"})
    status, body = api("sendVoice")
    assert status == 501 and "sendVoice" in body["description"]


def test_method_names_are_case_insensitive(api):
    assert api.ok("GETME")["is_bot"] is True
    assert api.ok("getme") == api.ok("getMe")


def test_get_me_is_a_stable_identity_derived_from_the_token(api, token):
    bot_id = int(token.partition(":")[0])
    me = api.ok("getMe")
    assert (me["id"], me["username"], me["first_name"]) == (
        bot_id, f"sandbox_{bot_id}_bot", f"Sandbox {bot_id}")


BUTTON = {"text": "x", "callback_data": "ok"}


@pytest.mark.parametrize("method, params, description", [
    ("sendMessage", {"text": "hi"}, "chat_id is empty"),
    ("sendMessage", {"chat_id": 1}, "message text is empty"),
    ("sendMessage", {"chat_id": "USER", "text": " \n "}, "message text is empty"),
    ("sendMessage", {"chat_id": "USER", "text": "x" * 4097}, "message is too long"),
    ("sendMessage", {"chat_id": 424242, "text": "hi"}, "chat not found"),
    ("sendMessage", {"chat_id": "@someone", "text": "hi"}, "chat not found"),
    ("sendMessage", {"chat_id": "USER", "text": "hi", "reply_markup": {"inline_keyboard": [[
        {"text": "x", "callback_data": "y" * 65}]]}}, "BUTTON_DATA_INVALID"),
    ("sendMessage", {"chat_id": "USER", "text": "hi", "reply_markup": {"inline_keyboard": [[
        {"text": "x", "callback_data": ""}]]}}, "BUTTON_DATA_INVALID"),
    ("sendMessage", {"chat_id": "USER", "text": "hi", "reply_markup": {"inline_keyboard": [[
        {"text": "x"}]]}},
     "can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard"),
    ("sendMessage", {"chat_id": "USER", "text": "hi", "reply_markup": "{not json"},
     "can't parse reply keyboard markup JSON object"),
    ("sendMessage", {"chat_id": "USER", "text": "<b>hi", "parse_mode": "HTML"},
     "can't parse entities: Can't find end tag corresponding to start tag \"b\""),
    ("sendMessage", {"chat_id": "USER", "text": "1.5", "parse_mode": "MarkdownV2"},
     "can't parse entities: Character '.' is reserved and must be escaped with the "
     "preceding '\\'"),
    ("sendMessage", {"chat_id": "USER", "text": "hi", "parse_mode": "Fancy"},
     "unsupported parse_mode"),
    ("editMessageText", {"chat_id": "USER", "message_id": "abc", "text": "x"},
     'parameter "message_id" must be of type Integer'),
    ("editMessageText", {"chat_id": "USER", "message_id": 999, "text": "x"},
     "message to edit not found"),
    ("editMessageText", {"chat_id": "USER", "message_id": 1, "text": "x"},
     "message can't be edited"),
    ("deleteMessage", {"chat_id": "USER", "message_id": 999}, "message to delete not found"),
    ("answerCallbackQuery", {"callback_query_id": "12345"},
     "query is too old and response timeout expired or query ID is invalid"),
    ("sendChatAction", {"chat_id": "USER", "action": "dancing"},
     "wrong parameter action in request"),
    ("getFile", {"file_id": "nope"}, "invalid file_id"),
    ("sendPhoto", {"chat_id": "USER", "photo": "not-a-file-id"},
     "wrong file identifier/HTTP URL specified"),
    ("setMyCommands", {"commands": [{"command": "Bad Command", "description": "x"}]},
     "BOT_COMMAND_INVALID"),
    ("setMyCommands", {"commands": [{"command": "ok"}]},
     'can\'t parse commands: field "description" of BotCommand is required'),
])
def test_invalid_parameters_are_refused_as_telegram_does(api, user, method, params,
                                                         description):
    params = {k: user if v == "USER" else v for k, v in params.items()}
    assert api(method, params) == (400, {"ok": False, "error_code": 400,
                                         "description": f"Bad Request: {description}"})


def test_limits_are_inclusive(api, user):
    assert len(api.ok("sendMessage", chat_id=user, text="é" * 4096)["text"]) == 4096
    data = "ü" * 32  # 64 bytes in UTF-8
    markup = {"inline_keyboard": [[{"text": "x", "callback_data": data}]]}
    sent = api.ok("sendMessage", chat_id=user, text="hi", reply_markup=markup)
    assert sent["reply_markup"] == markup


def test_an_edit_that_changes_nothing_is_not_modified_and_one_that_does_is_applied(api, user):
    markup = {"inline_keyboard": [[BUTTON]]}
    sent = api.ok("sendMessage", chat_id=user, text="same", reply_markup=markup)
    status, body = api("editMessageText", chat_id=user, message_id=sent["message_id"],
                       text="same", reply_markup=markup)
    assert (status, body["description"]) == (400, f"Bad Request: {telegram_sandbox.NOT_MODIFIED}")
    edited = api.ok("editMessageReplyMarkup", chat_id=user, message_id=sent["message_id"])
    assert "reply_markup" not in edited and edited["edit_date"] >= sent["date"]


def test_uploaded_file_that_is_not_an_image_is_refused(api, user):
    status, body = api.raw("sendPhoto", *multipart({"chat_id": str(user)},
                                                    {"photo": ("x.png", b"not an image")}))
    assert (status, body["description"]) == (400, "Bad Request: IMAGE_PROCESS_FAILED")


# -- bodies and transport --------------------------------------------------------------------

def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "sandbox-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
               f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n').encode() + data + b"\r\n"
              for k, (name, data) in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


def test_form_json_multipart_and_query_string_bodies_are_equivalent(api, user, token):
    markup = {"inline_keyboard": [[BUTTON]]}
    form = api.ok("sendMessage", chat_id=user, text="same", reply_markup=markup)
    status, as_json = api.raw("sendMessage", json.dumps(
        {"chat_id": user, "text": "same", "reply_markup": markup}).encode(), "application/json")
    status_mp, as_multipart = api.raw("sendMessage", *multipart(
        {"chat_id": str(user), "text": "same", "reply_markup": json.dumps(markup)}, {}))
    query = urllib.parse.urlencode({"chat_id": user, "text": "same",
                                    "reply_markup": json.dumps(markup)})
    status_q, as_query = api.raw("sendMessage", b"", "text/plain",
                                 path=f"/bot{token}/sendMessage?{query}")
    assert (status, status_mp, status_q) == (200, 200, 200)
    shape = [(m["text"], m["reply_markup"]) for m in
             (form, as_json["result"], as_multipart["result"], as_query["result"])]
    assert shape == [("same", markup)] * 4


def test_chunked_request_body_is_read(api, user):
    body = urllib.parse.urlencode({"chat_id": user, "text": "chunked"}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                       for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    status, sent = api.raw("sendMessage", chunked, "application/x-www-form-urlencoded",
                           headers={"Transfer-Encoding": "chunked"})
    assert (status, sent["result"]["text"]) == (200, "chunked")


def test_one_keep_alive_connection_serves_many_requests(api):
    api.ok("getMe")
    socket = api.connection.sock
    for _ in range(20):
        api.ok("getMe")
    assert api.connection.sock is socket


def test_file_route_serves_uploads_and_404s_unknown_paths(sb, api, user, token):
    image = png(64, 32)
    status, sent = api.raw("sendPhoto", *multipart({"chat_id": str(user)},
                                                    {"photo": ("p.png", image)}))
    file = api.ok("getFile", file_id=sent["result"]["photo"][-1]["file_id"])
    client = BotApi(sb, token)
    try:
        client.connection.request("GET", f"/file/bot{token}/{file['file_path']}")
        response = client.connection.getresponse()
        assert (response.status, response.read()) == (200, image)
        client.connection.request("GET", f"/file/bot{token}/photos/none.jpg")
        response = client.connection.getresponse()
        assert (response.status, json.loads(response.read())["description"]) == (404, "Not Found")
    finally:
        client.close()


def test_photo_by_file_id_reuses_the_stored_sizes_and_by_url_is_accepted(api, user):
    status, first = api.raw("sendPhoto", *multipart({"chat_id": str(user)},
                                                     {"photo": ("p.png", png(2000, 1000))}))
    sizes = first["result"]["photo"]
    assert [(s["width"], s["height"]) for s in sizes] == [
        (90, 45), (320, 160), (800, 400), (1280, 640), (2000, 1000)]
    again = api.ok("sendPhoto", chat_id=user, photo=sizes[-1]["file_id"])
    assert again["photo"] == sizes
    by_url = api.ok("sendPhoto", chat_id=user, photo="https://example.org/cat.jpg")
    assert by_url["photo"][-1]["width"] > 0


# -- text and entities -----------------------------------------------------------------------

def test_user_commands_carry_bot_command_entities_in_utf16_units(sb, api, token):
    sb.send(token, 21, "👋 /find Anna@x and /help")
    message = api.ok("getUpdates")[0]["message"]
    commands = [message["text"].encode("utf-16-le")[2 * e["offset"]:2 * (e["offset"] + e["length"])]
                .decode("utf-16-le") for e in message["entities"] if e["type"] == "bot_command"]
    assert commands == ["/find", "/help"]


def test_html_parse_mode_turns_tags_into_entities(api, user):
    sent = api.ok("sendMessage", chat_id=user, parse_mode="HTML",
                  text='<b>Anna</b> &amp; <a href="https://e.org">site</a> &lt;3')
    assert sent["text"] == "Anna & site <3"
    assert [(e["type"], e["offset"], e["length"]) for e in sent["entities"]] == [
        ("bold", 0, 4), ("text_link", 7, 4)]


def test_markdown_v2_accepts_escaped_reserved_characters(api, user):
    sent = api.ok("sendMessage", chat_id=user, parse_mode="MarkdownV2",
                  text=r"*Anna*, 25 y\.o\. \- _likes_ `code\`s`")
    assert sent["text"] == "Anna, 25 y.o. - likes code`s"
    assert [e["type"] for e in sent["entities"]] == ["bold", "italic", "code"]


# -- the user side ---------------------------------------------------------------------------

def test_press_refuses_data_the_message_does_not_offer_unless_forged(sb, api, token, user):
    sent = api.ok("sendMessage", chat_id=user, text="menu",
                  reply_markup={"inline_keyboard": [[BUTTON]]})
    with pytest.raises(SandboxError) as refused:
        sb.press(token, user, sent["message_id"], "admin:delete_all")
    assert refused.value.status == 400 and "no button" in refused.value.description
    forged = sb.press(token, user, sent["message_id"], "admin:delete_all" * 10, forge=True)
    update = api.ok("getUpdates", offset=forged["update_id"])[0]
    assert update["callback_query"]["data"] == "admin:delete_all" * 10


def test_forged_press_on_a_missing_message_carries_an_inaccessible_message(sb, api, token,
                                                                          user):
    forged = sb.press(token, user, 777, "x", forge=True)
    query = api.ok("getUpdates", offset=forged["update_id"])[0]["callback_query"]
    assert (query["message"]["message_id"], query["message"]["date"]) == (777, 0)


def test_messages_after_seq_include_edits_and_deletions_in_order(sb, api, token, user):
    start = sb.messages(token, user)
    after = start[-1]["seq"] if start else 0
    sent = api.ok("sendMessage", chat_id=user, text="v1")
    api.ok("editMessageText", chat_id=user, message_id=sent["message_id"], text="v2")
    api.ok("deleteMessage", chat_id=user, message_id=sent["message_id"])
    events = sb.messages(token, user, after_seq=after)
    assert [(e["text"], e["edited"], e["deleted"]) for e in events] == [
        ("v1", False, False), ("v2", True, False), ("v2", False, True)]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    later = sb.messages(token, user, after=sent["message_id"])   # a deleted id still counts
    assert [(e["text"], e["edited"], e["deleted"]) for e in later] == [
        ("v2", True, False), ("v2", False, True)]


def changes(events: list[dict]) -> list[tuple]:
    return [(e["message_id"], e["text"], e["edited"]) for e in events]


def test_messages_after_a_pressed_message_include_its_edit(sb, api, token, user):
    menu = api.ok("sendMessage", chat_id=user, text="menu",
                  reply_markup={"inline_keyboard": [[BUTTON]]})
    assert sb.messages(token, user, after=menu["message_id"]) == []
    sb.press(token, user, menu["message_id"], "ok")
    api.ok("editMessageText", chat_id=user, message_id=menu["message_id"], text="picked")
    assert changes(sb.messages(token, user, after=menu["message_id"])) == [
        (menu["message_id"], "picked", True)]


def test_messages_after_an_id_are_what_happened_after_its_send_in_order(sb, api, token, user):
    first = api.ok("sendMessage", chat_id=user, text="a")
    api.ok("editMessageText", chat_id=user, message_id=first["message_id"], text="a1")
    after = api.ok("sendMessage", chat_id=user, text="b")["message_id"]
    api.ok("editMessageText", chat_id=user, message_id=after, text="b2")
    api.ok("editMessageText", chat_id=user, message_id=first["message_id"], text="a2")
    last = api.ok("sendMessage", chat_id=user, text="c")["message_id"]
    assert changes(sb.messages(token, user, after=after)) == [
        (after, "b2", True), (first["message_id"], "a2", True), (last, "c", False)]
    assert sb.messages(token, user, after=last) == []


def test_messages_after_a_user_message_id_or_one_not_reached_yet(sb, api, token, user):
    api.ok("sendMessage", chat_id=user, text="before")
    asked = sb.send(token, user, "question")["message_id"]
    api.ok("sendMessage", chat_id=user, text="answer")
    assert [e["text"] for e in sb.messages(token, user, after=asked)] == ["answer"]
    assert sb.messages(token, user, after=asked + 5) == []


def test_messages_after_an_id_count_it_in_its_own_chat(sb, api, token, user):
    sb.send(token, 9002, "hi")
    here = api.ok("sendMessage", chat_id=user, text="x")["message_id"]
    api.ok("editMessageText", chat_id=user, message_id=here, text="x2")
    there = api.ok("sendMessage", chat_id=9002, text="y")["message_id"]
    assert here == there
    assert changes(sb.messages(token, user, after=here)) == [(here, "x2", True)]
    assert sb.messages(token, 9002, after=there) == []


def test_messages_wait_after_an_id_is_woken_by_an_edit_of_it(sb, api, token, user):
    menu = api.ok("sendMessage", chat_id=user, text="menu",
                  reply_markup={"inline_keyboard": [[BUTTON]]})
    waiting = in_thread(sb.messages, token, user, menu["message_id"], 5.0)
    wait_until(lambda: sb.health()["waiting"]["messages"] >= 1, what="messages wait start")
    api.ok("editMessageReplyMarkup", chat_id=user, message_id=menu["message_id"])
    assert [(e["text"], e["edited"], e["reply_markup"]) for e in waiting(10)] == [   # not [] (the timeout)
        ("menu", True, None)]


def test_messages_wait_returns_as_soon_as_the_bot_sends(sb, api, token, user):
    waiting = in_thread(sb.messages, token, user, 0, 30.0)
    wait_until(lambda: sb.health()["waiting"]["messages"] >= 1, what="messages wait start")
    sent_at = time.monotonic()
    api.ok("sendMessage", chat_id=user, text="arrived")
    assert [e["text"] for e in waiting(30)] == ["arrived"]
    assert time.monotonic() - sent_at < 3


def test_wait_for_reply_gives_up_at_its_deadline(sb, token, user):
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        sb.wait_for_reply(token, user, after_seq=0, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3


def test_user_side_refuses_bad_requests_with_a_clear_400(sb, token):
    with pytest.raises(SandboxError) as missing:
        sb.send(token, 1, "")
    assert missing.value.status == 400
    with pytest.raises(SandboxError) as bad_token:
        sb.send("not-a-token", 1, "hi")
    assert "token" in bad_token.value.description
    with pytest.raises(SandboxError) as unknown:
        sb.fault(token, "sendTelepathy")
    assert "not served" in unknown.value.description


# -- injected faults -------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
def test_injected_429_makes_ptb_raise_retry_after(sb, token, user):
    sb.fault(token, "sendMessage", status=429, retry_after=7)

    async def send():
        async with ptb_application(sb, token) as application:
            await application.bot.send_message(user, "hello")
    with pytest.raises(RetryAfter) as raised:
        asyncio.run(send())
    assert retry_after_seconds(raised.value) == 7
    assert [c["status"] for c in sb.calls(token, "sendMessage")] == [429]


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
def test_ptb_rate_limiter_waits_out_a_429_and_retries(sb, token, user):
    sb.fault(token, "sendMessage", status=429, retry_after=1)

    async def send():
        limiter = AIORateLimiter(max_retries=2)
        async with ptb_application(sb, token, rate_limiter=limiter) as application:
            started = time.monotonic()
            message = await application.bot.send_message(user, "after the flood")
            return message.text, time.monotonic() - started
    text, elapsed = asyncio.run(send())
    assert text == "after the flood" and elapsed >= 1.0
    assert [c["status"] for c in sb.calls(token, "sendMessage")] == [429, 200]


@pytest.mark.parametrize("status", [500, 502])
def test_injected_server_errors_surface_as_network_errors_once(sb, token, user, status):
    sb.fault(token, "sendMessage", status=status, times=1)

    async def send_twice():
        async with ptb_application(sb, token) as application:
            with pytest.raises(NetworkError):
                await application.bot.send_message(user, "first")
            return (await application.bot.send_message(user, "second")).text
    assert asyncio.run(send_twice()) == "second"


def test_faults_fail_the_next_n_calls_of_their_method_until_cleared(sb, api, token, user):
    sb.fault(token, "sendChatAction", status=503, times=2)
    sb.fault(token, "*", status=500, times=1)
    assert sb.fault(token, "sendChatAction", times=0)["pending"] == 0
    statuses = [api("sendChatAction", chat_id=user, action="typing")[0] for _ in range(2)]
    assert statuses == [500, 200], "the cleared 503s are gone; the any-method fault fires once"


def test_disconnect_fault_drops_the_connection_without_an_answer(sb, api, token, user):
    sb.fault(token, "sendMessage", kind="disconnect", times=2)

    async def send():
        async with ptb_application(sb, token) as application:
            with pytest.raises(NetworkError):
                await application.bot.send_message(user, "lost")
    asyncio.run(send())
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        api("sendMessage", chat_id=user, text="lost too")
    api.close()
    assert api.ok("sendMessage", chat_id=user, text="through")["text"] == "through"
    assert [c["status"] for c in sb.calls(token, "sendMessage")] == [0, 0, 200]


@pytest.mark.parametrize("fault, expected", [
    ({"status": 502}, (502, "Bad Gateway: injected fault", None)),
    ({"status": 429, "retry_after": 3}, (429, "Too Many Requests: retry after 3", {"retry_after": 3})),
], ids=["502", "429"])
def test_a_fault_window_fails_every_call_of_its_method_until_it_closes(sb, api, token, user,
                                                                      fault, expected):
    window_s = 0.4
    opened = sb.fault(token, "sendChatAction", for_s=window_s, **fault)
    opened_at = time.monotonic()
    assert opened["method"] == "sendChatAction" and 0 < opened["window_s"] <= window_s
    statuses = []

    def answered_normally():
        status, body = api("sendChatAction", chat_id=user, action="typing")
        statuses.append(status)
        if status != 200:
            assert (status, body["description"], body.get("parameters")) == expected
        return status == 200
    wait_until(answered_normally, what="the window's end")
    assert time.monotonic() - opened_at >= window_s * 0.9
    assert len(statuses) >= 3 and set(statuses[:-1]) == {expected[0]}, \
        "every call in the window failed, not only the next one"
    assert api("sendMessage", chat_id=user, text="other methods pass")[0] == 200
    assert sb.fault(token, "sendChatAction", for_s=1, **fault)["window_s"] > 0


def test_a_window_of_any_method_ends_the_long_poll_in_progress_with_its_fault(sb, token):
    poller = BotApi(sb, token)
    try:
        poll = in_thread(poller, "getUpdates", {"timeout": 30})
        poll_in_flight(sb, token)
        started = time.monotonic()
        sb.fault(token, "*", status=502, for_s=60)
        status, body = poll()
        assert (status, body["description"]) == (502, "Bad Gateway: injected fault")
        assert time.monotonic() - started < DEADLINE_S / 2, "answered at the window's opening"
        assert poller("getMe")[0] == 502, "a new call in the window fails too"
        sb.fault(token, "*", times=0)
        assert poller("getMe")[0] == 200
    finally:
        poller.close()


def test_a_disconnect_window_drops_the_long_poll_in_progress(sb, token):
    poller = BotApi(sb, token)
    try:
        poll = in_thread(lambda: pytest.raises((http.client.HTTPException, ConnectionError),
                                               poller, "getUpdates", {"timeout": 30}))
        poll_in_flight(sb, token)
        sb.fault(token, "getUpdates", kind="disconnect", for_s=60)
        poll()
        assert sb.calls(token, "getUpdates")[-1]["status"] == 0
    finally:
        poller.close()


def test_a_slow_fault_answers_normally_after_its_delay(sb, api, token, user):
    sb.fault(token, "sendMessage", kind="slow", delay=0.3)
    started = time.monotonic()
    assert api.ok("sendMessage", chat_id=user, text="late")["text"] == "late"
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    api.ok("sendMessage", chat_id=user, text="on time")
    assert time.monotonic() - started < 0.3, "times defaults to 1"
    assert [(c["status"], c.get("fault", False)) for c in sb.calls(token, "sendMessage")] == [
        (200, True), (200, False)]


def test_a_slow_window_leaves_a_long_poll_in_progress_to_its_update(sb, api, token):
    poll = in_thread(api.ok, "getUpdates", {"timeout": 30})
    poll_in_flight(sb, token)
    sb.fault(token, "*", kind="slow", delay=0.2, for_s=60)
    update_id = sb.send(token, 17, "still delivered")["update_id"]
    assert [u["update_id"] for u in poll()] == [update_id]
    started = time.monotonic()
    assert api.ok("getMe")["id"] == int(token.partition(":")[0])
    assert time.monotonic() - started >= 0.2, "a new call in the window is slowed"


def test_clearing_a_method_clears_its_window_and_star_clears_everything(sb, api, token, user):
    sb.fault(token, "sendChatAction", status=503, for_s=60)
    sb.fault(token, "sendMessage", status=500, times=5)
    sb.fault(token, "getMe", kind="disconnect", for_s=60)
    assert sb.fault(token, "sendChatAction", times=0) == {
        "ok": True, "method": "sendChatAction", "pending": 0, "window_s": 0.0}
    assert api("sendChatAction", chat_id=user, action="typing")[0] == 200
    assert api("sendMessage", chat_id=user, text="x")[0] == 500, "other methods keep theirs"
    sb.fault(token, "*", times=0)
    assert api("sendMessage", chat_id=user, text="x")[0] == 200
    assert api("getMe")[0] == 200


@pytest.mark.parametrize("body, says", [
    ({"times": 2, "for_s": 1}, "not both"),
    ({"for_s": 0}, "for_s must be more than 0"),
    ({"for_s": 3601}, "at most 3600"),
    ({"times": 10_001}, "times must be"),
    ({"kind": "slow"}, "needs a delay"),
    ({"kind": "slow", "delay": 1, "status": 502}, "takes no status"),
    ({"kind": "disconnect", "retry_after": 2}, "takes no status or retry_after"),
    ({"kind": "flaky"}, "kind must be one of error, disconnect, slow"),
    ({"status": 302}, "status must be 400-599"),
    ({"status": 429, "retry_after": 0}, "retry_after must be 1-3600"),
    ({"delay": 301}, "delay must be 0-300"),
    ({"for_s": "soon"}, "field 'for_s' must be float"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_fault_requests_are_refused_with_a_clear_400(sb, token, body, says):
    with pytest.raises(SandboxError) as refused:
        sb._post("fault", {"token": token, "method": "sendMessage", **body})
    assert refused.value.status == 400 and says in refused.value.description
    queued = sb.fault(token, "sendMessage", times=1)
    assert (queued["pending"], queued["window_s"]) == (1, 0.0), "the refused fault left nothing"


# -- processes, CLI and terminal chat --------------------------------------------------------

def test_sandbox_process_prints_its_url_and_exits_0_on_sigterm(token):
    with SandboxProcess() as process:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", process.url)
        assert process.health()["ok"] is True
        sent = process.send(token, 1, "hi")
        assert sent["update_id"] == 1
    assert process.process.returncode == 0


def test_sandbox_process_starts_from_any_working_directory(tmp_path, monkeypatch, token):
    monkeypatch.chdir(tmp_path)
    with SandboxProcess() as process:
        assert process.send(token, 1, "hi")["update_id"] == 1
    assert process.process.returncode == 0


@pytest.mark.parametrize("launch", [[str(REPO / "telegram_sandbox.py")], ["-m", "telegram_sandbox"]],
                         ids=["launcher", "module"])
def test_command_line_prints_the_banner_and_exits_0_on_sigterm(launch):
    child = subprocess.Popen([sys.executable, *launch, "--port", "0"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = child.stdout.readline()
        url = re.search(r"^Telegram sandbox listening on (http://\S+) \(Bot API root: \1/bot\)$",
                        first_line.rstrip("\n"))
        assert url, first_line
        assert SandboxClient(url.group(1)).health()["ok"] is True
        child.send_signal(signal.SIGTERM)
        child.communicate(timeout=DEADLINE_S)
    finally:
        child.kill()
    assert child.returncode == 0


def test_the_chat_loads_none_of_the_server_the_bot_api_or_the_parsers():
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, telegram_sandbox; telegram_sandbox.chat; "
         "print(' '.join(sorted(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE_S)
    loaded = set(probe.stdout.split())
    assert "telegram_sandbox.terminal_chat" in loaded, probe.stderr
    heavy = {f"telegram_sandbox.{name}" for name in (
        "http_server", "core", "bot_api", "state", "spec", "text_formatting", "media", "runners")}
    assert loaded & (heavy | {"asyncio"}) == set()


def test_cli_exits_0_on_sigint_and_never_logs_a_token():
    secret = "VerySecretPart-123"
    command = [sys.executable, str(REPO / "telegram_sandbox.py"), "--port", "0",
               "--log-level", "DEBUG"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = child.stdout.readline()
        url = re.search(r"listening on (http://\S+) \(Bot API root: \1/bot\)", first_line)
        assert url, first_line
        client = SandboxClient(url.group(1))
        client.send(f"31337:{secret}", 5, "hi")
        with pytest.raises(SandboxError):
            client.send(f"31337{secret}", 5, "no colon")
        BotApi(client, f"31337:{secret}")("sendMessage", chat_id=404, text="x")
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=DEADLINE_S)
    finally:
        child.kill()
    assert child.returncode == 0
    assert "31337" in stderr and secret not in stderr


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "port must be 0-65535"),
    (["--host", "example.org"], "--host must be an IP address"),
    (["chat", "--url", "http://127.0.0.1:1", "--token", "bad"], "--token must look like"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message):
    child = subprocess.run([sys.executable, str(REPO / "telegram_sandbox.py"), *argv],
                           capture_output=True, text=True, timeout=DEADLINE_S)
    assert child.returncode == 2 and message in child.stderr


def test_terminal_chat_shows_replies_numbered_buttons_and_presses_them(sb, ptb_bot):
    stdin = io.StringIO("hello\n/start\n#2\n#9\n/quit\nnever sent\n")
    stdout = io.StringIO()
    assert chat(sb.url, ptb_bot, user_id=201, stdin=stdin, stdout=stdout) == 0
    transcript = stdout.getvalue()
    assert "bot: echo: hello\n" in transcript
    assert "  [1] Alice  [2] Bob  [3] Next »\n" in transcript
    assert re.search(r"bot \(edited \d+\): You chose bob\n", transcript)
    assert "(no button 9: no message has buttons)" in transcript
    texts = [e["text"] for e in sb.messages(ptb_bot, 201)]
    assert "echo: hello" in texts and "echo: never sent" not in texts, "input after /quit"


def test_chat_command_line_works_with_piped_input(sb, ptb_bot):
    child = subprocess.run(
        [sys.executable, str(REPO / "telegram_sandbox.py"), "chat", "--url", sb.url, "--token",
         ptb_bot, "--user-id", "202"],
        input="/start\n#1\n", capture_output=True, text=True, timeout=30)
    assert child.returncode == 0, child.stderr
    assert "[1] Alice" in child.stdout
    assert re.search(r"bot \(edited \d+\): You chose alice", child.stdout)


def test_chat_reports_an_unreachable_sandbox_with_status_1(token):
    stdout = io.StringIO()
    assert chat("http://127.0.0.1:9", token, stdin=io.StringIO("hi\n"), stdout=stdout) == 1


def test_chat_refuses_a_line_over_telegrams_limit_with_a_note_and_goes_on(sb, ptb_bot):
    stdin = io.StringIO("x" * 5000 + "\nhello\n")
    stdout = io.StringIO()
    assert chat(sb.url, ptb_bot, user_id=203, stdin=stdin, stdout=stdout) == 0
    transcript = stdout.getvalue()
    assert "(not sent: that message is 5000 characters; Telegram's limit is 4096)\n" in transcript
    assert "bot: echo: hello\n" in transcript


def test_chat_on_a_terminal_edits_the_line_and_recalls_history(sb, ptb_bot):
    main_fd, terminal_fd = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "INPUTRC": os.devnull}
    child = subprocess.Popen([sys.executable, str(REPO / "telegram_sandbox.py"), "chat", "--url",
                              sb.url, "--token", ptb_bot, "--user-id", "204"],
                             stdin=terminal_fd, stdout=terminal_fd, stderr=terminal_fd, env=env)
    os.close(terminal_fd)
    screen = bytearray()
    reader = threading.Thread(target=lambda: _read_terminal(main_fd, screen), daemon=True)
    reader.start()

    def echoes() -> int:
        return sum(e["text"] == "echo: hello" for e in sb.messages(ptb_bot, 204))
    try:
        wait_until(lambda: b"Chatting with" in screen, what="the chat's greeting")
        os.write(main_fd, b"helo\x02l\r")  # Ctrl-B: back one character, then the missing "l"
        wait_until(lambda: echoes() == 1, what="the edited line's echo")
        os.write(main_fd, b"\x10\r")  # Ctrl-P: the previous line again
        wait_until(lambda: echoes() == 2, what="the recalled line's echo")
        os.write(main_fd, b"/quit\r")
        assert child.wait(DEADLINE_S) == 0
    finally:
        child.kill()
        reader.join(DEADLINE_S)
        os.close(main_fd)


def _read_terminal(fd: int, into: bytearray) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            return
        if not data:
            return
        into.extend(data)


def test_chat_with_piped_input_does_not_load_readline(sb, ptb_bot):
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from telegram_sandbox import chat; "
         f"status = chat({sb.url!r}, {ptb_bot!r}, user_id=205); "
         "print('readline loaded:', 'readline' in sys.modules, 'status:', status)"],
        cwd=REPO, input="hello\n", capture_output=True, text=True, timeout=30)
    assert "bot: echo: hello\n" in probe.stdout, probe.stderr
    assert probe.stdout.endswith("readline loaded: False status: 0\n")


def test_chat_notes_an_unanswered_input_and_why_and_exits_1(sb, token):
    stdout = io.StringIO()
    status = chat(sb.url, token, user_id=206, stdin=io.StringIO("hi\n"), stdout=stdout,
                  reply_timeout=0.3,
                  describe_silence=lambda: "bot alpha is STOPPED (stopped by an operator)")
    username = telegram_sandbox.bot_username(int(token.partition(":")[0]))
    assert status == 1
    assert (f"(no answer from @{username} within 0.3 s; nobody has polled this bot's updates "
            "yet; bot alpha is STOPPED (stopped by an operator))\n") in stdout.getvalue()


def test_chat_silence_note_says_when_a_stopped_bot_last_polled(sb, api, token):
    api.ok("getUpdates")
    stdout = io.StringIO()
    assert chat(sb.url, token, user_id=207, stdin=io.StringIO("hi\n"), stdout=stdout,
                reply_timeout=1.2, describe_silence=lambda: None) == 1
    assert re.search(r"\(no answer from @\S+ within 1\.2 s; nobody is polling this bot's "
                     r"updates, the last poll ended \d+ s ago\)\n", stdout.getvalue())


def test_chat_silence_note_says_a_polling_bot_sent_nothing_back(sb, api, token):
    def poll_twice() -> list:
        first = api.ok("getUpdates", timeout=5)
        return first + api.ok("getUpdates", offset=first[-1]["update_id"] + 1, timeout=5)
    polls = in_thread(poll_twice)
    poll_in_flight(sb, token)
    stdout = io.StringIO()
    assert chat(sb.url, token, user_id=208, stdin=io.StringIO("hi\n"), stdout=stdout,
                reply_timeout=0.3) == 1
    assert "within 0.3 s; the bot is polling its updates but sent nothing back)\n" in \
        stdout.getvalue()
    sb.send(token, 208, "ends the second poll")
    assert len(polls()) == 2


def test_chat_counts_a_press_answered_with_a_notice_only_as_answered(sb, api, token):
    def bot() -> None:
        hello = api.ok("getUpdates", timeout=5)[-1]
        api.ok("sendMessage", chat_id=209, text="menu", reply_markup={
            "inline_keyboard": [[{"text": "Save", "callback_data": "save"}]]})
        press = api.ok("getUpdates", offset=hello["update_id"] + 1, timeout=5)[-1]
        api.ok("answerCallbackQuery", callback_query_id=press["callback_query"]["id"],
               text="Saved.")
    answered = in_thread(bot)
    stdout = io.StringIO()
    assert chat(sb.url, token, user_id=209, stdin=io.StringIO("hi\n#1\n"), stdout=stdout,
                reply_timeout=2) == 0, stdout.getvalue()
    answered()
    assert "bot: menu\n  [1] Save\nbot (button answer): Saved.\n" in stdout.getvalue()
