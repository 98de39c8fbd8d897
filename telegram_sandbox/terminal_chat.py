"""The terminal chat: talk to a bot in a sandbox as a Telegram user, from a terminal.

chat() prints the bot's messages and edits as they arrive, numbers inline buttons and presses
one on "#N"; the operator CLI's `chat` command and `python -m telegram_sandbox chat` call it.

Imports client and constants only: an operator's `chat` loads none of the server, the Bot API
or the parsers.
"""

import re
import sys
import threading

from .client import SandboxClient, SandboxError
from .constants import MAX_TEXT_CHARS, TOKEN_RE, bot_id_of, bot_username


CHAT_HELP = ("Type a message and press Enter. #N presses button N of the latest message with "
             "buttons. /quit or end of input leaves.")


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
         first_name: str = "You", reply_timeout: float = 5.0) -> int:
    """A terminal chat with a bot as Telegram user user_id; returns an exit status.

    Bot messages and edits are printed as they arrive, inline buttons numbered
    ("[1] Alice  [2] Bob"); "#2" presses button 2 of the latest message with buttons.
    After each input the chat waits up to reply_timeout s for the bot's answer, so piped input
    gives a readable transcript. On a terminal, lines are edited with readline (arrows,
    Ctrl-A/E, ...) and Up recalls earlier ones. A line longer than Telegram allows is not sent (a note says
    why) and the chat goes on. /quit or end of input ends it (status 0); 1 if the sandbox
    cannot be reached, 2 if the token is not of Telegram's shape.
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
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(client, token, user_id, view, stop),
                                daemon=True)
    follower.start()
    view.note(f"Chatting with @{bot_username(int(bot_id_of(token)))} as user {user_id}. "
              f"{CHAT_HELP}")
    status = 0
    try:
        for line in _lines(stdin):
            text = line.strip()
            if text == "/quit":
                break
            if text:
                _chat_input(client, view, token, user_id, first_name, text, reply_timeout)
    except SandboxError as err:
        print(f"chat: {err.description}", file=sys.stderr)
        status = 1
    finally:
        stop.set()
        follower.join(reply_timeout + 2)
    return status


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


def _chat_input(client: SandboxClient, view: _ChatView, token: str, user_id: int,
                first_name: str, text: str, reply_timeout: float) -> None:
    press = re.fullmatch(r"#(\d+)", text)
    if press is None:
        if len(text) > MAX_TEXT_CHARS:
            view.note(f"(not sent: that message is {len(text)} characters; Telegram's limit is "
                      f"{MAX_TEXT_CHARS})")
            return
        answer = client.send(token, user_id, text, first_name=first_name)
        view.wait_past(answer["seq"], reply_timeout)
        return
    keyboard = view.latest_keyboard()
    number = int(press.group(1))
    if keyboard is None:
        view.note(f"(no button {number}: no message has buttons)")
        return
    if not 1 <= number <= len(keyboard[1]):
        view.note(f"(no button {number}: the latest keyboard has {len(keyboard[1])})")
        return
    message_id, buttons = keyboard
    button = buttons[number - 1]
    if "callback_data" not in button:
        view.note(f"(button {number} opens {button.get('url', 'something this chat cannot show')})")
        return
    answer = client.press(token, user_id, message_id, button["callback_data"])
    view.wait_past(answer["seq"], reply_timeout)


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
