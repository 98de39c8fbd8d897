"""The sandbox's core, independent of HTTP: the bots, the Bot API dispatch and the user side.

SandboxCore knows every bot by its token (the first secret seen for a bot id is its own),
dispatches a Bot API call (injected faults first, then the spec's parameter checks, then the
method; every call is logged for /sandbox/calls) and answers the user side: send, press,
messages, fault, calls, revoke and health. The HTTP server calls it with plain dicts; it runs
on the server's one event loop.

A fault (`/sandbox/fault`) is an error status (429 with retry_after), a dropped connection
("disconnect") or a slow answer ("slow": the delay, then the normal answer), for the next
`times` calls of a method or of any ("*"), or for every such call during the next `for_s`
seconds (a window, which also ends a getUpdates long poll waiting when it opens, unless it only
slows answers). `times: 0` clears a method's queued faults and window ("*": all of the bot's).

Imports constants, errors, media, spec, text_formatting, state and bot_api; never the server,
the client or the runners.
"""

import asyncio
import collections
import dataclasses
import itertools
import logging
import time

from .bot_api import BotApi, Described
from .constants import MAX_TEXT_CHARS, SERVED_METHODS, TOKEN_RE, bot_id_of
from .errors import ApiError
from .media import StoredFile, Upload
from .spec import Spec
from .state import FAULT_KINDS, BotState, Fault, FaultStruck
from .text_formatting import command_entities

LOG = logging.getLogger(__name__)

MESSAGES_WAIT_MAX_S = 60
MAX_FAULT_TIMES = 10_000
MAX_FAULT_DELAY_S = 300
MAX_FAULT_WINDOW_S = 3600
MAX_FAULT_RETRY_AFTER_S = 3600

_DISCONNECT = object()  # a method's "result" when a fault drops the connection


class UserError(Exception):
    """A refused /sandbox request (answered 400 with this description)."""


class SandboxCore:
    """Bots, users and routes, independent of HTTP; runs on one event loop."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.api = BotApi(spec)
        self.bots: dict[int, BotState] = {}
        self.users: dict[int, dict] = {}
        self.callback_ids = itertools.count(4_000_000_000_000_000_001)
        self._served = {name.lower(): name for name in SERVED_METHODS}

    def bot(self, token: str) -> BotState:
        """The bot a well-formed token names; the first secret seen for a bot id is its own."""
        match = TOKEN_RE.fullmatch(token)
        if match is None:
            raise ApiError(401, "Unauthorized")
        bot_id, secret = int(match.group(1)), match.group(2)
        bot = self.bots.get(bot_id)
        if bot is None:
            bot = self.bots[bot_id] = BotState(bot_id, secret)
            LOG.info("bot %s: first seen", bot_id)
        if bot.secret != secret or bot.revoked:
            raise ApiError(401, "Unauthorized")
        return bot

    # -- the Bot API -----------------------------------------------------------------------

    async def call(self, token: str, method_name: str, raw: dict) -> tuple[int, dict | None]:
        """(HTTP status, body) for one Bot API call; body None means drop the connection."""
        try:
            bot = self.bot(token)
        except ApiError as err:
            LOG.info("bot %s: %s refused: %s", bot_id_of(token), method_name, err.description)
            return err.code, err.body()
        method = self._served.get(method_name.lower())
        record = {"method": method or method_name, "params": _jsonable(raw), "status": None,
                  "time": time.time()}
        bot.calls.append(record)
        try:
            result = await self._run(bot, method, method_name, raw, record)
        except asyncio.CancelledError:  # the client went away (or the server is closing)
            record["status"] = 0
            raise
        except ApiError as err:
            record.update(status=err.code, description=err.description)
            LOG.debug("bot %s: %s -> %s %s", bot.bot_id, record["method"], err.code,
                      err.description)
            return err.code, err.body()
        if result is _DISCONNECT:
            record["status"] = 0
            return 0, None
        record["status"] = 200
        if isinstance(result, Described):
            return 200, {"ok": True, "result": result.result, "description": result.description}
        return 200, {"ok": True, "result": result}

    async def _run(self, bot: BotState, method: str | None, asked: str, raw: dict,
                   record: dict):
        if method is None:
            if self.spec.canonical(asked):
                raise ApiError(501, f"Not Implemented: the Telegram sandbox does not serve "
                                    f"{self.spec.canonical(asked)}")
            raise ApiError(404, "Not Found")
        fault = bot.take_fault(method)
        if fault is not None:
            result = await _inflict(fault, record)
            if not fault.answers:
                return result
        params = self.spec.parse_params(method, raw)
        record["params"] = _jsonable(params)
        try:
            return await self.api.handlers[method](bot, params)
        except FaultStruck as struck:   # a long poll that a fault window ended
            return await _inflict(struck.fault, record, wait=False)

    def file(self, token: str, path: str) -> StoredFile | None:
        try:
            bot = self.bot(token)
        except ApiError:
            return None
        return bot.file_paths.get(path)

    # -- the user side ---------------------------------------------------------------------

    def user_bot(self, body: dict) -> BotState:
        token = _field(body, "token", str)
        try:
            return self.bot(token)
        except ApiError:
            raise UserError("token is not a usable bot token (expected digits:secret, not "
                            "revoked)") from None

    def user(self, body: dict) -> dict:
        user_id = _field(body, "user_id", int)
        if user_id <= 0:
            raise UserError("user_id must be a positive integer")
        user = self.users.setdefault(user_id, {"id": user_id, "is_bot": False,
                                               "first_name": f"User {user_id}",
                                               "language_code": "en"})
        for key in ("first_name", "last_name", "username", "language_code"):
            if body.get(key):
                user[key] = str(body[key])
        return user

    def send(self, body: dict) -> dict:
        bot, user = self.user_bot(body), self.user(body)
        text = _field(body, "text", str)
        if not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise UserError(f"text must be 1-{MAX_TEXT_CHARS} characters")
        chat = bot.open_private_chat(user)
        text = text.strip()
        message = bot.new_message(chat, user, text=text, entities=command_entities(text))
        update_id = bot.add_update("message", message)
        return {"ok": True, "update_id": update_id, "message_id": message["message_id"],
                "seq": bot.seq}

    def press(self, body: dict) -> dict:
        bot, user = self.user_bot(body), self.user(body)
        message_id = _field(body, "message_id", int)
        data = _field(body, "data", str)
        chat = bot.chats.get(user["id"])
        if chat is None:
            raise UserError(f"user {user['id']} has never written to this bot")
        message = bot.messages[chat["id"]].get(message_id)
        if not body.get("forge"):
            _check_pressable(bot, message, message_id, data)
        query_id = str(next(self.callback_ids))
        shown = dict(message) if message else {"chat": chat, "message_id": message_id, "date": 0}
        query = {"id": query_id, "from": user, "message": shown, "data": data,
                 "chat_instance": str((bot.bot_id * 1_000_003 + chat["id"]) % 2**62)}
        bot.callback_answers[query_id] = None
        update_id = bot.add_update("callback_query", query)
        return {"ok": True, "update_id": update_id, "callback_query_id": query_id,
                "seq": bot.seq}

    async def messages(self, query: dict) -> dict:
        bot = self.user_bot(query)
        chat_id = _field(query, "chat_id", int)
        after = _field(query, "after", int, 0)
        after_seq = _field(query, "after_seq", int, None)
        deadline = time.monotonic() + min(_field(query, "wait", float, 0.0), MESSAGES_WAIT_MAX_S)
        events = bot.outbox_after(chat_id, after, after_seq)
        while not events and time.monotonic() < deadline:
            await bot.wait_for_outbox(chat_id, deadline - time.monotonic())
            events = bot.outbox_after(chat_id, after, after_seq)
        return {"ok": True, "messages": events, "last_seq": bot.seq}

    def fault(self, body: dict) -> dict:
        """Queue a fault for the next `times` calls of a method, or open a window of `for_s`
        seconds in which every call of it fails; `times: 0` clears (see the module's docstring)."""
        bot = self.user_bot(body)
        asked = _field(body, "method", str)
        method = "*" if asked == "*" else self._served.get(asked.lower())
        if method is None:
            raise UserError(f"method {asked!r} is not served (known: {', '.join(SERVED_METHODS)})")
        times = _field(body, "times", int, None)
        for_s = _field(body, "for_s", float, None)
        if times is not None and for_s is not None:
            raise UserError("give times (the next N calls fail) or for_s (every call fails for "
                            "that many seconds), not both")
        if times == 0:
            bot.clear_faults(method)
            LOG.info("bot %s: faults of %s cleared", bot.bot_id, method)
            return {"ok": True, "method": method, "pending": 0, "window_s": 0.0}
        fault = _fault_of(body)
        if for_s is not None:
            if not 0 < for_s <= MAX_FAULT_WINDOW_S:
                raise UserError(f"for_s must be more than 0 and at most {MAX_FAULT_WINDOW_S} s "
                                "(times: 0 clears)")
            bot.open_fault_window(method, fault, for_s)
            LOG.info("bot %s: every %s call for %g s: %s", bot.bot_id, method, for_s,
                     _fault_name(fault))
        else:
            times = 1 if times is None else times
            if not 0 < times <= MAX_FAULT_TIMES:
                raise UserError(f"times must be 0-{MAX_FAULT_TIMES}")
            bot.faults.setdefault(method, collections.deque()).extend(fault for _ in range(times))
            LOG.info("bot %s: next %d %s call(s): %s", bot.bot_id, times, method,
                     _fault_name(fault))
        return {"ok": True, "method": method, "pending": len(bot.faults.get(method, ())),
                "window_s": round(bot.fault_window_s(method), 3)}

    def calls(self, query: dict) -> dict:
        bot = self.user_bot(query)
        method = query.get("method")
        calls = [c for c in bot.calls if method is None or c["method"].lower() == method.lower()]
        return {"ok": True, "calls": calls}

    def revoke(self, body: dict) -> dict:
        bot = self.user_bot(body)
        bot.revoked = True
        bot.end_poll("revoked")
        LOG.info("bot %s: token revoked", bot.bot_id)
        return {"ok": True}

    def health(self, query: dict) -> dict:
        """Liveness, and how many long polls and message waits are in progress; with a token,
        also whether that bot is polling its updates (see polling_state)."""
        polls = sum(bot.poller is not None for bot in self.bots.values())
        waits = sum(len(w) for bot in self.bots.values() for w in bot.outbox_waiters.values())
        health = {"ok": True, "bots": len(self.bots), "spec_version": self.spec.version,
                  "waiting": {"getUpdates": polls, "messages": waits}}
        if query.get("token"):
            health["bot"] = polling_state(self.user_bot(query))
        return health


def polling_state(bot: BotState) -> dict:
    """Whether anyone takes the bot's updates: a getUpdates waiting now ("polling"), how long
    ago the last one ended (None if none ever did), a webhook set, updates not yet confirmed."""
    age = None if bot.polled_at is None else round(time.monotonic() - bot.polled_at, 1)
    return {"id": bot.bot_id, "username": bot.user["username"], "polling": bot.poller is not None,
            "last_poll_age_s": age, "webhook": bot.webhook is not None,
            "pending_updates": len(bot.updates)}


def _fault_of(body: dict) -> Fault:
    """The Fault a /sandbox/fault body describes, its fields checked together."""
    kind = _field(body, "kind", str, "error")
    if kind not in FAULT_KINDS:
        raise UserError(f"kind must be one of {', '.join(FAULT_KINDS)} (got {kind!r})")
    status = _field(body, "status", int, None)
    retry_after = _field(body, "retry_after", int, None)
    delay = _field(body, "delay", float, 0.0)
    if not 0 <= delay <= MAX_FAULT_DELAY_S:
        raise UserError(f"delay must be 0-{MAX_FAULT_DELAY_S} s")
    if kind != "error" and (status is not None or retry_after is not None):
        raise UserError(f"kind {kind!r} takes no status or retry_after: it "
                        f"{'drops the connection' if kind == 'disconnect' else 'answers normally'}")
    if kind == "slow":
        if delay <= 0:
            raise UserError("kind 'slow' needs a delay (seconds before the normal answer)")
        return Fault(status=200, delay=delay, kind="slow")
    if kind == "disconnect" or status == 0:
        return Fault(status=0, delay=delay, kind="disconnect")
    status = 500 if status is None else status
    if not 400 <= status <= 599:
        raise UserError("status must be 400-599, or 0 to drop the connection")
    if retry_after is not None and not 1 <= retry_after <= MAX_FAULT_RETRY_AFTER_S:
        raise UserError(f"retry_after must be 1-{MAX_FAULT_RETRY_AFTER_S} s")
    return Fault(status=status, retry_after=retry_after, delay=delay,
                 description=_field(body, "description", str, None))


def _fault_name(fault: Fault) -> str:
    """How the log names a fault: "fail with 502", "drop the connection", "answer after 2 s"."""
    if fault.answers:
        return f"answer after {fault.delay:g} s"
    what = "drop the connection" if fault.disconnects else f"fail with {fault.status}"
    return what + (f" after {fault.delay:g} s" if fault.delay else "")


async def _inflict(fault: Fault, record: dict, wait: bool = True):
    """Apply a fault to a call: its delay (unless `wait` is False), then drop the connection
    (_DISCONNECT) or raise its error; a slow answer's returns None and the call goes on."""
    record["fault"] = True
    if wait and fault.delay:
        await asyncio.sleep(fault.delay)
    if fault.answers:
        return None
    if fault.disconnects:
        return _DISCONNECT
    raise fault.error()


def _check_pressable(bot: BotState, message: dict | None, message_id: int, data: str) -> None:
    if message is None or message["from"]["id"] != bot.bot_id:
        raise UserError(f"message {message_id} is not a message of this bot in this chat")
    rows = (message.get("reply_markup") or {}).get("inline_keyboard", [])
    offered = [button.get("callback_data") for row in rows for button in row
               if "callback_data" in button]
    if data not in offered:
        raise UserError(f"message {message_id} has no button with callback_data {data!r} "
                        f"(offered: {offered}); pass \"forge\": true to send it anyway")


def _field(source: dict, name: str, kind: type, default=dataclasses.MISSING):
    """A typed field of a /sandbox request body or query string."""
    value = source.get(name)
    if value is None or value == "":
        if default is dataclasses.MISSING:
            raise UserError(f"missing field {name!r}")
        return default
    wrong = UserError(f"field {name!r} must be {kind.__name__}")
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise wrong
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise wrong from None


def _jsonable(params: dict) -> dict:
    """Parameters as recorded in /sandbox/calls: uploads become {"upload", "size"}."""
    return {key: {"upload": value.filename, "size": len(value.data)}
            if isinstance(value, Upload) else value for key, value in params.items()}
