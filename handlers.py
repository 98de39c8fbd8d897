"""What a Telegram user sees: one short coroutine per command (parse, call the roster, reply),
the buttons, and the texts and keyboards they show.

`Handlers.install(app)` puts them on a python-telegram-bot `Application`; `bot.BotRunner` owns
the Application and feeds it the inbox's updates, and answers a roster error (a user's mistake)
with `error_reply`. Roster calls run in worker threads (psycopg2 blocks) unless the answer is
cached. Replies are plain text (no parse mode), so no user input can break them, and long text
is cut within Telegram's limits. Imports telegram, `config` and `girls_manager`; never the
supervisor, the inbox or the CLI.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import MessageLimit
from telegram.error import BadRequest, TelegramError
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, TypeHandler, filters

from config import BotConfig
from girls_manager import (
    EDITABLE_FIELDS, GirlsManager, NameTaken, NotCached, Page, Profile, ProfileNotFound, RosterError, cache_only,
)

PER_PAGE = 8
FIND_MAX = 20              # /find shows at most this many matches (one button each)
TOUCH_EVERY_S = 60.0
TOUCHED_MAX = 10_000       # users remembered for that throttle before stale ones are dropped

log = logging.getLogger(__name__)


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
        self._background: set[asyncio.Task] = set()   # seen-bookkeeping writes in flight
        self._seen_failing = False

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
        name = command_of(update)
        if name in self._admin_commands and not self.is_admin(update):
            await update.effective_message.reply_text(
                f"Sorry, /{name} is for this bot's admins only. Send /help to see what you can do.")
            return
        await self._commands[name](update, context)

    async def touch(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """First/last seen bookkeeping, written at most once a minute per user, in the background:
        it neither holds up the update's done mark nor fails the update (which would send the reply
        again). A failed write is logged (once until one succeeds) and tried again on the user's
        next update."""
        user = update.effective_user
        now = time.monotonic()
        if user and now - self._touched.get(user.id, -TOUCH_EVERY_S) >= TOUCH_EVERY_S:
            if len(self._touched) >= TOUCHED_MAX:   # forget users not seen for a minute ...
                self._touched = {uid: at for uid, at in self._touched.items() if now - at < TOUCH_EVERY_S}
                if len(self._touched) >= TOUCHED_MAX // 2:   # ... or everyone, when most are recent
                    self._touched.clear()
            self._touched[user.id] = now
            task = asyncio.create_task(self._record_seen(user.id, user.username, user.first_name),
                                       name=f"seen-{user.id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _record_seen(self, user_id: int, username: str | None, first_name: str | None) -> None:
        try:
            await self.roster(self.girls.touch_user, user_id, username, first_name)
        except Exception as exc:
            self._touched.pop(user_id, None)
            log.log(logging.DEBUG if self._seen_failing else logging.WARNING,
                    "could not record user %s as seen (tried again on their next message): %s",
                    user_id, " ".join(str(exc).split())[:300])
            self._seen_failing = True
            return
        if self._seen_failing:
            self._seen_failing = False
            log.info("recording users as seen: working again")

    async def settle(self) -> None:
        """Wait for the bookkeeping still being written (on the way out)."""
        await asyncio.gather(*self._background, return_exceptions=True)

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
        profile = await self.roster(self.girls.add, name, bio, tags)
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
            await _answer(query, "This button is no longer valid. Send /girls to start again.")
            return
        kind, number, page = match.group(1), int(match.group(2)), int(match.group(3) or 0)
        try:
            if kind == "g":
                text, keyboard = page_view(await self.read(self.girls.page, number, PER_PAGE))
                await _answer(query)
                await _edit_or_send(query, text, keyboard)
            elif kind == "p":
                await self._open_card(query, number, page)
            else:
                await self._toggle_from_card(query, number, page)
        except ProfileNotFound:
            await _answer(query, "That profile is no longer available. Send /girls for the current list.",
                               show_alert=True)

    async def _open_card(self, query, profile_id: int, page: int) -> None:
        profile = await self.read(self.girls.get, profile_id)
        favourite = await self.read(self.girls.is_favourite, query.from_user.id, profile_id)
        await _answer(query)
        keyboard = card_keyboard(profile, favourite, page)
        if profile.photo:
            await query.message.reply_photo(profile.photo, caption=fit(card_text(profile), MessageLimit.CAPTION_LENGTH),
                                            reply_markup=keyboard)
        else:
            await _edit_or_send(query, card_text(profile), keyboard)

    async def _toggle_from_card(self, query, profile_id: int, page: int) -> None:
        profile = await self.read(self.girls.get, profile_id)
        profile, now = await self.roster(self.girls.toggle_favourite, query.from_user.id, profile.name)
        await _answer(query, f"{profile.name} {'added to' if now else 'removed from'} your favourites.")
        try:
            await query.edit_message_reply_markup(card_keyboard(profile, now, page))
        except BadRequest as exc:   # toggled and answered: a card that cannot show it is no reason to toggle again
            log.info("the card's buttons could not be updated (%s); the favourite is %s", exc,
                     "set" if now else "cleared")

    async def unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        command = (update.effective_message.text or "").split()[0][:40]
        await update.effective_message.reply_text(f"I don't know {command}. Send /help to see what I can do.")

    async def plain_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.effective_message:
            await update.effective_message.reply_text(
                "I work with commands: /girls to browse, /find TEXT to search, /help for the rest.")


def command_of(update: Update) -> str:
    """The command a message starts with ("find" for "/find@AlphaBot x"); "" for anything else."""
    if update.callback_query is not None:
        return ""
    words = (update.effective_message.text or "").split(None, 1)
    return words[0][1:].split("@", 1)[0].lower() if words and words[0].startswith("/") else ""


def _arguments(update: Update) -> str:
    """The text after the command, spacing and newlines kept (context.args splits on spaces)."""
    text = update.effective_message.text or ""
    return text.split(None, 1)[1] if len(text.split(None, 1)) > 1 else ""


async def _answer(query, text: str | None = None, **options: Any) -> None:
    """Answer a button press. Telegram takes an answer only for a short while after the press;
    one that comes later (the bot waited out an outage) is refused with a 400, which is no reason
    to drop the rest of the reply: the edit or the new message still shows the user the result."""
    try:
        await query.answer(text, **options)
    except BadRequest as exc:
        if "query is too old" not in str(exc) and "query id is invalid" not in str(exc).lower():
            raise
        log.info("a button press could no longer be answered (%s); showing the result all the same", exc)


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
