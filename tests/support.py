"""Helpers for end-to-end tests: a DIMS process under test, and a Telegram user in the sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

# Token-shaped, fake: 7 digits, so no scanner mistakes it for a real token.
TOKENS = {
    "alpha": "7000001:AAFakeTokenForTestsOnly_alpha00000000",
    "beta": "7000002:AAFakeTokenForTestsOnly_beta000000000",
}
ADMIN = 4242
USER = 1001


def write_config(path: Path, bots: dict[str, dict] | None = None, extra: str = "") -> Path:
    """A config file with bots given as {name: {key: value}} (tokens come from *_TOKEN vars)."""
    bots = bots if bots is not None else {"alpha": {"display_name": "Alpha", "admins": [ADMIN]}}
    lines = [extra]
    for name, values in bots.items():
        lines += ["[[bots]]", f'name = "{name}"', f'token_env = "{name.upper()}_TOKEN"']
        for key, value in values.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    path.write_text("\n".join(lines) + "\n")
    return path


def dims_env(database_url: str, api_url: str, data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIMS_", "DATABASE_URL", "BOT_TOKEN"))}
    env.update(DATABASE_URL=database_url, TELEGRAM_API_URL=api_url, DIMS_DATA_DIR=str(data_dir),
               PYTHONUNBUFFERED="1", **{f"{n.upper()}_TOKEN": t for n, t in TOKENS.items()})
    return env


class DimsProcess:
    """`python main.py ARGS` (or another installation's main.py) as a real process, its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, program: Path = ROOT / "main.py",
                 cwd: Path | None = None):
        self.args, self.env, self.log_path = args, env, log_path
        self.program, self.cwd = program, cwd or log_path.parent
        self.process: subprocess.Popen | None = None

    def start(self) -> "DimsProcess":
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, str(self.program), *self.args], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def __enter__(self) -> "DimsProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        """A graceful stop (so Telegram's offset is confirmed for the next test), then SIGKILL."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


class Chat:
    """One Telegram user talking to one bot through the sandbox."""

    def __init__(self, sandbox, token: str, user_id: int = USER):
        self.sandbox, self.token, self.user_id = sandbox, token, user_id
        self.seq = 0

    def send(self, text: str) -> dict:
        return self.sandbox.send(self.token, self.user_id, text, first_name=f"User{self.user_id}")

    def say(self, text: str, timeout: float = 20) -> dict:
        """Send text; the bot's first message or edit in this chat after it."""
        self.seq = self.send(text)["seq"]
        return self.next(timeout)

    def next(self, timeout: float = 20) -> dict:
        event = self.sandbox.wait_for_reply(self.token, self.user_id, after_seq=self.seq, timeout=timeout)
        self.seq = event["seq"]
        return event

    def press(self, event: dict, label: str, timeout: float = 20) -> dict:
        """Press the button whose text contains label in a bot message; the bot's next event."""
        data = button_data(event, label)
        self.seq = self.sandbox.press(self.token, self.user_id, event["message_id"], data)["seq"]
        return self.next(timeout)

    def wait_until_answering(self, timeout: float = 60) -> dict:
        return self.say("/start", timeout)


def buttons(event: dict) -> list[dict]:
    markup = event.get("reply_markup") or {}
    return [b for row in markup.get("inline_keyboard", []) for b in row]


def button_data(event: dict, label: str) -> str:
    for button in buttons(event):
        if label in button["text"]:
            return button["callback_data"]
    raise AssertionError(f"no button with {label!r} in {[b['text'] for b in buttons(event)]}")


def copy_installation(dest: Path) -> Path:
    """A fresh copy of DIMS's tracked files at dest (no virtual environment, no data), as an
    operator's installation elsewhere; returns dest."""
    import shutil
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source, target = ROOT / name, dest / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest
