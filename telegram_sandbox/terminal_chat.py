"""The terminal chat: talk to a bot in a sandbox as a Telegram user, from a terminal.

chat() prints the bot's messages and edits as they arrive, numbers inline buttons and presses
one on "#N", and says so when an input gets no answer (and why, as far as the sandbox can
tell); the operator CLI's `chat` command and `python -m telegram_sandbox chat` call it.

Imports client and constants only: an operator's `chat` loads none of the server, the Bot API
or the parsers.
"""

import re
import sys
import threading
from typing import Callable

from .client import SandboxClient, SandboxError
from .constants import MAX_TEXT_CHARS, TOKEN_RE, bot_id_of, bot_username


CHAT_HELP = ("Type a message and press Enter. #N presses button N of the latest message with "
             "buttons. /quit or end of input leaves.")
RECENT_POLL_S = 1.0  # a poll that ended this recently: the bot is between two polls


class _ChatView:
    """Prints bot messages as a transcript and remembers the latest inline keyboard."""

    def __init__(self, stdout):
        self.stdout = stdout
        self.lock = threading.Lock()
        self.keyboards: dict[int, tuple[int, list[dict]]] = {}
        self.seq = 0
        self.printed = threading.Condition(self.lock)

    def show(self, event: dict) -> None:
        with self.lock:
            self.stdout.write(self._render(event))
            self.stdout.flush()
            self.seq = max(self.seq, event["seq"])
            self.printed.notify_all()

    def _render(self, event: dict) -> str:
        number = event["message_id"]
        if event["deleted"]:
            self.keyboards.pop(number, None)
            return f"bot deleted message {number}\n"
        label = f"bot (edited {number})" if event["edited"] else "bot"
        lines = []
        if event.get("photo"):
            largest = event["photo"][-1]
            lines.append(f"{label}: [photo {largest['width']}x{largest['height']}] "
                         f"{event.get('caption') or ''}".rstrip())
        else:
            lines.append(f"{label}: {event.get('text') or ''}")
        buttons = [b for row in (event.get("reply_markup") or {}).get("inline_keyboard", [])
                   for b in row]
        if buttons:
            self.keyboards[number] = (event["seq"], buttons)
            lines.append("  " + "  ".join(f"[{i}] {b['text']}" for i, b in
                                          enumerate(buttons, 1)))
        else:
            self.keyboards.pop(number, None)
        return "\n".join(lines) + "\n"

    def latest_keyboard(self) -> tuple[int, list[dict]] | None:
        with self.lock:
            if not self.keyboards:
                return None
            number = max(self.keyboards, key=lambda n: self.keyboards[n][0])
            return number, self.keyboards[number][1]

    def wait_past(self, seq: int, timeout: float) -> bool:
        """Waits until an event after seq is printed (the bot's answer to our input)."""
        with self.printed:
            return self.printed.wait_for(lambda: self.seq > seq, timeout)

    def note(self, text: str) -> None:
        with self.lock:
            self.stdout.write(text + "\n")
            self.stdout.flush()


def chat(url: str, token: str, user_id: int = 1000, stdin=sys.stdin, stdout=sys.stdout,
         first_name: str = "You", reply_timeout: float = 5.0,
         describe_silence: Callable[[], str | None] | None = None) -> int:
    """A terminal chat with a bot as Telegram user user_id; returns an exit status.

    Bot messages and edits are printed as they arrive, inline buttons numbered
    ("[1] Alice  [2] Bob"); "#2" presses button 2 of the latest message with buttons (a press
    the bot answers with a notice only prints "bot (button answer): ..."). On a terminal, lines
    are edited with readline (arrows, Ctrl-A/E, ...) and Up recalls earlier ones. A line longer
    than Telegram allows is not sent: a note says why and the chat goes on.

    After each input the chat waits up to reply_timeout s for the bot's answer, so piped input
    gives a readable transcript. With none, it prints a note saying so and why, as far as the
    sandbox can tell: "(no answer from @sandbox_1_bot within 5 s; nobody is polling this bot's
    updates, the last poll ended 42 s ago)"; describe_silence(), when given, adds what the
    caller knows ("bot alpha is STOPPED ...") after a "; " (None adds nothing).

    /quit or end of input ends it. Exit status: 0 if every input was answered; 1 if one went
    unanswered or the sandbox cannot be reached; 2 if the token is not of Telegram's shape.
    """
    if not TOKEN_RE.fullmatch(token):
        print("chat: the token must look like a Telegram bot token (digits:secret)",
              file=sys.stderr)
        return 2
    client = SandboxClient(url)
    view = _ChatView(stdout)
    try:
        start = client.messages(token, user_id, after_seq=None)
    except SandboxError as err:
        print(f"chat: {err.description}", file=sys.stderr)
        return 1
    view.seq = max((e["seq"] for e in start), default=0)
    session = _Session(client, view, token, user_id, first_name, reply_timeout, describe_silence)
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(client, token, user_id, view, stop),
                                daemon=True)
    follower.start()
    view.note(f"Chatting with @{session.username} as user {user_id}. {CHAT_HELP}")
    unanswered = 0
    try:
        for line in _lines(stdin):
            text = line.strip()
            if text == "/quit":
                break
            if text and not session.handle(text):
                unanswered += 1
    except SandboxError as err:
        print(f"chat: {err.description}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        follower.join(reply_timeout + 2)
    return 1 if unanswered else 0


def _lines(stdin):
    """The lines typed or piped in. On a terminal, readline edits them and keeps a history;
    it is loaded only then (on a pipe it would be of no use, and may write escape codes)."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401 (loaded, it serves input())
        except ImportError:  # a Python built without it: plain lines
            pass
        else:
            while True:
                try:
                    yield input()
                except EOFError:
                    return
    yield from stdin


class _Session:
    """One user's inputs to one bot: sends them, presses buttons, notes what goes unanswered."""

    def __init__(self, client: SandboxClient, view: _ChatView, token: str, user_id: int,
                 first_name: str, reply_timeout: float,
                 describe_silence: Callable[[], str | None] | None):
        self.client, self.view, self.token, self.user_id = client, view, token, user_id
        self.first_name, self.reply_timeout = first_name, reply_timeout
        self.describe_silence = describe_silence
        self.username = bot_username(int(bot_id_of(token)))

    def handle(self, text: str) -> bool:
        """Acts on one input line; False if the bot left it unanswered."""
        press = re.fullmatch(r"#(\d+)", text)
        if press is not None:
            return self._press(int(press.group(1)))
        if len(text) > MAX_TEXT_CHARS:
            self.view.note(f"(not sent: that message is {len(text)} characters; Telegram's "
                           f"limit is {MAX_TEXT_CHARS})")
            return True
        sent = self.client.send(self.token, self.user_id, text, first_name=self.first_name)
        return self._answered(sent["seq"])

    def _press(self, number: int) -> bool:
        keyboard = self.view.latest_keyboard()
        if keyboard is None:
            self.view.note(f"(no button {number}: no message has buttons)")
            return True
        message_id, buttons = keyboard
        if not 1 <= number <= len(buttons):
            self.view.note(f"(no button {number}: the latest keyboard has {len(buttons)})")
            return True
        button = buttons[number - 1]
        if "callback_data" not in button:
            self.view.note(f"(button {number} opens "
                           f"{button.get('url', 'something this chat cannot show')})")
            return True
        pressed = self.client.press(self.token, self.user_id, message_id, button["callback_data"])
        return self._answered(pressed["seq"], pressed["callback_query_id"])

    def _answered(self, seq: int, callback_query_id: str | None = None) -> bool:
        """Waits for the bot's answer to the input that left the outbox at seq; notes silence."""
        if self.view.wait_past(seq, self.reply_timeout):
            return True
        if callback_query_id is not None and self._button_answer(callback_query_id):
            return True
        reasons = [f"no answer from @{self.username} within {self.reply_timeout:g} s",
                   _polling_reason(self.client.health(self.token)["bot"])]
        described = self.describe_silence() if self.describe_silence is not None else None
        if described:
            reasons.append(described)
        self.view.note(f"({'; '.join(reasons)})")
        return False

    def _button_answer(self, callback_query_id: str) -> bool:
        """Prints the bot's answer to a press that changed no message, if it gave one."""
        for call in self.client.calls(self.token, "answerCallbackQuery"):
            params = call["params"]
            if call["status"] == 200 and params.get("callback_query_id") == callback_query_id:
                self.view.note(f"bot (button answer): {params.get('text') or '(no text)'}")
                return True
        return False


def _polling_reason(bot: dict) -> str:
    """Why a bot may be silent, from the sandbox's /sandbox/health?token= "bot" object."""
    if bot["webhook"]:
        return "a webhook is set, and the sandbox never calls webhooks"
    age = bot["last_poll_age_s"]
    if bot["polling"] or (age is not None and age < RECENT_POLL_S):
        return "the bot is polling its updates but sent nothing back"
    if age is None:
        return "nobody has polled this bot's updates yet"
    return f"nobody is polling this bot's updates, the last poll ended {age:.0f} s ago"


def _follow(client: SandboxClient, token: str, user_id: int, view: _ChatView,
            stop: threading.Event) -> None:
    """Long-polls the chat's bot messages and prints them until stop is set."""
    while not stop.is_set():
        try:
            events = client.messages(token, user_id, after_seq=view.seq, wait=0.5)
        except SandboxError as err:
            view.note(f"(sandbox unreachable: {err.description})")
            return
        for event in events:
            view.show(event)
