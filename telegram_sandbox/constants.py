"""Telegram's names, limits and wording that the rest of the sandbox shares.

The served Bot API methods, the shape of a token, the limits Telegram enforces (text length,
callback data, long-poll cap, ...) and the descriptions of its errors, word for word; how a bot
is named (bot_username) and what of a token may be logged (bot_id_of).

Imported by every other module of the package, the terminal chat included, so it stays a leaf:
it imports only `re` and nothing of the package.
"""

import re

TOKEN_RE = re.compile(r"^(\d+):([A-Za-z0-9_-]+)$")

SERVED_METHODS = (
    "getMe", "getUpdates", "sendMessage", "sendPhoto", "editMessageText",
    "editMessageReplyMarkup", "editMessageCaption", "answerCallbackQuery", "deleteMessage",
    "sendChatAction", "setMyCommands", "getMyCommands", "deleteMyCommands", "setWebhook",
    "deleteWebhook", "getWebhookInfo", "getFile", "logOut", "close",
)

MAX_TEXT_CHARS = 4096
MAX_CAPTION_CHARS = 1024
CALLBACK_DATA_BYTES = range(1, 65)
LONG_POLL_MAX_S = 50
WEBHOOK_PORTS = (80, 88, 443, 8443)
DEFAULT_EXCLUDED_UPDATES = frozenset({"chat_member", "message_reaction", "message_reaction_count"})
CHAT_ACTIONS = frozenset({
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note",
    "upload_video_note",
})
INLINE_BUTTON_ACTIONS = (
    "url", "callback_data", "web_app", "login_url", "switch_inline_query",
    "switch_inline_query_current_chat", "switch_inline_query_chosen_chat", "copy_text",
    "callback_game", "pay",
)

NOT_MODIFIED = ("message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message")
CONFLICT_POLLER = ("Conflict: terminated by other getUpdates request; make sure that only one "
                   "bot instance is running")
CONFLICT_WEBHOOK = ("Conflict: can't use getUpdates method while webhook is active; use "
                    "deleteWebhook to delete the webhook first")
QUERY_TOO_OLD = "query is too old and response timeout expired or query ID is invalid"


def bot_id_of(token: str) -> str:
    """What may be logged about a token: the digits of the bot id before the colon."""
    match = re.match(r"\d{1,20}(?=:)", token)
    return match.group() if match else "?"


def bot_username(bot_id: int) -> str:
    """The username the sandbox gives a bot (getMe), derived from its id."""
    return f"sandbox_{bot_id}_bot"
