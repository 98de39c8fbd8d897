"""One Telegram bot: a python-telegram-bot `Application` serving the roster, with a durable inbox.

PTB's own updater confirms updates to Telegram before its handlers run, so a killed process
would lose what it had fetched. This bot fetches updates itself (`getUpdates` long polling),
stores each batch in the `dims_inbox` table and only then confirms the offset; it hands the
stored updates to the Application in order within each chat (several chats at a time) and
marks each done when its handler finishes.
An update whose handler keeps failing is parked as dead with its error; while the database is
unreachable the bot stops confirming and backs off, and loses nothing.

`run(bot_config, config)` is the single entry: the supervisor calls it in a child process, and
`main.py --single` in its own process. Imports: telegram, `girls_manager`, the connection
manager and `config`; never the supervisor or the CLI.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import importlib
import json
import logging
import random
import re
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import certifi
from telegram import BotCommand, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import MessageLimit
from telegram.request import HTTPXRequest
from telegram.error import Conflict, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import (
    AIORateLimiter, Application, ApplicationBuilder, CallbackQueryHandler, CommandHandler,
    ContextTypes, MessageHandler, TypeHandler, filters,
)

from config import BotConfig, Config, TelegramConfig, install_log_redaction
from girls_manager import (
    EDITABLE_FIELDS, GirlsManager, NameTaken, NotCached, Page, Profile, ProfileNotFound, RosterError, cache_only,
)
from multiprocess_connection_manager import (
    ConnectionManager, DatabaseError, DatabaseIntegrationManager, is_database_outage,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_TOKEN_REJECTED = 78     # Telegram rejected the token: restarting cannot help
EXIT_START_FAILED = 75       # could not start (database unreachable, ...): worth retrying

MAX_ATTEMPTS = 3             # handler failures before an update is parked as dead
RETRY_DELAYS = (0.2, 1.0)    # between those attempts
INBOX_RETENTION_S = 3 * 24 * 3600
PRUNE_EVERY_S = 3600
MAINTAIN_EVERY_S = 30
PENDING_BATCH = 10_000
FETCH_LIMIT = 100
FETCH_LINGER_S = 0.020     # when busy: more updates per getUpdates and per inbox write
MAX_CONCURRENT_UPDATES = 4  # chats handled at once; within a chat, one update at a time
PER_PAGE = 8
FIND_MAX = 20              # /find shows at most this many matches (one button each)
TOUCH_EVERY_S = 60.0
TOUCHED_MAX = 10_000       # users remembered for that throttle before stale ones are dropped
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]


# --------------------------------------------------------------------------- the inbox


class Inbox:
    """The durable inbox of one bot. Synchronous: call it through asyncio.to_thread."""

    def __init__(self, db: ConnectionManager, bot_name: str, bot_id: int):
        self.db = db
        self.bot_name = bot_name
        self.bot_id = bot_id

    def store(self, updates: list[dict[str, Any]]) -> set[int]:
        """Store a fetched batch in one statement; returns the ids that are new to the inbox.

        A redelivered update (same id, same content) is stored once and not returned. The same
        id with other content is a new update reusing an old id (Telegram restarts ids after a
        week without updates; a fresh sandbox starts again at 1): it replaces the old row.
        """
        rows = self.db.fetchall(
            "INSERT INTO dims_inbox (bot_id, update_id, bot, payload) "
            "SELECT %s, id, %s, body::jsonb FROM unnest(%s::bigint[], %s::text[]) AS batch(id, body) "
            "ON CONFLICT (bot_id, update_id) DO UPDATE SET payload = EXCLUDED.payload, bot = EXCLUDED.bot, "
            "status = 'pending', attempts = 0, error = NULL, received_at = now(), done_at = NULL "
            "WHERE dims_inbox.payload <> EXCLUDED.payload RETURNING update_id",
            (self.bot_id, self.bot_name, [p["update_id"] for p in updates], [json.dumps(p) for p in updates]))
        return {update_id for (update_id,) in rows}

    def pending(self, limit: int = 100, skip: set[int] | frozenset = frozenset()) -> list[tuple[int, dict[str, Any]]]:
        """Pending updates in order, but for those in `skip` (already queued in this process)."""
        return self.db.fetchall(
            "SELECT update_id, payload FROM dims_inbox WHERE bot_id = %s AND status = 'pending' "
            "AND NOT (update_id = ANY(%s)) ORDER BY update_id LIMIT %s", (self.bot_id, list(skip), limit))

    def mark_done(self, update_ids: list[int]) -> None:
        """Asynchronous commit: the bot does not wait for the disk (the rows are stored, so a
        PostgreSQL crash can at worst hand an update out once more)."""
        self.db.execute("SET LOCAL synchronous_commit TO off; UPDATE dims_inbox SET status = 'done', done_at = now() "
                        "WHERE bot_id = %s AND update_id = ANY(%s)", (self.bot_id, update_ids))

    def mark_failed(self, update_id: int, error: str) -> bool:
        """Count a failed attempt; True when the update is now parked as dead."""
        status = self.db.fetchval(
            "UPDATE dims_inbox SET attempts = attempts + 1, error = %s, "
            "status = CASE WHEN attempts + 1 >= %s THEN 'dead' ELSE status END "
            "WHERE bot_id = %s AND update_id = %s RETURNING status",
            (error[:2000], MAX_ATTEMPTS, self.bot_id, update_id))
        return status == "dead"

    def counts(self) -> dict[str, int]:
        rows = self.db.fetchall("SELECT status, count(*) FROM dims_inbox WHERE bot_id = %s AND status <> 'done' "
                                "GROUP BY status", (self.bot_id,))
        found = dict(rows)
        return {"backlog": found.get("pending", 0), "dead": found.get("dead", 0)}

    def prune(self, older_than_s: float = INBOX_RETENTION_S) -> int:
        return self.db.execute(
            "DELETE FROM dims_inbox WHERE bot_id = %s AND status = 'done' AND done_at < now() - make_interval(secs => %s)",
            (self.bot_id, older_than_s))


# --------------------------------------------------------------------------- texts and keyboards


def fit(text: str, limit: int = MessageLimit.MAX_TEXT_LENGTH) -> str:
    """Text cut to Telegram's limit, with an ellipsis when something was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(text: str, limit: int = 60) -> str:
    return "“" + fit(" ".join(text.split()), limit) + "”"


def card_text(profile: Profile) -> str:
    lines = [profile.name]
    if profile.bio:
        lines += ["", profile.bio]
    if profile.tags:
        lines += ["", "Tags: " + " ".join(f"#{tag}" for tag in profile.tags)]
    if not profile.visible:
        lines += ["", "(hidden)"]
    return "\n".join(lines)


def list_keyboard(profiles: list[Profile] | tuple[Profile, ...], page: int = 0,
                  nav: tuple[bool, bool] = (False, False)) -> InlineKeyboardMarkup:
    rows = [[InlineKeyboardButton(p.name, callback_data=f"p:{p.id}:{page}")] for p in profiles]
    arrows = []
    if nav[0]:
        arrows.append(InlineKeyboardButton("« Previous", callback_data=f"g:{page - 1}"))
    if nav[1]:
        arrows.append(InlineKeyboardButton("Next »", callback_data=f"g:{page + 1}"))
    if arrows:
        rows.append(arrows)
    return InlineKeyboardMarkup(rows)


def page_view(page: Page) -> tuple[str, InlineKeyboardMarkup | None]:
    if page.total == 0:
        return "The roster is empty for now.", None
    first = page.number * PER_PAGE + 1
    text = (f"Profiles {first}-{first + len(page.items) - 1} of {page.total} "
            f"(page {page.number + 1} of {page.pages}). Tap a name to see the profile.")
    nav = (page.number > 0, page.number + 1 < page.pages)
    return text, list_keyboard(page.items, page.number, nav)


def error_reply(error: RosterError, command: str) -> str:
    """A roster error as a reply: why (the roster's own message, which the CLI shows too), then
    how to do it right where the message does not say it already."""
    why = str(error)
    why = why[:1].upper() + why[1:] + ("" if why.endswith((".", "…")) else ".")
    if isinstance(error, ProfileNotFound):
        how = "Check the spelling, or look the name up with /find TEXT or /girls."
    elif isinstance(error, NameTaken) and command == "add":
        how = f"To change that profile, use {edit_usage(error.name)}."
    elif isinstance(error, NameTaken):
        how = "Pick a name no other profile has."
    else:
        how = ""
    return fit(f"{why} {how}".strip())


def edit_usage(name: str) -> str:
    return f"/edit {name} | FIELD | VALUE" if any(ch.isspace() for ch in name) else f"/edit {name} FIELD VALUE"


def card_keyboard(profile: Profile, favourite: bool, page: int) -> InlineKeyboardMarkup:
    star = "★ In your favourites" if favourite else "☆ Add to favourites"
    return InlineKeyboardMarkup([[InlineKeyboardButton(star, callback_data=f"f:{profile.id}:{page}")],
                                 [InlineKeyboardButton("« Back to the list", callback_data=f"g:{page}")]])


USER_COMMANDS = [
    ("start", "greeting and how many profiles I present"),
    ("help", "what you can do here"),
    ("girls", "browse the roster"),
    ("find", "TEXT - profiles whose name, bio or a tag contains TEXT"),
    ("fav", "NAME - add or remove a favourite"),
    ("favs", "your favourites"),
]
ADMIN_COMMANDS = [
    ("add", "NAME | BIO | tag1,tag2 - add a profile"),
    ("edit", "NAME FIELD VALUE - change name, bio, tags or photo (NAME | FIELD | VALUE for names with spaces)"),
    ("hide", "NAME - hide a profile"),
    ("show", "NAME - show a hidden profile again"),
    ("delete", "NAME - delete a profile for good"),
]
_CALLBACK = re.compile(r"^(g|p|f):(\d{1,9})(?::(\d{1,6}))?$")


# --------------------------------------------------------------------------- handlers


class Handlers:
    """One short coroutine per command: parse, call the roster, reply."""

    def __init__(self, bot_config: BotConfig, girls: GirlsManager):
        self.bot_config = bot_config
        self.girls = girls
        self._touched: dict[int, float] = {}

    def is_admin(self, update: Update) -> bool:
        return bool(update.effective_user) and update.effective_user.id in self.bot_config.admins

    async def roster(self, method: Callable[..., Any], *args: Any) -> Any:
        """A roster call in a worker thread (psycopg2 blocks)."""
        return await asyncio.to_thread(method, *args)

    async def read(self, method: Callable[..., Any], *args: Any) -> Any:
        """A roster read: answered inline when cached, else in a worker thread."""
        try:
            with cache_only():
                return method(*args)
        except NotCached:
            return await asyncio.to_thread(method, *args)

    def install(self, app: Application) -> None:
        """One CommandHandler for every command (one parse per message), then buttons, then
        everything else; user bookkeeping runs for every update in a later group."""
        self._commands = {name: getattr(self, f"cmd_{name}") for name, _ in USER_COMMANDS + ADMIN_COMMANDS}
        self._admin_commands = {name for name, _ in ADMIN_COMMANDS}
        app.add_handler(CommandHandler(list(self._commands), self.on_command))
        app.add_handler(CallbackQueryHandler(self.on_button))
        app.add_handler(MessageHandler(filters.COMMAND, self.unknown_command))
        app.add_handler(MessageHandler(filters.ALL & ~filters.UpdateType.EDITED, self.plain_message))
        app.add_handler(TypeHandler(Update, self.touch), group=1)

    async def on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        name = _command(update)
        if name in self._admin_commands and not self.is_admin(update):
            await update.effective_message.reply_text(
                f"Sorry, /{name} is for this bot's admins only. Send /help to see what you can do.")
            return
        await self._commands[name](update, context)

    async def touch(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """First/last seen bookkeeping, written at most once a minute per user."""
        user = update.effective_user
        now = time.monotonic()
        if user and now - self._touched.get(user.id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            if len(self._touched) >= TOUCHED_MAX:   # forget users not seen for a minute ...
                self._touched = {uid: at for uid, at in self._touched.items() if now - at < TOUCH_EVERY_S}
                if len(self._touched) >= TOUCHED_MAX // 2:   # ... or everyone, when most are recent
                    self._touched.clear()
            self._touched[user.id] = now
            await self.roster(self.girls.touch_user, user.id, user.username, user.first_name)

    # -- user commands

    async def cmd_start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        count = await self.read(self.girls.count)
        profiles = "1 profile" if count == 1 else f"{count} profiles"
        await update.effective_message.reply_text(
            f"Hi! I'm {self.bot_config.display_name}, and I present {profiles}.\n"
            "Send /girls to browse, /find TEXT to search, /help for everything I can do.")

    async def cmd_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        lines = ["What you can do here:"] + [f"/{name} {text}" for name, text in USER_COMMANDS]
        if self.is_admin(update):
            lines += ["", "Admin commands:"] + [f"/{name} {text}" for name, text in ADMIN_COMMANDS]
        await update.effective_message.reply_text("\n".join(lines))

    async def cmd_girls(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        text, keyboard = page_view(await self.read(self.girls.page, 0, PER_PAGE))
        await update.effective_message.reply_text(text, reply_markup=keyboard)

    async def cmd_find(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        text = " ".join(context.args).strip()
        if not text:
            await update.effective_message.reply_text("Tell me what to look for, e.g. /find anna")
            return
        found = await self.read(self.girls.search, text, FIND_MAX + 1)   # one more: are there more?
        if not found:
            await update.effective_message.reply_text(
                f"Nothing matched {quote(text)}. Try a shorter word, or /girls to browse.")
            return
        if len(found) > FIND_MAX:
            reply = (f"More than {FIND_MAX} profiles match {quote(text)}; here are the first {FIND_MAX}. "
                     "Try a longer or more exact text to narrow it down.")
        elif len(found) == 1:
            reply = f"1 profile matches {quote(text)}:"
        else:
            reply = f"{len(found)} profiles match {quote(text)}:"
        await update.effective_message.reply_text(reply, reply_markup=list_keyboard(found[:FIND_MAX]))

    async def cmd_fav(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        name = " ".join(context.args).strip()
        if not name:
            await update.effective_message.reply_text("Name the profile, e.g. /fav Anna. /favs lists your favourites.")
            return
        profile, now = await self.roster(self.girls.toggle_favourite, update.effective_user.id, name)
        verb = "added to" if now else "removed from"
        await update.effective_message.reply_text(f"{profile.name} {verb} your favourites.")

    async def cmd_favs(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        favourites = await self.read(self.girls.favourites, update.effective_user.id)
        if not favourites:
            await update.effective_message.reply_text(
                "You have no favourites yet. Open a profile from /girls and tap ☆, or send /fav NAME.")
            return
        await update.effective_message.reply_text(f"Your favourites ({len(favourites)}):",
                                                  reply_markup=list_keyboard(favourites[:50]))

    # -- admin commands

    async def cmd_add(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        parts = [p.strip() for p in _arguments(update).split("|")]
        if not parts[0]:
            await update.effective_message.reply_text("Usage: /add NAME | BIO | tag1,tag2 (bio and tags are optional)")
            return
        name, bio, tags = (parts + ["", ""])[:3]
        profile = await self.roster(self.girls.add, name, bio, _split_tags(tags))
        await update.effective_message.reply_text(f"Added {profile.name}.\n\n{card_text(profile)}")

    async def cmd_edit(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        raw = _arguments(update)
        if "|" in raw:
            parts = [p.strip() for p in raw.split("|", 2)]
        else:
            parts = raw.split(None, 2)
        if len(parts) < 3 or parts[1].lower() not in EDITABLE_FIELDS:
            await update.effective_message.reply_text(
                f"Usage: /edit NAME FIELD VALUE, where FIELD is one of {', '.join(EDITABLE_FIELDS)}; "
                "for a name with spaces: /edit NAME | FIELD | VALUE")
            return
        profile = await self.roster(self.girls.edit, parts[0], parts[1].lower(), parts[2])
        await update.effective_message.reply_text(f"Updated {profile.name}.\n\n{card_text(profile)}")

    async def _by_name(self, update: Update, usage: str, method: Callable[[str], Profile], done: str) -> None:
        name = _arguments(update).strip()
        if not name:
            await update.effective_message.reply_text(usage)
            return
        profile = await self.roster(method, name)
        await update.effective_message.reply_text(done.format(name=profile.name))

    async def cmd_hide(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._by_name(update, "Usage: /hide NAME", self.girls.hide, "{name} is hidden now.")

    async def cmd_show(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._by_name(update, "Usage: /show NAME", self.girls.show, "{name} is visible again.")

    async def cmd_delete(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._by_name(update, "Usage: /delete NAME", self.girls.delete, "{name} is deleted.")

    # -- everything else

    async def on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        match = _CALLBACK.match(query.data or "")
        if not match:
            await query.answer("This button is no longer valid. Send /girls to start again.")
            return
        kind, number, page = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        try:
            if kind == "g":
                text, keyboard = page_view(await self.read(self.girls.page, number, PER_PAGE))
                await query.answer()
                await _edit_or_send(query, text, keyboard)
            elif kind == "p":
                await self._open_card(query, number, page)
            else:
                await self._toggle_from_card(query, number, page)
        except ProfileNotFound:
            await query.answer("That profile is no longer available. Send /girls for the current list.",
                               show_alert=True)

    async def _open_card(self, query, profile_id: int, page: int) -> None:
        profile = await self.read(self.girls.get, profile_id)
        favourite = await self.read(self.girls.is_favourite, query.from_user.id, profile_id)
        await query.answer()
        keyboard = card_keyboard(profile, favourite, page)
        if profile.photo:
            await query.message.reply_photo(profile.photo, caption=fit(card_text(profile), MessageLimit.CAPTION_LENGTH),
                                            reply_markup=keyboard)
        else:
            await _edit_or_send(query, card_text(profile), keyboard)

    async def _toggle_from_card(self, query, profile_id: int, page: int) -> None:
        profile = await self.read(self.girls.get, profile_id)
        profile, now = await self.roster(self.girls.toggle_favourite, query.from_user.id, profile.name)
        await query.answer(f"{profile.name} {'added to' if now else 'removed from'} your favourites.")
        await query.edit_message_reply_markup(card_keyboard(profile, now, page))

    async def unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        command = (update.effective_message.text or "").split()[0][:40]
        await update.effective_message.reply_text(f"I don't know {command}. Send /help to see what I can do.")

    async def plain_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.effective_message:
            await update.effective_message.reply_text(
                "I work with commands: /girls to browse, /find TEXT to search, /help for the rest.")


def _command(update: Update) -> str:
    """The command a message starts with ("find" for "/find@AlphaBot x"); "" for anything else."""
    if update.callback_query is not None:
        return ""
    words = (update.effective_message.text or "").split(None, 1)
    return words[0][1:].split("@", 1)[0].lower() if words and words[0].startswith("/") else ""


def _arguments(update: Update) -> str:
    """The text after the command, spacing and newlines kept (context.args splits on spaces)."""
    text = update.effective_message.text or ""
    return text.split(None, 1)[1] if len(text.split(None, 1)) > 1 else ""


def _split_tags(text: str) -> list[str]:
    return [t for t in re.split(r"[,\s]+", text.strip()) if t]


async def _edit_or_send(query, text: str, keyboard: InlineKeyboardMarkup | None) -> None:
    """Show text in the pressed message when it is a text message; else send a new one."""
    if query.message and query.message.text is not None:
        try:
            await query.edit_message_text(fit(text), reply_markup=keyboard)
            return
        except TelegramError as exc:
            if "not modified" in str(exc):
                return
            raise
    await query.message.reply_text(fit(text), reply_markup=keyboard)


# --------------------------------------------------------------------------- the runner


@dataclass
class BotStats:
    updates_handled: int = 0
    errors: int = 0
    dead: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.time)


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
        self.bot_id = int(bot_config.token.split(":", 1)[0])
        self.inbox = Inbox(db, bot_config.name, self.bot_id)
        self.app = build_application(bot_config, config.telegram)
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
            await update.effective_message.reply_text(error_reply(error, _command(update)))
            return
        if is_database_outage(error):
            log.warning("database unreachable while handling update %s: %s",
                        getattr(update, "update_id", "?"), error)
            return
        log.error("update %s failed", getattr(update, "update_id", "?"), exc_info=error)

    # -- serving: fetching, maintenance, shutdown

    async def serve(self, stop: asyncio.Event, on_ready: Callable[[], Awaitable[None] | None] | None = None) -> int:
        """Run until `stop` is set. Returns an exit code."""
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
            if on_ready:
                result = on_ready()
                if asyncio.iscoroutine(result):
                    await result
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            return await self._shutdown(tasks, stopper, done)
        finally:
            await self.app.shutdown()

    async def _shutdown(self, tasks: list[asyncio.Task], stopper: asyncio.Task, done: set[asyncio.Task]) -> int:
        """Stop fetching, let every update in hand finish, confirm the offset."""
        self._stopping.set()
        for task in (*tasks, stopper):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._workers, return_exceptions=True)
        failed = [t.exception() for t in done if t is not stopper and not t.cancelled() and t.exception()]
        if any(isinstance(exc, TokenRejected) for exc in failed):
            return EXIT_TOKEN_REJECTED
        for exc in failed:
            log.error("the bot stopped on an error", exc_info=exc)
        await self._confirm_offset()
        log.info("stopped after %d updates", self.stats.updates_handled)
        return EXIT_OK

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
        stored once)."""
        backoff = Backoff()
        while not self._stopping.is_set():
            try:
                updates = await self.app.bot.get_updates(offset=self._offset, timeout=self.poll_timeout, limit=FETCH_LIMIT,
                                                         allowed_updates=ALLOWED_UPDATES)
            except RetryAfter as exc:
                log.warning("Telegram asks to wait %s s before polling again (429)", exc.retry_after)
                await asyncio.sleep(_seconds(exc.retry_after))
                continue
            except InvalidToken:
                log.error("Telegram rejected this bot's token (401 Unauthorized): check the token; not retrying")
                raise TokenRejected() from None
            except Conflict:
                delay = backoff.next(cap=30)
                log.error("another process is polling this bot's token (409 Conflict): only one may; "
                          "retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                continue
            except (NetworkError, Forbidden) as exc:
                delay = backoff.next()
                log.warning("getUpdates failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if not updates:
                continue
            try:
                fresh = await asyncio.to_thread(self.inbox.store, [u.to_dict() for u in updates])
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                delay = backoff.next()
                log.warning("database unreachable (%s): not confirming %d updates; retrying in %.1f s",
                            exc, len(updates), delay)
                await asyncio.sleep(delay)
                continue
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
                async with self._slots:
                    await self._handle(update_id, update)
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
            await self._schedule_pending()
            if await self._stopped_within(MAINTAIN_EVERY_S):
                return

    async def _handle(self, update_id: int, update: Update) -> None:
        attempt = 0
        outage = Backoff()
        while True:
            self._failures.pop(update_id, None)
            await self.app.process_update(update)
            error = self._failures.pop(update_id, None)
            if error is None:
                await self._mark_done(update_id)
                self.stats.updates_handled += 1
                return
            if is_database_outage(error):
                if await self._stopped_within(outage.next(cap=5)):
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
            await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            attempt += 1

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
        """Run an inbox call, waiting out database outages with backoff; None if stopped meanwhile."""
        backoff = Backoff()
        while True:
            try:
                return await asyncio.to_thread(method, *args)
            except Exception as exc:
                if not is_database_outage(exc):
                    raise
                delay = backoff.next(cap=5)
                log.warning("database unreachable (%s); retrying in %.1f s", exc, delay)
                if await self._stopped_within(delay):
                    return None

    async def _stopped_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True if the bot was asked to stop meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

    def snapshot(self) -> dict[str, Any]:
        """Stats for heartbeats and operators."""
        return {"updates_handled": self.stats.updates_handled, "errors": self.stats.errors,
                "dead": self.stats.dead, "backlog": len(self._scheduled), "last_error": self.stats.last_error,
                "uptime_s": round(time.time() - self.stats.started, 1),
                "cache": self.girls.cache_stats(), "pool": self.db.stats()}


def _chat_key(update: Update) -> int:
    """Updates of one chat are handled in order; an update with no chat stands alone."""
    if update.effective_chat is not None:
        return update.effective_chat.id
    if update.effective_user is not None:
        return update.effective_user.id
    return -update.update_id


class Backoff:
    """Capped exponential backoff with jitter: 0.1 s, 0.2 s, 0.4 s, ... up to `cap`."""

    def __init__(self, first: float = 0.1):
        self.first = first
        self.attempt = 0

    def next(self, cap: float = 10.0) -> float:
        delay = min(cap, self.first * 2 ** self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.attempt = 0


def _seconds(value: Any) -> float:
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


# One TLS context for every HTTP client of this process, made at import: the supervisor's
# forkserver imports this module once, so bot processes inherit it instead of each loading the
# CA bundle again (about 50 ms per client, two clients per bot).
_TLS_CONTEXT = ssl.create_default_context(cafile=certifi.where())


def _http(pool_size: int) -> HTTPXRequest:
    return HTTPXRequest(connection_pool_size=pool_size, connect_timeout=10, read_timeout=10, write_timeout=10,
                        pool_timeout=10, httpx_kwargs={"verify": _TLS_CONTEXT})


def _import_http_stack() -> None:
    """The first HTTP client a process builds imports httpcore's backends (h11, anyio, trio
    when installed: about 130 ms), and its first connection anyio's asyncio backend (20 ms).
    Doing both at import lets the supervisor's forkserver pay once for every bot."""
    _http(1)
    with contextlib.suppress(ImportError):
        importlib.import_module("anyio._backends._asyncio")


_import_http_stack()


def build_application(bot_config: BotConfig, telegram: TelegramConfig) -> Application:
    api_url = telegram.api_url
    file_url = api_url[:-3] + "file/bot" if api_url.endswith("/bot") else api_url
    limiter = AIORateLimiter(overall_max_rate=telegram.max_rate, max_retries=3)
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


def run(bot_config: BotConfig, config: Config, *, migrate: bool = True, pool_max: int | None = None,
        signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), poll_timeout: int = 30,
        on_serving: Callable[[BotRunner, asyncio.Event], None] | None = None,
        on_ready: Callable[[], Any] | None = None) -> int:
    """Run one bot until one of `signals` arrives; returns the process exit code.

    `on_serving(runner, stop)` is called inside the bot's event loop before it starts (the
    supervisor's child attaches its pipe there); `on_ready()` once polling and the database are up.
    """
    manager = DatabaseIntegrationManager(config, role=f"bot:{bot_config.name}", pool_max=pool_max)
    try:
        db = manager.initialize_database_coordination(migrate=migrate)
    except DatabaseError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_START_FAILED
    girls = GirlsManager(db, bot_config.name, bot_config.roster_tags)
    girls.start_listener()
    try:
        return asyncio.run(_serve(BotRunner(bot_config, config, db, girls, poll_timeout=poll_timeout),
                                  signals, on_serving, on_ready))
    finally:
        girls.close()
        manager.shutdown()


async def _serve(runner: BotRunner, signals: tuple[int, ...], on_serving, on_ready) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    if on_serving:
        on_serving(runner, stop)
    return await runner.serve(stop, on_ready)


# Bot processes are forked from a forkserver that imported this module: freezing what is
# loaded now keeps their garbage collectors from touching (and so copying) the shared pages.
gc.freeze()
