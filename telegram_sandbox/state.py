"""What the sandbox knows about one bot (BotState) and the failures injected into it (Fault).

A bot's updates and its long poll, its chats and messages, the outbox that /sandbox/messages
reads, its files, callback queries, commands, faults and call log. The Bot API methods and the
core change it, only on the server's event loop, so it needs no locks.

Faults come two ways: queued for the next N calls of a method (or of any, "*"), or as a time
window in which every such call fails (`open_fault_window`). A window that can fail a
getUpdates ends the long poll in progress with its fault (`FaultStruck`), so a bot waiting in
a poll when Telegram "goes down" sees the outage at once, as a real client would.

Imports constants, errors and media; never the Bot API, the core or the server above it.
"""

import asyncio
import collections
import dataclasses
import itertools
import secrets
import time

from .constants import CONFLICT_POLLER, DEFAULT_EXCLUDED_UPDATES, bot_username
from .errors import ApiError, bad_request, status_phrase, too_many_requests
from .media import StoredFile, scaled_sides

CALL_LOG_LIMIT = 10_000  # calls kept per bot for /sandbox/calls


FAULT_KINDS = ("error", "disconnect", "slow")


@dataclasses.dataclass
class Fault:
    """An injected failure of one call: after `delay` s, an error answer (kind "error", with
    status), a dropped connection ("disconnect", status 0) or the normal answer ("slow")."""

    status: int
    retry_after: int | None = None
    description: str | None = None
    delay: float = 0.0
    kind: str = "error"

    @property
    def disconnects(self) -> bool:
        return self.kind == "disconnect" or self.status == 0

    @property
    def answers(self) -> bool:
        """A slow answer: once the delay is over, the call goes on as usual."""
        return self.kind == "slow"

    def error(self) -> ApiError:
        if self.status == 429:
            return too_many_requests(self.retry_after or 1)
        default = {400: "Bad Request: injected fault", 401: "Unauthorized",
                   403: "Forbidden: bot was blocked by the user", 404: "Not Found",
                   409: CONFLICT_POLLER}
        description = self.description or default.get(
            self.status, f"{status_phrase(self.status)}: injected fault")
        parameters = {"retry_after": self.retry_after} if self.retry_after else None
        return ApiError(self.status, description, parameters)


@dataclasses.dataclass
class FaultWindow:
    """Every call of a method (or of any, "*") fails with `fault` until `until` (monotonic)."""

    fault: Fault
    until: float

    def remaining(self, now: float) -> float:
        return max(self.until - now, 0.0)


class FaultStruck(Exception):
    """Raised in a long poll that a fault window ended: the core answers it with the fault."""

    def __init__(self, fault: Fault):
        super().__init__(fault.kind)
        self.fault = fault


class BotState:
    """Everything the sandbox knows about one bot; touched only on the server's loop."""

    def __init__(self, bot_id: int, secret: str):
        self.bot_id = bot_id
        self.secret = secret
        self.revoked = False
        self.user = {"id": bot_id, "is_bot": True, "first_name": f"Sandbox {bot_id}",
                     "username": bot_username(bot_id)}
        self.me = {**self.user, "can_join_groups": True, "can_read_all_group_messages": False,
                   "supports_inline_queries": False, "can_connect_to_business": False,
                   "has_main_web_app": False}
        self.updates: collections.deque[dict] = collections.deque()
        self.next_update_id = 1
        self.allowed_updates: frozenset[str] | None = None
        self.webhook: dict | None = None
        self.poller: asyncio.Future | None = None
        self.polled_at: float | None = None  # time.monotonic() when a getUpdates last ended
        self.commands: dict[str, list[dict]] = {}
        self.chats: dict[int, dict] = {}
        self.messages: dict[int, dict[int, dict]] = {}
        self.next_message_id: dict[int, int] = {}
        self.files: dict[str, StoredFile] = {}
        self.file_paths: dict[str, StoredFile] = {}
        self.photos: dict[str, list[dict]] = {}
        self.callback_answers: dict[str, dict | None] = {}  # query id -> the bot's answer
        self.seq = 0
        self.outbox: dict[int, list[dict]] = {}
        self.sent_seq: dict[tuple[int, int], int] = {}  # (chat, message id) -> seq at its send
        self.outbox_waiters: dict[int, set[asyncio.Future]] = {}
        self.faults: dict[str, collections.deque[Fault]] = {}
        self.fault_windows: dict[str, FaultWindow] = {}
        self.calls: collections.deque[dict] = collections.deque(maxlen=CALL_LOG_LIMIT)

    # -- updates ---------------------------------------------------------------------------

    def accepts(self, kind: str) -> bool:
        allowed = self.allowed_updates
        return kind not in DEFAULT_EXCLUDED_UPDATES if not allowed else kind in allowed

    def add_update(self, kind: str, payload: dict) -> int | None:
        """Queues an update unless allowed_updates filters it out; wakes the long poll."""
        if not self.accepts(kind):
            return None
        update_id = self.next_update_id
        self.next_update_id += 1
        self.updates.append({"update_id": update_id, kind: payload})
        self.end_poll("update")
        return update_id

    def confirm(self, offset: int) -> None:
        """offset > 0 confirms every update below it; offset < 0 keeps only the last -offset."""
        if offset > 0:
            while self.updates and self.updates[0]["update_id"] < offset:
                self.updates.popleft()
        elif offset < 0:
            while len(self.updates) > -offset:
                self.updates.popleft()

    def pending(self, limit: int) -> list[dict]:
        return list(itertools.islice(self.updates, limit))

    async def wait_for_update(self, timeout: float) -> str | Fault:
        """Why the long poll ended: "update", "timeout", "terminated", "webhook", "revoked", or
        the Fault of a window that opened meanwhile."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.poller = waiter
        timer = loop.call_later(timeout, _settle, waiter, "timeout")
        try:
            return await waiter
        finally:
            timer.cancel()
            if self.poller is waiter:
                self.poller = None

    def end_poll(self, reason: str | Fault) -> None:
        """Answers the long poll in progress, if any: see bot_api.POLL_ENDINGS for the reasons."""
        if self.poller is not None:
            _settle(self.poller, reason)
            self.poller = None

    # -- chats and messages ----------------------------------------------------------------

    def chat(self, chat_id) -> dict:
        """A chat the bot may write to: one whose user has written to the bot."""
        chat = self.chats.get(chat_id) if isinstance(chat_id, int) else None
        if chat is None:
            raise bad_request("chat not found")
        return chat

    def open_private_chat(self, user: dict) -> dict:
        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
        for key in ("last_name", "username"):
            if key in user:
                chat[key] = user[key]
        self.chats[user["id"]] = chat
        self.messages.setdefault(user["id"], {})
        return chat

    def new_message(self, chat: dict, sender: dict, **content) -> dict:
        chat_id = chat["id"]
        message_id = self.next_message_id.get(chat_id, 1)
        self.next_message_id[chat_id] = message_id + 1
        message = {"message_id": message_id, "from": sender, "chat": chat,
                   "date": int(time.time())}
        message.update({key: value for key, value in content.items() if value})
        self.messages[chat_id][message_id] = message
        self.sent_seq[chat_id, message_id] = self.seq  # publish() moves it to a bot's send
        return message

    def publish(self, chat_id: int, message: dict, edited: bool = False,
                deleted: bool = False) -> dict:
        """Records what the bot did in a chat for /sandbox/messages and wakes its waiters."""
        self.seq += 1
        event = {key: value for key, value in message.items() if key not in ("chat", "from")}
        event.update({"seq": self.seq, "chat_id": chat_id, "edited": edited, "deleted": deleted,
                      "text": message.get("text"), "reply_markup": message.get("reply_markup")})
        self.outbox.setdefault(chat_id, []).append(event)
        if not edited and not deleted:
            self.sent_seq[chat_id, message["message_id"]] = self.seq
        for waiter in self.outbox_waiters.pop(chat_id, ()):
            _settle(waiter, True)
        return event

    def outbox_after(self, chat_id: int, after: int, after_seq: int | None) -> list[dict]:
        """The chat's outbox events (sends, edits, deletions) that happened after message
        `after` was sent and after event `after_seq`, oldest first.

        So an edit of message `after`, or of an earlier message, made after `after` was sent
        counts. after <= 0 means from the start; a deleted message still counts from its send;
        an id the chat has not reached yet selects nothing until that message exists.
        """
        if after >= self.next_message_id.get(chat_id, 1):
            return []
        since = max(self.sent_seq.get((chat_id, after), 0), after_seq or 0)
        events = self.outbox.get(chat_id, [])
        start = len(events)
        while start > 0 and events[start - 1]["seq"] > since:
            start -= 1
        return events[start:]

    async def wait_for_outbox(self, chat_id: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.outbox_waiters.setdefault(chat_id, set()).add(waiter)
        timer = loop.call_later(timeout, _settle, waiter, False)
        try:
            await waiter
        finally:
            timer.cancel()
            self.outbox_waiters.get(chat_id, set()).discard(waiter)

    # -- files -----------------------------------------------------------------------------

    def store_file(self, data: bytes | None, extension: str) -> StoredFile:
        number = len(self.files)
        path = f"photos/file_{number}.{extension}" if data is not None else None
        stored = StoredFile(file_id="AgACAgIAAxk" + secrets.token_urlsafe(24),
                            file_unique_id="AQAD" + secrets.token_urlsafe(9), data=data,
                            path=path)
        self.files[stored.file_id] = stored
        if path is not None:
            self.file_paths[path] = stored
        return stored

    def photo_sizes(self, data: bytes | None, width: int, height: int) -> list[dict]:
        """PhotoSize objects for a new photo; every size serves the original bytes."""
        sizes = []
        for size_width, size_height in scaled_sides(width, height):
            stored = self.store_file(data, "jpg")
            size = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                    "width": size_width, "height": size_height}
            sizes.append(size)
        if data is not None:
            sizes[-1]["file_size"] = len(data)
        for size in sizes:
            self.photos[size["file_id"]] = sizes
        return sizes

    # -- faults ----------------------------------------------------------------------------

    def take_fault(self, method: str) -> Fault | None:
        """The fault this call of method meets, if any: a queued one first (the method's, then
        any method's), else an open window's (the same order). Closed windows are dropped."""
        for key in (method, "*"):
            faults = self.faults.get(key)
            if faults:
                return faults.popleft()
        now = time.monotonic()
        for key in (method, "*"):
            window = self.fault_windows.get(key)
            if window is None:
                continue
            if now < window.until:
                return window.fault
            del self.fault_windows[key]
        return None

    def open_fault_window(self, method: str, fault: Fault, seconds: float) -> FaultWindow:
        """Every call of method ("*": any) fails with fault for the next `seconds` (replacing a
        window already open for it). A long poll in progress that the window covers ends with
        the fault at once, unless the fault only slows answers (a poll is slow already)."""
        window = self.fault_windows[method] = FaultWindow(fault, time.monotonic() + seconds)
        if method in ("getUpdates", "*") and not fault.answers:
            self.end_poll(fault)
        return window

    def clear_faults(self, method: str) -> None:
        """Drop the queued faults and the window of method; "*" drops every fault of the bot."""
        if method == "*":
            self.faults.clear()
            self.fault_windows.clear()
            return
        self.faults.pop(method, None)
        self.fault_windows.pop(method, None)

    def fault_window_s(self, method: str) -> float:
        """Seconds left in method's open window (0: none)."""
        window = self.fault_windows.get(method)
        return 0.0 if window is None else window.remaining(time.monotonic())


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)
