"""One Telegram bot: a python-telegram-bot `Application` fed from a durable inbox.

PTB's own updater confirms updates to Telegram before its handlers run, so a killed process
would lose what it had fetched. `BotRunner` fetches updates itself (`getUpdates` long polling),
stores each batch in the inbox (`inbox.py`) and only then confirms the offset; it hands the
stored updates to the Application (whose handlers are in `handlers.py`) in order within each
chat, several chats at a time, and marks each done when its handler finishes. An update whose
handler keeps failing is parked as dead with its error; while the database is unreachable the
bot stops confirming and retries with a delay that grows to its cap, reports itself degraded in
its heartbeats, and loses nothing. A Bot API call that fails for a transient cause (network
error, 5xx, 429) is retried by itself (`telegram_retry.py`) for up to `[telegram] retry_for`
seconds, giving up its chat's slot while it waits; only then is its update parked.

`run(bot_config, config)` is the single entry: `bot_process.child_main` calls it in a bot
process under the supervisor (with `RunHooks` that speak over the pipe), and `main.py --single`
in its own process. A database that does not answer at start is waited for, not counted as a
failed start. Imports: telegram, `backoff`, `config`, `handlers`, `inbox`, `girls_manager`,
`states`, `telegram_retry` and the database layer;
never the supervisor or the CLI. Importing it builds nothing; `prepare_http_stack()` is for the
process that forks the bots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import importlib
import logging
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from telegram import BotCommand, Update
from telegram.error import Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import Application, ApplicationBuilder, ContextTypes
from telegram.request import HTTPXRequest

from backoff import Backoff
from config import BotConfig, Config, TelegramConfig, install_log_redaction
from connection_budget import server_refusal
from girls_manager import GirlsManager, RosterError
from handlers import USER_COMMANDS, Handlers, command_of, error_reply, fit
from inbox import MAX_ATTEMPTS, Inbox
from multiprocess_connection_manager import (
    ConnectionManager, DatabaseError, DatabaseIntegrationManager, is_database_outage, refuses_us,
)
from states import EXIT_FAILED, EXIT_OK, EXIT_START_FAILED, EXIT_TOKEN_REJECTED, EXIT_USAGE
from telegram_retry import ClassifyingRequest, RetryInterrupted, RetryingRateLimiter, TelegramUnavailable, seconds

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600
MAINTAIN_EVERY_S = 30
PROBE_TIMEOUT_S = 20      # a getMe asking whether Telegram is back, after a call gave up
PENDING_BATCH = 10_000
FETCH_LIMIT = 100
FETCH_LINGER_S = 0.020     # when busy: more updates per getUpdates and per inbox write
MAX_CONCURRENT_UPDATES = 4  # chats handled at once; within a chat, one update at a time
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]


# --------------------------------------------------------------------------- the runner


@dataclass
class BotStats:
    updates_handled: int = 0
    errors: int = 0
    dead: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.time)


class Health:
    """What keeps this bot from doing its work right now, for heartbeats and `system_health`:
    a database it cannot store or handle updates with, a Telegram it cannot fetch them from.
    Each problem is kept from its first failure until the next success. Its warning is logged
    once per doubling of the retry delay, however many calls are waiting on it, and its end once."""

    class Failure:
        def __init__(self, since: float, reason: str):
            self.since, self.reason, self.logged_level = since, reason, 0.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._failing: dict[str, Health.Failure] = {}

    def failing(self, what: str, reason: str, backoff: Backoff | None = None) -> None:
        """`what` ("database", "telegram") fails for `reason`; with the caller's backoff, log it
        when that backoff reached a delay no caller has logged yet in this outage."""
        reason = " ".join(reason.split())   # one line: psycopg2's messages span several
        failure = self._failing.setdefault(what, Health.Failure(self.clock(), reason))
        failure.reason = reason
        if backoff is not None and backoff.level > failure.logged_level:
            failure.logged_level = backoff.level
            log.warning("%s; retrying in %.1f s", reason, backoff.level)

    def recovered(self, what: str) -> None:
        failure = self._failing.pop(what, None)
        if failure is not None:
            log.info("%s: working again after %.1f s", what, self.clock() - failure.since)

    def problem(self) -> str | None:
        now = self.clock()
        found = [f"{f.reason} (for {now - f.since:.0f} s)" for f in self._failing.values()]
        return "; ".join(found) or None


class _Slot:
    """One of the bot's concurrent-chat slots, held by the chat worker that runs a handler. A
    Bot API call waiting to be retried gives it up meanwhile (`BotRunner._wait_released`), so
    the other chats go on; `held` says whether it must be given back at the end."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self.semaphore, self.held = semaphore, False

    async def acquire(self) -> None:
        await self.semaphore.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.semaphore.release()


_current_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("slot", default=None)


class TokenRejected(Exception):
    """Telegram said the token is not valid (401): retrying cannot help."""


class BotRunner:
    """Fetches into the inbox and processes it through one PTB Application."""

    def __init__(self, bot_config: BotConfig, config: Config, db: ConnectionManager, girls: GirlsManager,
                 *, poll_timeout: int = 30):
        self.bot_config = bot_config
        self.db = db
        self.girls = girls
        self.poll_timeout = poll_timeout
        self.stats = BotStats()
        self.health = Health()
        self.bot_id = int(bot_config.token.split(":", 1)[0])
        self.inbox = Inbox(db, bot_config.name, self.bot_id)
        self.app = build_application(bot_config, config.telegram)
        limiter = self.app.bot.rate_limiter
        limiter.wait = self._wait_released
        limiter.failing = lambda reason, backoff: self.health.failing("sending", reason, backoff)
        limiter.recovered = lambda: self.health.recovered("sending")
        self._failures: dict[int, BaseException] = {}
        self._offset: int | None = None          # the next getUpdates offset: all below is stored
        self._stopping = asyncio.Event()
        self._queues: dict[int, collections.deque] = {}   # chat -> its stored updates, in order
        self._scheduled: set[int] = set()                  # update ids queued or in hand
        self._workers: set[asyncio.Task] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_UPDATES)
        self._done_batch: list[tuple[int, asyncio.Future]] = []
        self._done_writer: asyncio.Task | None = None
        self.handlers = Handlers(bot_config, girls)
        self.handlers.install(self.app)
        self.app.add_error_handler(self.on_error)

    # -- errors

    async def on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        if isinstance(update, Update):
            self._failures[update.update_id] = error
        if isinstance(error, RosterError) and isinstance(update, Update) and update.effective_message:
            self._failures.pop(update.update_id, None)   # the user's mistake, answered: handled
            await update.effective_message.reply_text(error_reply(error, command_of(update)))
            return
        if is_database_outage(error) or isinstance(error, RetryInterrupted):
            return   # waited out by _handle, which logs it once per doubling of the delay (Health)
        if isinstance(error, TelegramUnavailable):
            log.error("update %s: %s", getattr(update, "update_id", "?"), error)
            return
        log.error("update %s failed", getattr(update, "update_id", "?"), exc_info=error)

    # -- serving: fetching, maintenance, shutdown

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[], Awaitable[None] | None] | None = None) -> int:
        """Run until `stop` is set. Returns an exit code."""
        # A stop asked for at any point (even while Telegram or the database holds up the start)
        # is seen by every wait of this runner, which all watch _stopping.
        stopper = asyncio.create_task(stop.wait(), name="stop")
        stopper.add_done_callback(lambda _: self._stopping.set())
        try:
            try:
                await self.app.initialize()
            except InvalidToken:
                log.error("Telegram rejected this bot's token (401 Unauthorized): check the token; not retrying")
                return EXIT_TOKEN_REJECTED
            try:
                await self.app.bot.set_my_commands([BotCommand(n, fit(t, 256)) for n, t in USER_COMMANDS])
                log.info("serving as @%s (%s)", self.app.bot.username, self.bot_config.display_name)
                await self._schedule_pending()          # what an earlier run stored comes first
                tasks = [asyncio.create_task(self._fetch_loop(), name="fetch"),
                         asyncio.create_task(self._maintain(), name="maintain")]
                if on_ready and not self._stopping.is_set():
                    result = on_ready()
                    if asyncio.iscoroutine(result):
                        await result
                done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                return await self._shutdown(tasks, stopper, done)
            finally:
                await self.app.shutdown()
        except RetryInterrupted:
            log.info("stopped before Telegram answered")
            return EXIT_OK
        finally:
            stopper.cancel()

    async def _shutdown(self, tasks: list[asyncio.Task], stopper: asyncio.Task, done: set[asyncio.Task]) -> int:
        """Stop fetching, let every update in hand finish, confirm the offset."""
        self._stopping.set()
        for task in (*tasks, stopper):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self.handlers.settle()
        failed = [t.exception() for t in done if t is not stopper and not t.cancelled() and t.exception()]
        if any(isinstance(exc, TokenRejected) for exc in failed):
            return EXIT_TOKEN_REJECTED
        for exc in failed:
            log.error("the bot stopped on an error", exc_info=exc)
        await self._confirm_offset()
        log.info("stopped after %d updates", self.stats.updates_handled)
        return EXIT_FAILED if failed else EXIT_OK

    async def _confirm_offset(self) -> None:
        """Tell Telegram that everything stored is received, so it is not sent again."""
        if self._offset is None:
            return
        try:
            await self.app.bot.get_updates(offset=self._offset, timeout=0, limit=1, allowed_updates=ALLOWED_UPDATES)
        except TelegramError as exc:
            log.warning("could not confirm the last offset on the way out: %s", exc)

    async def _fetch_loop(self) -> None:
        """Long-poll Telegram into the inbox. The first call passes no offset: Telegram itself
        remembers what was confirmed, and anything stored but unconfirmed comes again (and is
        stored once). A batch that cannot be stored (the database is down) is not confirmed:
        storing it is retried, with a delay that grows to its cap, until it is stored or the bot
        stops; Telegram keeps the updates meanwhile."""
        failing = Backoff(0.1, 10.0)          # network errors, 5xx, 403 on getUpdates
        conflict = Backoff(0.5, 30.0)         # 409: another process polls this token
        while not self._stopping.is_set():
            try:
                updates = await self.app.bot.get_updates(offset=self._offset, timeout=self.poll_timeout, limit=FETCH_LIMIT,
                                                         allowed_updates=ALLOWED_UPDATES)
            except RetryAfter as exc:
                log.warning("Telegram asks to wait %s s before polling again (429)", exc.retry_after)
                await asyncio.sleep(seconds(exc.retry_after))
                continue
            except InvalidToken:
                log.error("Telegram rejected this bot's token (401 Unauthorized): check the token; not retrying")
                raise TokenRejected() from None
            except Conflict:
                delay = conflict.next()
                self.health.failing("telegram", "another process is polling this bot's token (409 Conflict)")
                if conflict.grew:
                    log.error("another process is polling this bot's token (409 Conflict): only one may; "
                              "retrying in %.1f s", delay)
                await self._stopped_within(delay)
                continue
            except (NetworkError, Forbidden) as exc:
                delay = failing.next()
                self.health.failing("telegram", f"getUpdates fails: {exc}")
                if failing.grew:
                    log.warning("getUpdates failed (%s); retrying in %.1f s", exc, delay)
                await self._stopped_within(delay)
                continue
            failing.reset()
            conflict.reset()
            self.health.recovered("telegram")
            if not updates:
                continue
            fresh = await self._persist(self.inbox.store, [u.to_dict() for u in updates])
            if fresh is None:   # stopped while the database was down: nothing stored, nothing confirmed
                return
            self._offset = updates[-1].update_id + 1
            for update in updates:
                if update.update_id in fresh:   # a redelivery was handled (or is queued) already
                    self._schedule(update.update_id, update)
            if 1 < len(updates) < FETCH_LIMIT:
                # Busy (more than one update came at once): let the next batch fill a little,
                # for fewer getUpdates calls and inbox writes. One at a time: no waiting.
                await asyncio.sleep(FETCH_LINGER_S)

    # -- processing: in order within a chat, chats concurrently

    def _schedule(self, update_id: int, update: Update) -> None:
        """Queue a stored update behind the earlier ones of its chat (once)."""
        if update_id in self._scheduled or self._stopping.is_set():
            return
        self._scheduled.add(update_id)
        chat = _chat_key(update)
        queue = self._queues.get(chat)
        if queue is None:
            queue = self._queues[chat] = collections.deque()
            worker = asyncio.create_task(self._drain(chat, queue), name=f"chat-{chat}")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        queue.append((update_id, update))

    async def _drain(self, chat: int, queue: collections.deque) -> None:
        try:
            while queue and not self._stopping.is_set():
                update_id, update = queue[0]
                slot = _Slot(self._slots)
                _current_slot.set(slot)
                await slot.acquire()
                try:
                    await self._handle(update_id, update)
                finally:
                    slot.release()
                queue.popleft()
                self._scheduled.discard(update_id)
        except Exception:
            log.exception("handling chat %s failed; its updates stay in the inbox for a later pass", chat)
        finally:
            del self._queues[chat]
            for update_id, _ in queue:   # left for _schedule_pending to pick up again
                self._scheduled.discard(update_id)

    async def _schedule_pending(self) -> None:
        """Schedule stored updates not yet done (after a restart, or any left behind)."""
        rows = await self._persist(self.inbox.pending, PENDING_BATCH, set(self._scheduled))
        for update_id, payload in rows or ():
            self._schedule(update_id, Update.de_json(payload, self.app.bot))

    async def _maintain(self) -> None:
        """Every half minute: count dead updates, pick up strays; prune once an hour."""
        last_prune = -float("inf")
        while not self._stopping.is_set():
            if time.monotonic() - last_prune > PRUNE_EVERY_S:
                last_prune = time.monotonic()
                await self._persist(self.inbox.prune)
            counts = await self._persist(self.inbox.counts)
            if counts:
                self.stats.dead = counts["dead"]
            if self.app.bot.rate_limiter.unsettled:
                await self._probe_telegram()
            await self._schedule_pending()
            if await self._stopped_within(MAINTAIN_EVERY_S):
                return

    async def _handle(self, update_id: int, update: Update) -> None:
        retry = Backoff(0.2, 1.0)
        outage = Backoff(0.1, 5.0)
        while True:
            self._failures.pop(update_id, None)
            await self.app.process_update(update)
            error = self._failures.pop(update_id, None)
            if error is None:
                await self._mark_done(update_id)
                self.stats.updates_handled += 1
                return
            if isinstance(error, RetryInterrupted):
                return   # stopping: the update stays pending for the next run
            if isinstance(error, TelegramUnavailable):   # not the handler's fault, but past the bound
                self.stats.last_error = f"update {update_id}: {error}"[:500]
                if await self._persist(self.inbox.park, update_id, str(error)):
                    self.stats.dead += 1
                return
            if is_database_outage(error):
                delay = outage.next()
                self.health.failing("database", f"cannot store or handle updates: database unreachable ({error})",
                                    outage)
                if await self._stopped_within(delay):
                    return
                continue
            self.stats.errors += 1
            self.stats.last_error = f"update {update_id}: {type(error).__name__}: {error}"[:500]
            dead = await self._persist(self.inbox.mark_failed, update_id, f"{type(error).__name__}: {error}")
            if dead:
                self.stats.dead += 1
                log.error("update %s parked as dead after %d attempts: %s", update_id, MAX_ATTEMPTS, error)
                await self._apologise(update)
                return
            await asyncio.sleep(retry.next())

    async def _mark_done(self, update_id: int) -> None:
        """Group commit: marks asked for while one write is out go together in the next one.
        Returns once this update's mark is written, so a chat's next update waits for it."""
        done = asyncio.get_running_loop().create_future()
        self._done_batch.append((update_id, done))
        if self._done_writer is None or self._done_writer.done():
            self._done_writer = asyncio.create_task(self._write_done_marks(), name="done-marks")
        await done

    async def _write_done_marks(self) -> None:
        while self._done_batch:
            batch, self._done_batch = self._done_batch, []
            try:
                await self._persist(self.inbox.mark_done, [update_id for update_id, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for _, done in batch:
                    done.set_result(None)

    async def _apologise(self, update: Update) -> None:
        chat = update.effective_chat
        if chat is None:
            return
        try:
            await self.app.bot.send_message(chat.id, "Sorry, I could not handle that message. "
                                                     "The operators can see what went wrong.")
        except TelegramError as exc:
            log.warning("could not tell chat %s about a failed update: %s", chat.id, exc)

    async def _persist(self, method: Callable[..., Any], *args: Any) -> Any:
        """Run an inbox call, waiting out database outages with a delay that grows to 5 s; None
        if the bot was stopped meanwhile. While the outage lasts, health says the bot is degraded."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                result = await asyncio.to_thread(method, *args)
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                delay = backoff.next()
                self.health.failing("database", f"cannot store or handle updates: database unreachable ({exc})",
                                    backoff)
                if await self._stopped_within(delay):
                    return None
                continue
            self.health.recovered("database")
            return result

    async def _probe_telegram(self) -> None:
        """After a call gave up, the bot may have nothing to send for a long while; one getMe
        tells whether Telegram answers again, so that health does not go on reporting a failure
        that is over (and reports it, with the new reason, while it is not)."""
        with contextlib.suppress(TelegramError, TelegramUnavailable, RetryInterrupted, asyncio.TimeoutError):
            await asyncio.wait_for(self.app.bot.get_me(), PROBE_TIMEOUT_S)

    async def _wait_released(self, seconds: float) -> bool:
        """A Bot API call's wait before its retry: the chat's slot is given up meanwhile, so the
        bot's other chats go on. True if the bot was asked to stop."""
        slot = _current_slot.get()
        if slot is None or not slot.held:
            return await self._stopped_within(seconds)
        slot.release()
        try:
            return await self._stopped_within(seconds)
        finally:
            await slot.acquire()

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True if the bot was asked to stop meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

    def wake(self) -> None:
        """Schedule the inbox's pending updates now, not at the next pass (an operator retried
        dead ones). On the bot's event loop; the task is kept with the workers until it is done."""
        log.info("woken: handling the inbox's pending updates now")
        task = asyncio.create_task(self._schedule_pending(), name="wake")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def snapshot(self) -> dict[str, Any]:
        """Stats for heartbeats and operators."""
        return {"updates_handled": self.stats.updates_handled, "errors": self.stats.errors,
                "dead": self.stats.dead, "backlog": len(self._scheduled), "last_error": self.stats.last_error,
                "problem": self.health.problem(),
                "uptime_s": round(time.time() - self.stats.started, 1),
                "cache": self.girls.cache_stats(), "pool": self.db.stats()}


def _chat_key(update: Update) -> int:
    """Updates of one chat are handled in order; an update with no chat stands alone."""
    if update.effective_chat is not None:
        return update.effective_chat.id
    if update.effective_user is not None:
        return update.effective_user.id
    return -update.update_id


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One TLS context for every HTTP client of this process, with the CA bundle loaded once
    (about 50 ms per client, two clients per bot). Built by `prepare_http_stack` in the
    supervisor's forkserver, so that bot processes inherit it."""
    import certifi
    return ssl.create_default_context(cafile=certifi.where())


def _http(pool_size: int) -> HTTPXRequest:
    return ClassifyingRequest(connection_pool_size=pool_size, connect_timeout=10, read_timeout=10, write_timeout=10,
                        pool_timeout=10, httpx_kwargs={"verify": tls_context()})


def prepare_http_stack() -> None:
    """Pay once, in the process that forks the bots, what every bot's first HTTP client and
    first connection would each pay: the TLS context, httpcore's backends (h11, anyio, trio when
    installed: about 130 ms) and anyio's asyncio backend (20 ms)."""
    _http(1)
    with contextlib.suppress(ImportError):
        importlib.import_module("anyio._backends._asyncio")


def build_application(bot_config: BotConfig, telegram: TelegramConfig) -> Application:
    api_url = telegram.api_url
    file_url = api_url[:-3] + "file/bot" if api_url.endswith("/bot") else api_url
    limiter = RetryingRateLimiter(telegram.max_rate, telegram.retry_for)
    return (ApplicationBuilder().token(bot_config.token).base_url(api_url).base_file_url(file_url)
            .rate_limiter(limiter).updater(None)
            .request(_http(8)).get_updates_request(_http(1))
            .build())


# --------------------------------------------------------------------------- entry point


def configure_logging(bot_name: str, secrets: list[str], level: int | str = logging.INFO) -> None:
    """Every line carries the bot's name; no line carries a token; httpx stays quiet."""
    logging.basicConfig(level=level, format=f"%(asctime)s bot {bot_name}: %(levelname)s %(name)s: %(message)s",
                        force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    install_log_redaction(secrets)


class RunHooks:
    """What the caller of `run` hears of the bot's life, each on the bot's event loop. The
    supervised child sends it over its pipe (`bot_process.ChildChannel`); `--single` needs none."""

    def started(self, stop: asyncio.Event) -> None:
        """The event loop runs; setting `stop` stops the bot from now on, even mid-start."""

    def waiting(self, problem: str | None) -> None:
        """The start waits for an outside cause (`problem`), or no longer (None)."""

    def serving(self, runner: BotRunner) -> None:
        """The runner exists: its `snapshot()` has the bot's figures from now on."""

    def ready(self) -> None:
        """Polling and the database are up."""


def run(bot_config: BotConfig, config: Config, *, migrate: bool = True, pool_max: int | None = None,
        signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), poll_timeout: int = 30,
        hooks: RunHooks | None = None, check_budget: bool = False) -> int:
    """Run one bot until one of `signals` arrives; returns the process exit code.

    `check_budget` (`--single`; the supervisor's agent checks its whole fleet): a server whose
    max_connections cannot hold this process ends the start with EXIT_USAGE, naming its settings.

    A database that does not answer at start is waited for (0.1 s doubling to 5 s, logged once
    per doubling, reported through `hooks.waiting`) for as long as it takes, not counted as a
    failed start; one that answers and refuses (a wrong password, no such role) ends the start.
    """
    bot_config.require_token()   # ConfigError when this process has no token for the bot
    return asyncio.run(_run(bot_config, config, migrate, pool_max, signals, poll_timeout, hooks or RunHooks(),
                            check_budget))


async def _run(bot_config: BotConfig, config: Config, migrate: bool, pool_max: int | None,
               signals: tuple[int, ...], poll_timeout: int, hooks: RunHooks, check_budget: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    hooks.started(stop)
    manager = DatabaseIntegrationManager(config, role=f"bot:{bot_config.name}", pool_max=pool_max)
    try:
        refused = None
        try:
            db = await _connect(manager, migrate, stop, hooks)
            if db is not None and check_budget:
                refused = await loop.run_in_executor(None, server_refusal, db, config.database, 1,
                                                     manager.embedded is not None)
        except DatabaseError as exc:
            log.error("cannot start: %s", exc)
            return EXIT_START_FAILED
        if db is None:
            log.info("stopped before the database answered")
            return EXIT_OK
        if refused:
            log.error("cannot start: %s", refused)
            return EXIT_USAGE
        girls = GirlsManager(db, bot_config.name, bot_config.roster_tags)
        girls.start_listener()
        try:
            runner = BotRunner(bot_config, config, db, girls, poll_timeout=poll_timeout)
            hooks.serving(runner)
            return await runner.serve(stop, hooks.ready)
        finally:
            girls.close()
    finally:
        manager.shutdown()


async def _connect(manager: DatabaseIntegrationManager, migrate: bool, stop: asyncio.Event,
                   hooks: RunHooks) -> ConnectionManager | None:
    """The bot's database, once it answers; None if `stop` was set first. Raises DatabaseError
    when the server refuses this bot (`refuses_us`): waiting would not help."""
    loop = asyncio.get_running_loop()
    attempt = functools.partial(manager.initialize_database_coordination, migrate=migrate)
    backoff = Backoff(0.1, 5.0)
    health = Health()
    while not stop.is_set():
        try:
            db = await loop.run_in_executor(None, attempt)
        except Exception as exc:
            if not is_database_outage(exc) or refuses_us(exc) or manager.embedded is not None:
                raise   # refused, or the embedded server would not start: waiting cannot help
            delay = backoff.next()
            health.failing("database", f"waiting for the database to start: {exc}", backoff)
            hooks.waiting(health.problem())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            continue
        if backoff.failures:
            health.recovered("database")
            hooks.waiting(None)
        return db
    return None

