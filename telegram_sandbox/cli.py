"""The sandbox's command line: serve (the default) or chat with a bot on a running sandbox.

    python -m telegram_sandbox [--host 127.0.0.1] [--port 8081] [--log-level INFO]
    python -m telegram_sandbox chat --url http://127.0.0.1:8081 --token 123:ABC [--user-id 1000]

main() is what `python -m telegram_sandbox` (__main__.py) and the launcher telegram_sandbox.py
beside the package run. Each command imports what it needs when it runs, so `chat` loads none
of the server.

Imports constants at once, and runners or terminal_chat for the command given.
"""

import argparse
import ipaddress
import logging
import sys

from .constants import TOKEN_RE


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Local Telegram Bot API emulator (serve), or chat with a bot on one (chat).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; others are exposed)")
    parser.add_argument("--port", type=_port, default=8081, help="port, 0 for any free one")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="stop when standard input closes (its parent process is gone)")
    commands = parser.add_subparsers(dest="command")
    talk = commands.add_parser("chat", help="chat with a bot as a Telegram user")
    talk.add_argument("--url", required=True, help="sandbox URL, e.g. http://127.0.0.1:8081")
    talk.add_argument("--token", required=True, help="the bot's token")
    talk.add_argument("--user-id", type=int, default=1000, help="your Telegram user id")
    talk.add_argument("--first-name", default="You", help="your first name")
    args = parser.parse_args(argv)
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            parser.error(f"--host must be an IP address or localhost, not {args.host!r}")
    if args.command == "chat" and not TOKEN_RE.fullmatch(args.token):
        parser.error("--token must look like a Telegram bot token (digits:secret)")
    return args


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {port}")
    return port


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the command in argv (default sys.argv[1:]); returns the exit status."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "chat":
        from .terminal_chat import chat
        return chat(args.url, args.token, user_id=args.user_id, first_name=args.first_name)
    from .runners import run_server
    return run_server(args.host, args.port, args.exit_with_stdin)
