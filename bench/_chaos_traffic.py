"""The chaos bench's simulated users and what they got back: numbered messages sent at a steady
rate, the bots' replies read per chat, and the ledger that matches one to the other.

Each message is `/find chaos-u{USER}-m{N}`: the roster holds nothing that matches, so the bot
answers `Nothing matched “chaos-u3-m17”. ...` after a database read (a unique text, so the
roster cache never answers it) - the reply names the message it answers. `Users` sends them
over the sandbox's user side (`/sandbox/send`), user after user, each user's messages going to
the bots in turn; `ReplyReaders` long-polls `/sandbox/messages` of every (bot, user) chat in one
thread per chat; the `Ledger` keeps, per message, when it was sent and when each reply came,
and calls its listeners on every first reply (the fault tracker measures recovery with them).

Used by `_chaos_run.py`. Imports the sandbox's client only; talks only to 127.0.0.1.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Callable, NamedTuple

from telegram_sandbox import SandboxClient, SandboxError

REPLY = re.compile(r"^Nothing matched “(chaos-u\d+-m\d+)”")
APOLOGY = "Sorry, I could not handle that message"
READ_WAIT_S = 2.0           # one /sandbox/messages long poll
SEND_RETRY_S = 0.2          # a /sandbox/send the sandbox did not take is tried again after this
USER_BASE = 60_000          # user ids: USER_BASE + 1 ...


def message_text(user: int, number: int) -> str:
    return f"/find chaos-u{user}-m{number}"


class Sent(NamedTuple):
    bot: str
    user: int
    number: int
    at: float                # time.monotonic() when the sandbox took it


class Ledger:
    """Every message sent and every reply seen; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self.sent: dict[str, Sent] = {}               # "chaos-u3-m17" -> Sent
        self.replies: dict[str, list[float]] = {}     # the same key -> when each reply came
        self.apologies: list[tuple[str, int, float]] = []   # (bot, user, when): "could not handle"
        self.strays: list[tuple[str, int, str]] = []  # replies that match no message sent
        self.listeners: list[Callable[[str, Sent, float], None]] = []   # on a message's first reply
        self._answered = threading.Condition(self._lock)

    def record_sent(self, key: str, sent: Sent) -> None:
        with self._lock:
            self.sent[key] = sent

    def forget(self, key: str) -> None:
        """A message the sandbox did not take after all."""
        with self._lock:
            self.sent.pop(key, None)

    def record_reply(self, bot: str, user: int, text: str) -> None:
        now = self.clock()
        match = REPLY.match(text or "")
        with self._lock:
            if match is None:
                if (text or "").startswith(APOLOGY):
                    self.apologies.append((bot, user, now))
                else:
                    self.strays.append((bot, user, (text or "")[:80]))
                return
            key = match.group(1)
            sent = self.sent.get(key)
            if sent is None or (sent.bot, sent.user) != (bot, user):
                self.strays.append((bot, user, (text or "")[:80]))
                return
            times = self.replies.setdefault(key, [])
            times.append(now)
            first = len(times) == 1
            self._answered.notify_all()
        if first:
            for listener in self.listeners:
                listener(key, sent, now)

    def unanswered(self) -> list[str]:
        with self._lock:
            return [key for key in self.sent if key not in self.replies]

    def wait_all_answered(self, timeout: float) -> bool:
        """Until every message sent has a reply, or the deadline; whether they all have."""
        deadline = self.clock() + timeout
        with self._lock:
            while any(key not in self.replies for key in self.sent):
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._answered.wait(min(left, 1.0))
            return True

    def duplicates(self) -> dict[str, list[float]]:
        """Messages answered more than once: key -> the times of their replies."""
        with self._lock:
            return {key: list(times) for key, times in self.replies.items() if len(times) > 1}

    def counts(self) -> tuple[int, int]:
        """(sent, answered)."""
        with self._lock:
            return len(self.sent), len(self.replies)


class Users:
    """`users` simulated users sending `rate` messages/s in all, in one thread: message i is
    user i mod users's, and each user's messages go to the bots in turn."""

    def __init__(self, sandbox: SandboxClient, tokens: dict[str, str], users: int, rate: float,
                 ledger: Ledger):
        self.sandbox, self.tokens, self.ledger = sandbox, tokens, ledger
        self.bots = list(tokens)
        self.user_ids = [USER_BASE + u for u in range(1, users + 1)]
        self.rate = rate
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-users", daemon=True)

    def chats(self) -> list[tuple[str, int]]:
        """Every (bot, user) chat the users write in."""
        return [(bot, user) for bot in self.bots for user in self.user_ids]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        started = time.monotonic()
        counts = dict.fromkeys(self.user_ids, 0)
        i = 0
        while not self._stop.is_set():
            user = self.user_ids[i % len(self.user_ids)]
            number = counts[user] = counts[user] + 1
            bot = self.bots[(self.user_ids.index(user) + number) % len(self.bots)]
            self._send(bot, user, number)
            i += 1
            self._stop.wait(max(0.0, started + i / self.rate - time.monotonic()))   # the pace

    def _send(self, bot: str, user: int, number: int) -> None:
        """Send one message (recorded first: its reply may come before send() returns)."""
        text = message_text(user - USER_BASE, number)
        key = text.split()[1]
        while not self._stop.is_set():
            self.ledger.record_sent(key, Sent(bot, user, number, self.ledger.clock()))
            try:
                self.sandbox.send(self.tokens[bot], user, text, first_name=f"Chaos{user - USER_BASE}")
                return
            except SandboxError as exc:   # the sandbox is not faulted on its user side: a real problem
                self.ledger.forget(key)
                self.errors.append(f"{key}: {exc}")
                self._stop.wait(SEND_RETRY_S)


class ReplyReaders:
    """One thread per chat reading what the bot sends there into the ledger."""

    def __init__(self, sandbox: SandboxClient, tokens: dict[str, str], chats: list[tuple[str, int]],
                 ledger: Ledger):
        self.sandbox, self.tokens, self.ledger = sandbox, tokens, ledger
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read, args=chat, name=f"chaos-read-{chat[0]}-{chat[1]}",
                                          daemon=True) for chat in chats]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(READ_WAIT_S + 10)

    def _read(self, bot: str, user: int) -> None:
        seq = 0
        while not self._stop.is_set():
            try:
                events = self.sandbox.messages(self.tokens[bot], user, after_seq=seq, wait=READ_WAIT_S)
            except SandboxError as exc:
                self.errors.append(f"{bot}/{user}: {exc}")
                self._stop.wait(SEND_RETRY_S)
                continue
            for event in events:
                seq = max(seq, event["seq"])
                if not event.get("edited") and not event.get("deleted"):
                    self.ledger.record_reply(bot, user, event.get("text") or "")
