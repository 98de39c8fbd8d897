"""The served Bot API methods, one small function each, over a bot's state.

BotApi.handlers maps each name of SERVED_METHODS to an async function (bot, typed params) that
returns the result or raises an ApiError as Telegram would: getUpdates with Telegram's long
poll and offset confirmation, webhooks (recorded, never called), messages and photos, edits,
deletions, chat actions, callback answers, commands and files. The core calls it after the spec
has typed the parameters.

Imports constants, errors, media, spec (for the type only), text_formatting and state; never
the core, the server or anything that runs.
"""

import dataclasses
import json
import re
import time
import urllib.parse

from .constants import (CALLBACK_DATA_BYTES, CHAT_ACTIONS, CONFLICT_POLLER, CONFLICT_WEBHOOK,
                        INLINE_BUTTON_ACTIONS, LONG_POLL_MAX_S, MAX_CAPTION_CHARS, MAX_TEXT_CHARS,
                        NOT_MODIFIED, QUERY_TOO_OLD, SERVED_METHODS, WEBHOOK_PORTS)
from .errors import ApiError, bad_request
from .media import URL_PHOTO_SIZE, Upload, image_size
from .spec import Spec
from .state import BotState, Fault, FaultStruck
from .text_formatting import format_text

POLL_ENDINGS = {
    "terminated": lambda: ApiError(409, CONFLICT_POLLER),
    "webhook": lambda: ApiError(409, CONFLICT_WEBHOOK),
    "revoked": lambda: ApiError(401, "Unauthorized"),
}


@dataclasses.dataclass
class Described:
    """A result that Telegram answers with a description too ("Webhook was set")."""

    result: object
    description: str


class BotApi:
    """The served Bot API methods, one small function each, over BotState."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.handlers = {name: getattr(self, name) for name in SERVED_METHODS}

    # -- updates and webhooks --------------------------------------------------------------

    async def getUpdates(self, bot: BotState, p: dict):
        try:
            if bot.webhook is not None:
                raise ApiError(409, CONFLICT_WEBHOOK)
            bot.end_poll("terminated")
            if "allowed_updates" in p:
                bot.allowed_updates = frozenset(p["allowed_updates"])
            bot.confirm(p.get("offset", 0))
            limit = min(max(p.get("limit", 100), 1), 100)
            timeout = min(max(p.get("timeout", 0), 0), LONG_POLL_MAX_S)
            updates = bot.pending(limit)
            if updates or timeout == 0:
                return updates
            reason = await bot.wait_for_update(timeout)
            if isinstance(reason, Fault):   # a fault window opened while the poll waited
                raise FaultStruck(reason)
            if reason in POLL_ENDINGS:
                raise POLL_ENDINGS[reason]()
            return bot.pending(limit)
        finally:
            bot.polled_at = time.monotonic()

    async def setWebhook(self, bot: BotState, p: dict):
        url = p["url"]
        if not url:
            return await self.deleteWebhook(bot, p)
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        if (parsed.port or 443) not in WEBHOOK_PORTS:
            raise bad_request("bad webhook: Webhook can be set up only on ports 80, 88, 443 "
                              "or 8443")
        already = bot.webhook is not None and bot.webhook["url"] == url
        if p.get("drop_pending_updates"):
            bot.updates.clear()
        if "allowed_updates" in p:
            bot.allowed_updates = frozenset(p["allowed_updates"])
        bot.webhook = {"url": url, "has_custom_certificate": "certificate" in p,
                       "max_connections": p.get("max_connections", 40)}
        if "ip_address" in p:
            bot.webhook["ip_address"] = p["ip_address"]
        bot.end_poll("webhook")
        return Described(True, "Webhook is already set" if already else "Webhook was set")

    async def deleteWebhook(self, bot: BotState, p: dict):
        if p.get("drop_pending_updates"):
            bot.updates.clear()
        existed, bot.webhook = bot.webhook is not None, None
        return Described(True, "Webhook was deleted" if existed else "Webhook is already deleted")

    async def getWebhookInfo(self, bot: BotState, p: dict):
        info = {"url": "", "has_custom_certificate": False,
                "pending_update_count": len(bot.updates)}
        if bot.webhook is not None:
            info.update(bot.webhook)
            if bot.allowed_updates:
                info["allowed_updates"] = sorted(bot.allowed_updates)
        return info

    # -- identity and session --------------------------------------------------------------

    async def getMe(self, bot: BotState, p: dict):
        return bot.me

    async def logOut(self, bot: BotState, p: dict):
        bot.updates.clear()
        return True

    async def close(self, bot: BotState, p: dict):
        return True

    # -- messages --------------------------------------------------------------------------

    async def sendMessage(self, bot: BotState, p: dict):
        chat = bot.chat(p["chat_id"])
        text, entities = format_text(p["text"], p.get("parse_mode"), p.get("entities"),
                                     MAX_TEXT_CHARS, "message is too long")
        if not text:
            raise bad_request("message text is empty")
        message = bot.new_message(chat, bot.user, text=text, entities=entities,
                                  reply_to_message=self._replied(bot, chat, p),
                                  reply_markup=inline_markup(p.get("reply_markup")))
        bot.publish(chat["id"], message)
        return message

    async def sendPhoto(self, bot: BotState, p: dict):
        chat = bot.chat(p["chat_id"])
        caption, entities = format_text(p.get("caption", ""), p.get("parse_mode"),
                                        p.get("caption_entities"), MAX_CAPTION_CHARS,
                                        "message caption is too long")
        message = bot.new_message(chat, bot.user, photo=self._photo(bot, p["photo"]),
                                  caption=caption, caption_entities=entities,
                                  show_caption_above_media=p.get("show_caption_above_media"),
                                  has_media_spoiler=p.get("has_spoiler"),
                                  reply_to_message=self._replied(bot, chat, p),
                                  reply_markup=inline_markup(p.get("reply_markup")))
        bot.publish(chat["id"], message)
        return message

    def _photo(self, bot: BotState, photo) -> list[dict]:
        if isinstance(photo, Upload):
            size = image_size(photo.data)
            if size is None:
                raise bad_request("IMAGE_PROCESS_FAILED")
            return bot.photo_sizes(photo.data, *size)
        if photo in bot.photos:
            return bot.photos[photo]
        if urllib.parse.urlsplit(photo).scheme in ("http", "https"):
            return bot.photo_sizes(None, *URL_PHOTO_SIZE)
        raise bad_request("wrong file identifier/HTTP URL specified")

    def _replied(self, bot: BotState, chat: dict, p: dict) -> dict | None:
        reply = p.get("reply_parameters")
        if not reply:
            return None
        target = bot.messages[chat["id"]].get(reply["message_id"])
        if target is None:
            if reply.get("allow_sending_without_reply"):
                return None
            raise bad_request("message to be replied not found")
        return {key: value for key, value in target.items() if key != "reply_to_message"}

    async def editMessageText(self, bot: BotState, p: dict):
        message = self._editable(bot, p)
        if "text" not in message:
            raise bad_request("there is no text in the message to edit")
        text, entities = format_text(p.get("text", ""), p.get("parse_mode"), p.get("entities"),
                                     MAX_TEXT_CHARS, "message is too long")
        if not text:
            raise bad_request("message text is empty")
        return self._apply_edit(bot, message, text=text, entities=entities,
                                reply_markup=inline_markup(p.get("reply_markup")))

    async def editMessageCaption(self, bot: BotState, p: dict):
        message = self._editable(bot, p)
        if "photo" not in message:
            raise bad_request("there is no caption in the message to edit")
        caption, entities = format_text(p.get("caption", ""), p.get("parse_mode"),
                                        p.get("caption_entities"), MAX_CAPTION_CHARS,
                                        "message caption is too long")
        return self._apply_edit(bot, message, caption=caption, caption_entities=entities,
                                reply_markup=inline_markup(p.get("reply_markup")))

    async def editMessageReplyMarkup(self, bot: BotState, p: dict):
        message = self._editable(bot, p)
        return self._apply_edit(bot, message, reply_markup=inline_markup(p.get("reply_markup")))

    def _editable(self, bot: BotState, p: dict) -> dict:
        if "inline_message_id" in p:
            raise bad_request("MESSAGE_ID_INVALID")
        if "chat_id" not in p:
            raise bad_request("chat_id is empty")
        chat = bot.chat(p["chat_id"])
        if "message_id" not in p:
            raise bad_request("message identifier is not specified")
        message = bot.messages[chat["id"]].get(p["message_id"])
        if message is None:
            raise bad_request("message to edit not found")
        if message["from"]["id"] != bot.bot_id:
            raise bad_request("message can't be edited")
        return message

    def _apply_edit(self, bot: BotState, message: dict, **changes) -> dict:
        """Replaces the given fields (an empty value removes one), unless nothing changes."""
        if all(message.get(key) == (value or None) for key, value in changes.items()):
            raise bad_request(NOT_MODIFIED)
        for key, value in changes.items():
            if value:
                message[key] = value
            else:
                message.pop(key, None)
        message["edit_date"] = int(time.time())
        bot.publish(message["chat"]["id"], message, edited=True)
        return message

    async def deleteMessage(self, bot: BotState, p: dict):
        chat = bot.chat(p["chat_id"])
        message = bot.messages[chat["id"]].pop(p["message_id"], None)
        if message is None:
            raise bad_request("message to delete not found")
        if message["from"]["id"] == bot.bot_id:
            bot.publish(chat["id"], message, deleted=True)
        return True

    async def sendChatAction(self, bot: BotState, p: dict):
        bot.chat(p["chat_id"])
        if p["action"] not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        return True

    # -- callback queries ------------------------------------------------------------------

    async def answerCallbackQuery(self, bot: BotState, p: dict):
        query_id = p["callback_query_id"]
        if bot.callback_answers.get(query_id, True) is not None:
            raise bad_request(QUERY_TOO_OLD)
        bot.callback_answers[query_id] = {key: p[key] for key in
                                          ("text", "show_alert", "url", "cache_time") if key in p}
        return True

    # -- commands --------------------------------------------------------------------------

    async def setMyCommands(self, bot: BotState, p: dict):
        commands = p["commands"]
        if len(commands) > 100:
            raise bad_request("BOT_COMMANDS_TOO_MUCH")
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", command["command"]):
                raise bad_request("BOT_COMMAND_INVALID")
            if not 1 <= len(command["description"]) <= 256:
                raise bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        bot.commands[_commands_key(p)] = commands
        return True

    async def getMyCommands(self, bot: BotState, p: dict):
        return bot.commands.get(_commands_key(p), [])

    async def deleteMyCommands(self, bot: BotState, p: dict):
        bot.commands.pop(_commands_key(p), None)
        return True

    # -- files -----------------------------------------------------------------------------

    async def getFile(self, bot: BotState, p: dict):
        stored = bot.files.get(p["file_id"])
        if stored is None:
            raise bad_request("invalid file_id")
        result = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id}
        if stored.data is not None:
            result.update(file_size=len(stored.data), file_path=stored.path)
        return result


def _commands_key(p: dict) -> str:
    scope = p.get("scope") or {"type": "default"}
    return json.dumps([scope, p.get("language_code", "")], sort_keys=True)


def inline_markup(markup: dict | None) -> dict | None:
    """The inline keyboard a message keeps (other markups are not part of a Message)."""
    if not markup or "inline_keyboard" not in markup:
        return None
    for row in markup["inline_keyboard"]:
        for button in row:
            _check_button(button)
    return markup if any(markup["inline_keyboard"]) else None


def _check_button(button: dict) -> None:
    actions = [key for key in INLINE_BUTTON_ACTIONS if key in button]
    if not actions:
        raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in "
                          "the inline keyboard")
    if "callback_data" in button and (
            len(button["callback_data"].encode("utf-8")) not in CALLBACK_DATA_BYTES):
        raise bad_request("BUTTON_DATA_INVALID")
