"""The inside of a supervised bot process: its entry function, its end of the pipe to the
supervisor, and the preparation of the forkserver every bot process is forked from.

`child_main` is what the supervisor starts (through `host.Host`) for each bot: it names the
process, ties its life to its parent's (`process_setup`), and runs `bot.run()` with a `ChildChannel` that sends
`ready` and heartbeats and turns a `stop` message (or EOF: the supervisor is gone) into a
graceful stop. It is handed only its own bot's configuration (with the database and telegram
sections), never the other bots' tokens. `prepare_forkserver` runs once in the forkserver
(`forkserver_preload` calls it): it imports the bot's modules and builds what every bot
process shares, so a bot starts in milliseconds and its pages stay shared.

Imports at the top: the standard library, `config`, `pipe_protocol`, `process_setup`; `bot` (and with
it telegram and the database layer) only inside the functions that run in child processes, so
the supervisor, which imports this module for `child_main`, never loads them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection as mpc
import os
import signal
import threading

from config import BotConfig, Config
from pipe_protocol import Kind, Message
from process_setup import prepare_child, set_process_title

log = logging.getLogger("dims.child")


def prepare_bot_process() -> None:
    """Load and build what a bot process needs before its first update: the bot's modules
    (python-telegram-bot, httpx, psycopg2), one TLS context with the CA bundle loaded, the HTTP
    stack's lazily imported backends. Then freeze the garbage collector's view of all of it:
    those objects live as long as the process, so a full collection need not scan them (50,000
    or so, about 20 ms a time), and in the forkserver, bot processes forked from it never touch
    (and so copy) those shared pages."""
    import gc

    import bot
    bot.prepare_http_stack()
    gc.freeze()


def prepare_forkserver() -> None:
    """Prepare, once, the process every bot process is forked from."""
    set_process_title("dims: forkserver", "dims forkserver")
    prepare_bot_process()


def child_config(config: Config, bot_config: BotConfig) -> Config:
    """What a bot process is handed: its own bot, the database and telegram sections; no other
    bot's token."""
    return config._replace(bots=(bot_config,))


class ChildChannel:
    """The child's end of its pipe, and the `bot.RunHooks` of a supervised bot: answers requests,
    sends heartbeats from the moment the event loop runs (while the start waits for the
    database too, with the problem, so the supervisor knows the start is not hung), turns `stop`
    (or EOF) into a stop at any point."""

    def __init__(self, conn: mpc.Connection, heartbeat_interval: float):
        self.conn = conn
        self.heartbeat_interval = heartbeat_interval
        self._send_lock = threading.Lock()
        self.runner = None
        self._problem: str | None = None    # what the start waits for, until the runner exists
        self._heartbeat_task = None

    def send(self, message: Message) -> None:
        with self._send_lock:
            try:
                self.conn.send_bytes(message.encode())
            except (OSError, ValueError):
                pass  # the supervisor is gone; the reader thread notices EOF and stops the bot

    def started(self, stop) -> None:
        """Called by bot.run inside the bot's event loop, before anything else. (asyncio is
        imported here and below, not at the top: the supervisor process never needs it.)"""
        import asyncio
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop, stop), name="pipe-reader", daemon=True).start()
        self._heartbeat_task = loop.create_task(self._heartbeats())   # kept: the loop holds tasks weakly

    def waiting(self, problem: str | None) -> None:
        self._problem = problem
        self.send(Message(Kind.HEARTBEAT, self.snapshot()))   # at once: bot_list shows it

    def serving(self, runner) -> None:
        self.runner = runner

    def snapshot(self) -> dict:
        return self.runner.snapshot() if self.runner is not None else {"problem": self._problem}

    @staticmethod
    def _on_loop(loop, callback, *args) -> None:
        with contextlib.suppress(RuntimeError):   # the loop already finished: nothing to do
            loop.call_soon_threadsafe(callback, *args)

    def _reply(self, request_id: int) -> None:
        """On the event loop, like the heartbeats: a bot whose loop is stuck does not answer,
        so the supervisor sees it as it is."""
        self.send(Message(Kind.REPLY, self.snapshot(), request_id))

    def ready(self) -> None:
        self.send(Message(Kind.READY, self.snapshot()))

    async def _heartbeats(self) -> None:
        import asyncio
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.send(Message(Kind.HEARTBEAT, self.snapshot()))

    def _read(self, loop, stop) -> None:
        while True:
            try:
                message = Message.decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                log.warning("the supervisor is gone: stopping")
                self._on_loop(loop, stop.set)
                return
            except (ValueError, KeyError):
                continue
            if message.kind is Kind.STOP:
                self._on_loop(loop, stop.set)
            elif message.kind in (Kind.STATS, Kind.PING):
                self._on_loop(loop, self._reply, message.id)
            elif message.kind is Kind.WAKE:   # an operator retried dead updates: a new pass over the inbox
                self._on_loop(loop, self._wake)

    def _wake(self) -> None:
        if self.runner is not None:   # else not serving yet: its start handles what is pending
            self.runner.wake()


def child_main(bot_config: BotConfig, config: Config, pool_max: int, log_level: str, conn: mpc.Connection) -> None:
    """The entry of a bot process. It always ends the process; it never returns."""
    code = 1
    try:
        prepare_child(f"dims: bot {bot_config.name}", f"dims bot {bot_config.name}")
        import bot
        bot.configure_logging(bot_config.name, config.secrets(), log_level)
        channel = ChildChannel(conn, config.supervisor.heartbeat_interval)
        code = bot.run(bot_config, config, migrate=False, pool_max=pool_max, signals=(signal.SIGTERM,),
                       hooks=channel)
    except BaseException:  # reported, then the process ends with status 1
        log.exception("bot %s crashed", bot_config.name)
    finally:
        logging.shutdown()
        os._exit(code)
