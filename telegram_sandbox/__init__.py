"""Telegram sandbox: a local emulator of the Telegram Bot API, plus a user side.

DIMS runs offline with it: the demo, the tests and the fleet benchmarks point
python-telegram-bot at this server (TELEGRAM_API_URL = Sandbox.api_url) instead of
api.telegram.org, and act as Telegram users through the /sandbox/* routes.

- Bot API at /bot{token}/{method} (query string, form, JSON and multipart bodies, method names
  case-insensitive) and files at /file/bot{token}/{path}. Parameters are checked against an
  extract of the Bot API spec (bot_api_spec.json, made by tools/extract_bot_api_spec.py);
  errors carry Telegram's own status codes and descriptions.
- getUpdates as Telegram: updates stay until a later call's offset confirms them, long polls
  (capped at 50 s) answer as soon as an update arrives, allowed_updates is remembered, and a
  newer poller terminates the older one with 409 (the newer request wins, as on Telegram).
- The user side (/sandbox/send, press, messages, fault, calls, revoke, health) and its clients:
  SandboxClient (urllib, works across processes), Sandbox (server in a background thread),
  SandboxProcess (server in a child process), chat() (a terminal chat as a user).

One concept per module; imports flow one way, no cycles:
constants, errors, media -> spec, text_formatting -> state -> bot_api -> core -> http_server
-> runners (with client) -> cli; client, constants -> terminal_chat (the chat loads no server)
-> cli; __main__ runs cli.

Callers: tests, bench/, the offline demo (main.py) and the operator CLI's `chat` command.
It must import nothing from DIMS and no third-party package: the standard library only, so it
runs from a bare clone. It never logs a full token, only the bot id. This file imports nothing:
the public names below load their module on first use (PEP 562), so `telegram_sandbox.chat`
costs the client and the chat only.

Deviations from Telegram, on purpose: a token not of Telegram's shape is answered 401
Unauthorized (Telegram says 404 Not Found; python-telegram-bot raises InvalidToken for both);
a bot id belongs to the first secret seen with it, so another secret is 401 as on Telegram;
parameters of the wrong type are refused (Telegram coerces most); spec methods the sandbox
does not serve answer 501; webhooks are recorded but never called; photos sent by URL are
not fetched (offline); only bot_command entities are detected in plain text; no flood limits
unless injected with /sandbox/fault; everything is kept in memory until the process ends.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import SandboxClient, SandboxError
    from .constants import (CONFLICT_POLLER, CONFLICT_WEBHOOK, NOT_MODIFIED, SERVED_METHODS,
                            bot_username)
    from .runners import Sandbox, SandboxProcess
    from .spec import SPEC_PATH
    from .terminal_chat import chat

_PUBLIC = {
    "Sandbox": "runners", "SandboxProcess": "runners",
    "SandboxClient": "client", "SandboxError": "client",
    "chat": "terminal_chat",
    "SERVED_METHODS": "constants", "CONFLICT_POLLER": "constants",
    "CONFLICT_WEBHOOK": "constants", "NOT_MODIFIED": "constants", "bot_username": "constants",
    "SPEC_PATH": "spec",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """A public name, imported from its module the first time it is asked for."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
