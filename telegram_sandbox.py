"""Telegram sandbox: a local emulator of the Telegram Bot API, plus a user side.

DIMS runs offline with it: the demo, the tests and the fleet benchmarks point
python-telegram-bot at this server (TELEGRAM_API_URL = Sandbox.api_url) instead of
api.telegram.org, and act as Telegram users through the /sandbox/* routes.

- Bot API at /bot{token}/{method} (query string, form, JSON and multipart bodies, method names
  case-insensitive) and files at /file/bot{token}/{path}. Parameters are checked against an
  extract of the Bot API spec (telegram_sandbox_spec.json, made by
  tools/extract_bot_api_spec.py); errors carry Telegram's own status codes and descriptions.
- getUpdates as Telegram: updates stay until a later call's offset confirms them, long polls
  (capped at 50 s) answer as soon as an update arrives, allowed_updates is remembered, and a
  newer poller terminates the older one with 409 (the newer request wins, as on Telegram).
- The user side (/sandbox/send, press, messages, fault, calls, revoke, health) and its clients:
  SandboxClient (urllib, works across processes), Sandbox (server in a background thread),
  SandboxProcess (server in a child process), chat() (a terminal chat as a user).

Callers: tests, bench/, the offline demo (main.py) and the operator CLI's `chat` command.
It must import nothing from DIMS and no third-party package: the standard library only, so it
runs from a bare clone. It never logs a full token, only the bot id.

Deviations from Telegram, on purpose: a token not of Telegram's shape is answered 401
Unauthorized (Telegram says 404 Not Found; python-telegram-bot raises InvalidToken for both);
a bot id belongs to the first secret seen with it, so another secret is 401 as on Telegram;
parameters of the wrong type are refused (Telegram coerces most); spec methods the sandbox
does not serve answer 501; webhooks are recorded but never called; photos sent by URL are
not fetched (offline); only bot_command entities are detected in plain text; no flood limits
unless injected with /sandbox/fault; everything is kept in memory until the process ends.
"""

import argparse
import asyncio
import collections
import dataclasses
import http
import ipaddress
import itertools
import json
import logging
import os
import pathlib
import queue
import re
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

LOG = logging.getLogger("telegram_sandbox")

# =============================================================================
# Constants and errors
# =============================================================================

SPEC_PATH = pathlib.Path(__file__).resolve().with_name("telegram_sandbox_spec.json")
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
MESSAGES_WAIT_MAX_S = 60
MAX_BODY_BYTES = 50 * 1024 * 1024
CALL_LOG_LIMIT = 10_000
MAX_FAULT_TIMES = 10_000
MAX_FAULT_DELAY_S = 300
WEBHOOK_PORTS = (80, 88, 443, 8443)
PHOTO_SIDES = (90, 320, 800, 1280)
PHOTO_MAX_SIDE = 2560
URL_PHOTO_SIZE = (800, 600)
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


class ApiError(Exception):
    """A Bot API error answer: {"ok": false, "error_code", "description", "parameters"}."""

    def __init__(self, code: int, description: str, parameters: dict | None = None):
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters

    def body(self) -> dict:
        body = {"ok": False, "error_code": self.code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def bad_request(detail: str) -> ApiError:
    return ApiError(400, f"Bad Request: {detail}")


def too_many_requests(retry_after: int) -> ApiError:
    return ApiError(429, f"Too Many Requests: retry after {retry_after}",
                    {"retry_after": retry_after})


def bot_id_of(token: str) -> str:
    """What may be logged about a token: the digits of the bot id before the colon."""
    match = re.match(r"\d{1,20}(?=:)", token)
    return match.group() if match else "?"


# =============================================================================
# The spec: parsing and checking method parameters
# =============================================================================

SCALARS = frozenset({"Integer", "Float", "Boolean", "String", "True", "InputFile"})
INTEGER_RE = re.compile(r"-?\d+")
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
EMPTY_IS_A_VALUE = {("setWebhook", "url")}
MISSING_DESCRIPTIONS = {
    "chat_id": "chat_id is empty",
    "text": "message text is empty",
    "photo": "there is no photo in the request",
}


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file sent in a multipart body."""

    filename: str
    content_type: str
    data: bytes


class ShapeError(Exception):
    """A JSON value that does not fit its spec type (the message says where)."""


class Spec:
    """The Bot API spec extract: which methods exist and what their parameters must be."""

    def __init__(self, data: dict):
        self.version = data.get("version", "")
        self.methods: dict[str, dict] = data["methods"]
        self.types: dict[str, dict] = data["types"]
        every_method = [*self.methods, *data.get("other_methods", [])]
        self._by_lower = {name.lower(): name for name in every_method}

    @classmethod
    def load(cls, path: pathlib.Path = SPEC_PATH) -> "Spec":
        return cls(json.loads(path.read_text(encoding="utf-8")))

    def canonical(self, method: str) -> str | None:
        """The spec's spelling of a case-insensitive method name, if the spec has it."""
        return self._by_lower.get(method.lower())

    def parse_params(self, method: str, raw: dict) -> dict:
        """Typed parameters from raw text values and uploads; ApiError when they don't fit."""
        params = {}
        for field in self.methods[method].get("fields", []):
            name = field["name"]
            value = raw.get(name)
            if value == "" and (method, name) in EMPTY_IS_A_VALUE:
                params[name] = ""
                continue
            if value is None or value == "":
                if field["required"]:
                    raise bad_request(MISSING_DESCRIPTIONS.get(name, f'parameter "{name}" is required'))
                continue
            params[name] = self._parse_argument(name, field["types"], value, raw)
        return params

    def _parse_argument(self, name: str, types: list[str], value, raw: dict):
        if isinstance(value, Upload):
            if "InputFile" in types:
                return value
            raise bad_request(f'parameter "{name}" must be {" or ".join(types)}, not a file')
        for type_name in types:
            parsed = _scalar_from_text(type_name, value, raw)
            if parsed is not None:
                return parsed
        complex_types = [t for t in types if t not in SCALARS]
        if not complex_types:
            raise bad_request(f'parameter "{name}" must be of type {" or ".join(types)}')
        label = "reply keyboard markup" if name == "reply_markup" else name.replace("_", " ")
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            raise bad_request(f"can't parse {label} JSON object") from None
        try:
            return self.check(decoded, complex_types)
        except ShapeError as err:
            raise bad_request(f"can't parse {label}: {err}") from None
        except RecursionError:
            raise bad_request(f"can't parse {label}: too deeply nested") from None

    def check(self, value, types: list[str]):
        """The value normalised to the first of types it fits; ShapeError if it fits none."""
        for type_name in types:
            if self._fits(value, type_name):
                return self._check_one(value, type_name)
        objects = [t for t in types if t in self.types and not self.types[t].get("subtypes")]
        if isinstance(value, dict) and len(objects) == 1:
            return self._check_object(value, objects[0], self.types[objects[0]])
        raise ShapeError(f"expected {' or '.join(types)}, got {_json_kind(value)}")

    def _fits(self, value, type_name: str) -> bool:
        if type_name.startswith("Array of "):
            return isinstance(value, list)
        if isinstance(value, str) and type_name in ("Integer", "Float"):
            return INTEGER_RE.fullmatch(value) is not None
        if type_name == "Integer":
            return isinstance(value, int) and not isinstance(value, bool)
        if type_name == "Float":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if type_name in ("Boolean", "True"):
            return isinstance(value, bool)
        if type_name == "String":
            return isinstance(value, (str, int, float)) and not isinstance(value, bool)
        entry = self.types.get(type_name)
        if entry is None or not isinstance(value, dict):
            return entry is None
        if entry.get("subtypes"):
            return self._subtype_for(value, entry) is not None
        return all(f["name"] in value for f in entry["fields"] if f["required"])

    def _check_one(self, value, type_name: str):
        if type_name.startswith("Array of "):
            item_type = type_name[len("Array of "):]
            return [self.check(item, [item_type]) for item in value]
        if type_name == "Integer":
            return int(value)
        if type_name == "Float":
            return float(value)
        if type_name == "String":
            return value if isinstance(value, str) else json.dumps(value)
        entry = self.types.get(type_name)
        if entry is None or type_name in SCALARS:
            return value
        if entry.get("subtypes"):
            return self._check_one(value, self._subtype_for(value, entry))
        return self._check_object(value, type_name, entry)

    def _check_object(self, value: dict, type_name: str, entry: dict) -> dict:
        out = {}
        for field in entry["fields"]:
            name = field["name"]
            if value.get(name) is None:
                if field["required"]:
                    raise ShapeError(f'field "{name}" of {type_name} is required')
                continue
            if "const" in field and value[name] != field["const"]:
                raise ShapeError(f'field "{name}" of {type_name} must be "{field["const"]}"')
            try:
                out[name] = self.check(value[name], field["types"])
            except ShapeError as err:
                raise ShapeError(f'field "{name}" of {type_name}: {err}') from None
        return out

    def _subtype_for(self, value: dict, entry: dict) -> str | None:
        for subtype in entry["subtypes"]:
            fields = self.types[subtype]["fields"]
            consts = [f for f in fields if "const" in f]
            if consts and all(value.get(f["name"]) == f["const"] for f in consts):
                return subtype
            if not consts and all(f["name"] in value for f in fields if f["required"]):
                return subtype
        return None


def _scalar_from_text(type_name: str, text: str, raw: dict):
    """A top-level text value as type_name, or None if it is not one."""
    if type_name == "String":
        return text
    if type_name == "Integer" and INTEGER_RE.fullmatch(text.strip()):
        return int(text)
    if type_name == "Float":
        try:
            return float(text)
        except ValueError:
            return None
    if type_name in ("Boolean", "True"):
        return BOOLEANS.get(text.strip().lower())
    if type_name == "InputFile" and text.startswith("attach://"):
        attached = raw.get(text[len("attach://"):])
        return attached if isinstance(attached, Upload) else None
    return None


def _json_kind(value) -> str:
    kinds = {bool: "Boolean", int: "Integer", float: "Float", str: "String", list: "Array",
             dict: "Object"}
    return kinds.get(type(value), "null")


# =============================================================================
# Text: UTF-16 offsets, bot commands, parse modes
# =============================================================================

COMMAND_RE = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,64}(?:@[A-Za-z0-9_]{3,32})?(?![A-Za-z0-9_@])")
MARKDOWN_V2_RESERVED = frozenset("_*[]()~`>#+-=|{}.!")


class ParseError(Exception):
    """Text that its parse_mode cannot parse (Telegram's "can't parse entities: ...")."""


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def command_entities(text: str) -> list[dict]:
    """bot_command entities for /commands in text, offsets in UTF-16 code units."""
    return [{"type": "bot_command", "offset": utf16_len(text[:m.start()]),
             "length": utf16_len(m.group())} for m in COMMAND_RE.finditer(text)]


class _EntityBuilder:
    """Accumulates output text and entities while a parse-mode parser walks its input."""

    def __init__(self, source: str):
        self.source = source
        self.parts: list[str] = []
        self.position = 0
        self.entities: list[dict] = []

    def add(self, text: str) -> None:
        self.parts.append(text)
        self.position += utf16_len(text)

    def close(self, entity: dict, start: int) -> None:
        if self.position > start:
            self.entities.append({**entity, "offset": start, "length": self.position - start})

    def byte_offset(self, index: int) -> int:
        return len(self.source[:index].encode("utf-8"))

    def result(self) -> tuple[str, list[dict]]:
        return "".join(self.parts), self.entities


HTML_TAG_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9-]*)((?:\s+[^>]*)?)\s*/?>")
HTML_ATTR_RE = re.compile(r"([A-Za-z][\w-]*)(?:\s*=\s*(?:\"([^\"]*)\"|'([^']*)'|([^\s\"'>]+)))?")
HTML_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
HTML_ENTITY_RE = re.compile(r"&(#x[0-9A-Fa-f]+|#[0-9]+|[A-Za-z]+);")
HTML_SIMPLE_TAGS = {
    "b": "bold", "strong": "bold", "i": "italic", "em": "italic", "u": "underline",
    "ins": "underline", "s": "strikethrough", "strike": "strikethrough",
    "del": "strikethrough", "tg-spoiler": "spoiler", "code": "code", "pre": "pre",
}


def parse_html(source: str) -> tuple[str, list[dict]]:
    """Telegram's HTML parse mode: text without tags, and the entities the tags made."""
    out = _EntityBuilder(source)
    stack: list[tuple[str, dict | None, int]] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char == "&":
            match = HTML_ENTITY_RE.match(source, index)
            decoded = _html_entity(match) if match else None
            out.add("&" if decoded is None else decoded)
            index = index + 1 if decoded is None else match.end()
            continue
        if char != "<":
            end = min((i for i in (source.find("<", index), source.find("&", index)) if i >= 0),
                      default=len(source))
            out.add(source[index:end])
            index = end
            continue
        match = HTML_TAG_RE.match(source, index)
        if not match:
            raise ParseError(f'Unsupported start tag "" at byte offset {out.byte_offset(index)}')
        closing, tag, attrs = match.group(1) == "/", match.group(2).lower(), match.group(3)
        if closing:
            _close_html_tag(out, stack, tag, index)
        else:
            stack.append((tag, _html_entity_for(tag, attrs, stack, out.byte_offset(index)),
                          out.position))
        index = match.end()
    if stack:
        raise ParseError(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return out.result()


def _html_entity(match: re.Match) -> str | None:
    """The character an HTML entity stands for; None for names Telegram does not know."""
    name = match.group(1)
    try:
        if name.startswith("#x"):
            return chr(int(name[2:], 16))
        if name.startswith("#"):
            return chr(int(name[1:]))
    except (ValueError, OverflowError):
        return None
    return HTML_NAMED.get(name)


def _html_entity_for(tag: str, attrs: str, stack: list, byte_offset: int) -> dict | None:
    attributes = {m.group(1).lower(): next((g for g in m.groups()[1:] if g is not None), "")
                  for m in HTML_ATTR_RE.finditer(attrs)}
    if tag in HTML_SIMPLE_TAGS:
        entity = {"type": HTML_SIMPLE_TAGS[tag]}
        language = attributes.get("class", "")
        if tag == "code" and stack and stack[-1][0] == "pre" and language.startswith("language-"):
            stack[-1][1]["language"] = language[len("language-"):]
            return None
        return entity
    if tag == "span":
        if attributes.get("class") != "tg-spoiler":
            raise ParseError('Tag "span" must have class "tg-spoiler"')
        return {"type": "spoiler"}
    if tag == "a":
        url = attributes.get("href", "")
        user = re.fullmatch(r"tg://user\?id=(\d+)", url)
        if user:
            return {"type": "text_mention", "user": {"id": int(user.group(1)), "is_bot": False,
                                                     "first_name": ""}}
        return {"type": "text_link", "url": url} if url else None
    if tag == "blockquote":
        return {"type": "expandable_blockquote" if "expandable" in attributes else "blockquote"}
    if tag == "tg-emoji":
        return {"type": "custom_emoji", "custom_emoji_id": attributes.get("emoji-id", "")}
    raise ParseError(f'Unsupported start tag "{tag}" at byte offset {byte_offset}')


def _close_html_tag(out: _EntityBuilder, stack: list, tag: str, index: int) -> None:
    if not stack:
        raise ParseError(f"Unexpected end tag at byte offset {out.byte_offset(index)}")
    open_tag, entity, start = stack.pop()
    if open_tag != tag:
        raise ParseError(f'Unmatched end tag at byte offset {out.byte_offset(index)}, '
                         f'expected "</{open_tag}>", found "</{tag}>"')
    if entity is not None:
        out.close(entity, start)


MARKDOWN_V2_MARKERS = {"*": "bold", "_": "italic", "__": "underline", "~": "strikethrough",
                       "||": "spoiler"}
ENTITY_NAMES = {"bold": "Bold", "italic": "Italic", "underline": "Underline",
                "strikethrough": "Strikethrough", "spoiler": "Spoiler", "text_link": "TextUrl",
                "code": "Code", "pre": "Pre"}


def parse_markdown_v2(source: str) -> tuple[str, list[dict]]:
    """Telegram's MarkdownV2: reserved characters must be escaped, entities must close."""
    out = _EntityBuilder(source)
    stack: list[tuple[str, int, int]] = []  # (marker, output start, source index)
    index = 0
    while index < len(source):
        char = source[index]
        if char == "\\" and index + 1 < len(source) and 0 < ord(source[index + 1]) <= 126:
            out.add(source[index + 1])
            index += 2
        elif char == "`":
            index = _markdown_code(out, source, index, escapes=True)
        elif source.startswith(("__", "||"), index) or char in "*_~":
            marker = source[index:index + 2] if source.startswith(("__", "||"), index) else char
            _toggle_marker(out, stack, marker, index)
            index += len(marker)
        elif char == "[":
            stack.append(("[", out.position, index))
            index += 1
        elif char == "]" and stack and stack[-1][0] == "[":
            index = _markdown_link(out, stack, source, index + 1, escapes=True)
        elif char == ">" and (index == 0 or source[index - 1] == "\n"):
            end = source.find("\n", index)
            line_end = len(source) if end < 0 else end
            text, entities = parse_markdown_v2(source[index + 1:line_end])
            base = out.position
            out.entities += [{**e, "offset": e["offset"] + base} for e in entities]
            out.add(text)
            out.close({"type": "blockquote"}, base)
            index = line_end
        elif char in MARKDOWN_V2_RESERVED:
            raise ParseError(f"Character '{char}' is reserved and must be escaped with the "
                             f"preceding '\\'")
        else:
            out.add(char)
            index += 1
    if stack:
        marker, _, where = stack[-1]
        kind = "text_link" if marker == "[" else MARKDOWN_V2_MARKERS[marker]
        raise ParseError(f"Can't find end of {ENTITY_NAMES[kind]} entity at byte offset "
                         f"{out.byte_offset(where)}")
    return out.result()


def _toggle_marker(out: _EntityBuilder, stack: list, marker: str, index: int) -> None:
    open_markers = [entry[0] for entry in stack]
    if marker in open_markers:
        position = len(open_markers) - 1 - open_markers[::-1].index(marker)
        _, start, _ = stack.pop(position)
        out.close({"type": MARKDOWN_V2_MARKERS[marker]}, start)
    else:
        stack.append((marker, out.position, index))


def _markdown_code(out: _EntityBuilder, source: str, index: int, escapes: bool) -> int:
    """Inline `code` or a ```pre``` block starting at index; returns the index after it."""
    fence = "```" if source.startswith("```", index) else "`"
    body_start = index + len(fence)
    end = body_start
    while True:
        end = source.find(fence, end)
        if end < 0:
            kind = "Pre" if fence == "```" else "Code"
            raise ParseError(f"Can't find end of {kind} entity at byte offset "
                             f"{out.byte_offset(index)}")
        if not (escapes and _escaped(source, end, body_start)):
            break
        end += 1
    body = source[body_start:end]
    entity = {"type": "pre" if fence == "```" else "code"}
    if fence == "```":
        first_line, newline, rest = body.partition("\n")
        if newline and first_line and not any(c.isspace() for c in first_line):
            entity["language"], body = first_line, rest
    if escapes:
        body = re.sub(r"\\(.)", r"\1", body, flags=re.DOTALL)
    start = out.position
    out.add(body)
    out.close(entity, start)
    return end + len(fence)


def _escaped(source: str, index: int, floor: int) -> bool:
    backslashes = 0
    while index - 1 - backslashes >= floor and source[index - 1 - backslashes] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def _markdown_link(out: _EntityBuilder, stack: list, source: str, index: int,
                   escapes: bool) -> int:
    """Closes the [text] on top of the stack; a following (url) makes it a text_link."""
    _, start, where = stack.pop()
    if not source.startswith("(", index):
        return index
    end = index + 1
    while True:
        end = source.find(")", end)
        if end < 0:
            raise ParseError(f"Can't find end of a URL at byte offset {out.byte_offset(where)}")
        if not (escapes and _escaped(source, end, index)):
            break
        end += 1
    url = source[index + 1:end]
    if escapes:
        url = re.sub(r"\\(.)", r"\1", url)
    out.close({"type": "text_link", "url": url}, start)
    return end + 1


def parse_markdown(source: str) -> tuple[str, list[dict]]:
    """Telegram's legacy Markdown: *bold* _italic_ `code` ```pre``` [text](url), no nesting."""
    out = _EntityBuilder(source)
    index = 0
    markers = {"*": "bold", "_": "italic"}
    while index < len(source):
        char = source[index]
        if char == "\\" and index + 1 < len(source) and source[index + 1] in "_*`[":
            out.add(source[index + 1])
            index += 2
        elif char == "`":
            index = _markdown_code(out, source, index, escapes=False)
        elif char in markers:
            end = source.find(char, index + 1)
            if end < 0:
                raise ParseError("Can't find end of the entity starting at byte offset "
                                 f"{out.byte_offset(index)}")
            start = out.position
            out.add(source[index + 1:end])
            out.close({"type": markers[char]}, start)
            index = end + 1
        elif char == "[":
            end = source.find("]", index + 1)
            if end < 0:
                raise ParseError("Can't find end of the entity starting at byte offset "
                                 f"{out.byte_offset(index)}")
            stack = [("[", out.position, index)]
            out.add(source[index + 1:end])
            index = _markdown_link(out, stack, source, end + 1, escapes=False)
        else:
            out.add(char)
            index += 1
    return out.result()


PARSE_MODES = {"html": parse_html, "markdownv2": parse_markdown_v2, "markdown": parse_markdown}


def format_text(text: str, parse_mode: str | None, entities: list | None, limit: int,
                too_long: str) -> tuple[str, list[dict]]:
    """Text and entities as Telegram stores them: parsed, trimmed, commands marked, checked."""
    if parse_mode:
        parser = PARSE_MODES.get(parse_mode.lower())
        if parser is None:
            raise bad_request("unsupported parse_mode")
        try:
            text, entities = parser(text)
        except ParseError as err:
            raise bad_request(f"can't parse entities: {err}") from None
    text, entities = _trim(text, list(entities or []))
    taken = [(e["offset"], e["offset"] + e["length"]) for e in entities]
    entities += [c for c in command_entities(text)
                 if all(c["offset"] >= end or c["offset"] + c["length"] <= start
                        for start, end in taken)]
    if len(text) > limit:
        raise bad_request(too_long)
    return text, sorted(entities, key=lambda e: (e["offset"], -e["length"]))


def _trim(text: str, entities: list[dict]) -> tuple[str, list[dict]]:
    entities = [e for e in entities if e["offset"] >= 0 and e["length"] > 0]
    stripped = text.strip()
    if stripped == text:
        return text, [e for e in entities if e["offset"] + e["length"] <= utf16_len(text)]
    lead = utf16_len(text[:len(text) - len(text.lstrip())])
    size = utf16_len(stripped)
    trimmed = []
    for entity in entities:
        start = max(entity["offset"] - lead, 0)
        end = min(entity["offset"] + entity["length"] - lead, size)
        if end > start:
            trimmed.append({**entity, "offset": start, "length": end - start})
    return stripped, trimmed


# =============================================================================
# Files and images
# =============================================================================

@dataclasses.dataclass
class StoredFile:
    """A file the sandbox keeps for a bot; data is None for photos sent by URL."""

    file_id: str
    file_unique_id: str
    data: bytes | None
    path: str | None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, GIF or JPEG image, None if it is none of them."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    index = 2
    while index + 9 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[index + 5:index + 9])
            return width, height
        (length,) = struct.unpack(">H", data[index + 2:index + 4])
        index += 2 + length
    return None


def scaled_sides(width: int, height: int) -> list[tuple[int, int]]:
    """The sizes Telegram keeps of a photo: thumbnails under each side limit, then the photo."""
    longest = max(width, height)
    sides = [side for side in PHOTO_SIDES if side < longest] + [min(longest, PHOTO_MAX_SIDE)]
    return [(max(1, round(width * side / longest)), max(1, round(height * side / longest)))
            for side in sides]


# =============================================================================
# Bot state
# =============================================================================

@dataclasses.dataclass
class Fault:
    """An injected failure for the next call of a method."""

    status: int
    retry_after: int | None = None
    description: str | None = None
    delay: float = 0.0

    @property
    def disconnects(self) -> bool:
        return self.status == 0

    def error(self) -> ApiError:
        if self.status == 429:
            return too_many_requests(self.retry_after or 1)
        default = {400: "Bad Request: injected fault", 401: "Unauthorized",
                   403: "Forbidden: bot was blocked by the user", 404: "Not Found",
                   409: CONFLICT_POLLER}
        description = self.description or default.get(
            self.status, f"{_reason(self.status)}: injected fault")
        parameters = {"retry_after": self.retry_after} if self.retry_after else None
        return ApiError(self.status, description, parameters)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class BotState:
    """Everything the sandbox knows about one bot; touched only on the server's loop."""

    def __init__(self, bot_id: int, secret: str):
        self.bot_id = bot_id
        self.secret = secret
        self.revoked = False
        self.user = {"id": bot_id, "is_bot": True, "first_name": f"Sandbox {bot_id}",
                     "username": bot_username(bot_id)}
        self.me = {**self.user, "can_join_groups": True, "can_read_all_group_messages": False,
                   "supports_inline_queries": False, "can_connect_to_business": False,
                   "has_main_web_app": False}
        self.updates: collections.deque[dict] = collections.deque()
        self.next_update_id = 1
        self.allowed_updates: frozenset[str] | None = None
        self.webhook: dict | None = None
        self.poller: asyncio.Future | None = None
        self.commands: dict[str, list[dict]] = {}
        self.chats: dict[int, dict] = {}
        self.messages: dict[int, dict[int, dict]] = {}
        self.next_message_id: dict[int, int] = {}
        self.files: dict[str, StoredFile] = {}
        self.file_paths: dict[str, StoredFile] = {}
        self.photos: dict[str, list[dict]] = {}
        self.callback_answers: dict[str, dict | None] = {}  # query id -> the bot's answer
        self.seq = 0
        self.outbox: dict[int, list[dict]] = {}
        self.sent_seq: dict[tuple[int, int], int] = {}  # (chat, message id) -> seq at its send
        self.outbox_waiters: dict[int, set[asyncio.Future]] = {}
        self.faults: dict[str, collections.deque[Fault]] = {}
        self.calls: collections.deque[dict] = collections.deque(maxlen=CALL_LOG_LIMIT)

    # -- updates ---------------------------------------------------------------------------

    def accepts(self, kind: str) -> bool:
        allowed = self.allowed_updates
        return kind not in DEFAULT_EXCLUDED_UPDATES if not allowed else kind in allowed

    def add_update(self, kind: str, payload: dict) -> int | None:
        """Queues an update unless allowed_updates filters it out; wakes the long poll."""
        if not self.accepts(kind):
            return None
        update_id = self.next_update_id
        self.next_update_id += 1
        self.updates.append({"update_id": update_id, kind: payload})
        self.end_poll("update")
        return update_id

    def confirm(self, offset: int) -> None:
        """offset > 0 confirms every update below it; offset < 0 keeps only the last -offset."""
        if offset > 0:
            while self.updates and self.updates[0]["update_id"] < offset:
                self.updates.popleft()
        elif offset < 0:
            while len(self.updates) > -offset:
                self.updates.popleft()

    def pending(self, limit: int) -> list[dict]:
        return list(itertools.islice(self.updates, limit))

    async def wait_for_update(self, timeout: float) -> str:
        """Why the long poll ended: "update", "timeout", "terminated" or "webhook"."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.poller = waiter
        timer = loop.call_later(timeout, _settle, waiter, "timeout")
        try:
            return await waiter
        finally:
            timer.cancel()
            if self.poller is waiter:
                self.poller = None

    def end_poll(self, reason: str) -> None:
        """Answers the long poll in progress, if any: see POLL_ENDINGS for the reasons."""
        if self.poller is not None:
            _settle(self.poller, reason)
            self.poller = None

    # -- chats and messages ----------------------------------------------------------------

    def chat(self, chat_id) -> dict:
        """A chat the bot may write to: one whose user has written to the bot."""
        chat = self.chats.get(chat_id) if isinstance(chat_id, int) else None
        if chat is None:
            raise bad_request("chat not found")
        return chat

    def open_private_chat(self, user: dict) -> dict:
        chat = {"id": user["id"], "type": "private", "first_name": user["first_name"]}
        for key in ("last_name", "username"):
            if key in user:
                chat[key] = user[key]
        self.chats[user["id"]] = chat
        self.messages.setdefault(user["id"], {})
        return chat

    def new_message(self, chat: dict, sender: dict, **content) -> dict:
        chat_id = chat["id"]
        message_id = self.next_message_id.get(chat_id, 1)
        self.next_message_id[chat_id] = message_id + 1
        message = {"message_id": message_id, "from": sender, "chat": chat,
                   "date": int(time.time())}
        message.update({key: value for key, value in content.items() if value})
        self.messages[chat_id][message_id] = message
        self.sent_seq[chat_id, message_id] = self.seq  # publish() moves it to a bot's send
        return message

    def publish(self, chat_id: int, message: dict, edited: bool = False,
                deleted: bool = False) -> dict:
        """Records what the bot did in a chat for /sandbox/messages and wakes its waiters."""
        self.seq += 1
        event = {key: value for key, value in message.items() if key not in ("chat", "from")}
        event.update({"seq": self.seq, "chat_id": chat_id, "edited": edited, "deleted": deleted,
                      "text": message.get("text"), "reply_markup": message.get("reply_markup")})
        self.outbox.setdefault(chat_id, []).append(event)
        if not edited and not deleted:
            self.sent_seq[chat_id, message["message_id"]] = self.seq
        for waiter in self.outbox_waiters.pop(chat_id, ()):
            _settle(waiter, True)
        return event

    def outbox_after(self, chat_id: int, after: int, after_seq: int | None) -> list[dict]:
        """The chat's outbox events (sends, edits, deletions) that happened after message
        `after` was sent and after event `after_seq`, oldest first.

        So an edit of message `after`, or of an earlier message, made after `after` was sent
        counts. after <= 0 means from the start; a deleted message still counts from its send;
        an id the chat has not reached yet selects nothing until that message exists.
        """
        if after >= self.next_message_id.get(chat_id, 1):
            return []
        since = max(self.sent_seq.get((chat_id, after), 0), after_seq or 0)
        events = self.outbox.get(chat_id, [])
        start = len(events)
        while start > 0 and events[start - 1]["seq"] > since:
            start -= 1
        return events[start:]

    async def wait_for_outbox(self, chat_id: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self.outbox_waiters.setdefault(chat_id, set()).add(waiter)
        timer = loop.call_later(timeout, _settle, waiter, False)
        try:
            await waiter
        finally:
            timer.cancel()
            self.outbox_waiters.get(chat_id, set()).discard(waiter)

    # -- files -----------------------------------------------------------------------------

    def store_file(self, data: bytes | None, extension: str) -> StoredFile:
        number = len(self.files)
        path = f"photos/file_{number}.{extension}" if data is not None else None
        stored = StoredFile(file_id="AgACAgIAAxk" + secrets.token_urlsafe(24),
                            file_unique_id="AQAD" + secrets.token_urlsafe(9), data=data,
                            path=path)
        self.files[stored.file_id] = stored
        if path is not None:
            self.file_paths[path] = stored
        return stored

    def photo_sizes(self, data: bytes | None, width: int, height: int) -> list[dict]:
        """PhotoSize objects for a new photo; every size serves the original bytes."""
        sizes = []
        for size_width, size_height in scaled_sides(width, height):
            stored = self.store_file(data, "jpg")
            size = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                    "width": size_width, "height": size_height}
            sizes.append(size)
        if data is not None:
            sizes[-1]["file_size"] = len(data)
        for size in sizes:
            self.photos[size["file_id"]] = sizes
        return sizes

    # -- faults ----------------------------------------------------------------------------

    def take_fault(self, method: str) -> Fault | None:
        for key in (method, "*"):
            faults = self.faults.get(key)
            if faults:
                return faults.popleft()
        return None


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def bot_username(bot_id: int) -> str:
    return f"sandbox_{bot_id}_bot"


# =============================================================================
# Bot API methods
# =============================================================================

POLL_ENDINGS = {
    "terminated": lambda: ApiError(409, CONFLICT_POLLER),
    "webhook": lambda: ApiError(409, CONFLICT_WEBHOOK),
    "revoked": lambda: ApiError(401, "Unauthorized"),
}


_DISCONNECT = object()  # a method's "result" when a fault drops the connection


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
        if reason in POLL_ENDINGS:
            raise POLL_ENDINGS[reason]()
        return bot.pending(limit)

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


# =============================================================================
# The sandbox core: the Bot API dispatcher and the user side
# =============================================================================

class UserError(Exception):
    """A refused /sandbox request (answered 400 with this description)."""


class SandboxCore:
    """Bots, users and routes, independent of HTTP; runs on one event loop."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.api = BotApi(spec)
        self.bots: dict[int, BotState] = {}
        self.users: dict[int, dict] = {}
        self.callback_ids = itertools.count(4_000_000_000_000_000_001)
        self._served = {name.lower(): name for name in SERVED_METHODS}

    def bot(self, token: str) -> BotState:
        """The bot a well-formed token names; the first secret seen for a bot id is its own."""
        match = TOKEN_RE.fullmatch(token)
        if match is None:
            raise ApiError(401, "Unauthorized")
        bot_id, secret = int(match.group(1)), match.group(2)
        bot = self.bots.get(bot_id)
        if bot is None:
            bot = self.bots[bot_id] = BotState(bot_id, secret)
            LOG.info("bot %s: first seen", bot_id)
        if bot.secret != secret or bot.revoked:
            raise ApiError(401, "Unauthorized")
        return bot

    # -- the Bot API -----------------------------------------------------------------------

    async def call(self, token: str, method_name: str, raw: dict) -> tuple[int, dict | None]:
        """(HTTP status, body) for one Bot API call; body None means drop the connection."""
        try:
            bot = self.bot(token)
        except ApiError as err:
            LOG.info("bot %s: %s refused: %s", bot_id_of(token), method_name, err.description)
            return err.code, err.body()
        method = self._served.get(method_name.lower())
        record = {"method": method or method_name, "params": _jsonable(raw), "status": None,
                  "time": time.time()}
        bot.calls.append(record)
        try:
            result = await self._run(bot, method, method_name, raw, record)
        except ApiError as err:
            record.update(status=err.code, description=err.description)
            LOG.debug("bot %s: %s -> %s %s", bot.bot_id, record["method"], err.code,
                      err.description)
            return err.code, err.body()
        if result is _DISCONNECT:
            record["status"] = 0
            return 0, None
        record["status"] = 200
        if isinstance(result, Described):
            return 200, {"ok": True, "result": result.result, "description": result.description}
        return 200, {"ok": True, "result": result}

    async def _run(self, bot: BotState, method: str | None, asked: str, raw: dict,
                   record: dict):
        if method is None:
            if self.spec.canonical(asked):
                raise ApiError(501, f"Not Implemented: the Telegram sandbox does not serve "
                                    f"{self.spec.canonical(asked)}")
            raise ApiError(404, "Not Found")
        fault = bot.take_fault(method)
        if fault is not None:
            record["fault"] = True
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.disconnects:
                return _DISCONNECT
            raise fault.error()
        params = self.spec.parse_params(method, raw)
        record["params"] = _jsonable(params)
        return await self.api.handlers[method](bot, params)

    def file(self, token: str, path: str) -> StoredFile | None:
        try:
            bot = self.bot(token)
        except ApiError:
            return None
        return bot.file_paths.get(path)

    # -- the user side ---------------------------------------------------------------------

    def user_bot(self, body: dict) -> BotState:
        token = _field(body, "token", str)
        try:
            return self.bot(token)
        except ApiError:
            raise UserError("token is not a usable bot token (expected digits:secret, not "
                            "revoked)") from None

    def user(self, body: dict) -> dict:
        user_id = _field(body, "user_id", int)
        if user_id <= 0:
            raise UserError("user_id must be a positive integer")
        user = self.users.setdefault(user_id, {"id": user_id, "is_bot": False,
                                               "first_name": f"User {user_id}",
                                               "language_code": "en"})
        for key in ("first_name", "last_name", "username", "language_code"):
            if body.get(key):
                user[key] = str(body[key])
        return user

    def send(self, body: dict) -> dict:
        bot, user = self.user_bot(body), self.user(body)
        text = _field(body, "text", str)
        if not text.strip() or len(text) > MAX_TEXT_CHARS:
            raise UserError(f"text must be 1-{MAX_TEXT_CHARS} characters")
        chat = bot.open_private_chat(user)
        text = text.strip()
        message = bot.new_message(chat, user, text=text, entities=command_entities(text))
        update_id = bot.add_update("message", message)
        return {"ok": True, "update_id": update_id, "message_id": message["message_id"],
                "seq": bot.seq}

    def press(self, body: dict) -> dict:
        bot, user = self.user_bot(body), self.user(body)
        message_id = _field(body, "message_id", int)
        data = _field(body, "data", str)
        chat = bot.chats.get(user["id"])
        if chat is None:
            raise UserError(f"user {user['id']} has never written to this bot")
        message = bot.messages[chat["id"]].get(message_id)
        if not body.get("forge"):
            _check_pressable(bot, message, message_id, data)
        query_id = str(next(self.callback_ids))
        shown = dict(message) if message else {"chat": chat, "message_id": message_id, "date": 0}
        query = {"id": query_id, "from": user, "message": shown, "data": data,
                 "chat_instance": str((bot.bot_id * 1_000_003 + chat["id"]) % 2**62)}
        bot.callback_answers[query_id] = None
        update_id = bot.add_update("callback_query", query)
        return {"ok": True, "update_id": update_id, "callback_query_id": query_id,
                "seq": bot.seq}

    async def messages(self, query: dict) -> dict:
        bot = self.user_bot(query)
        chat_id = _field(query, "chat_id", int)
        after = _field(query, "after", int, 0)
        after_seq = _field(query, "after_seq", int, None)
        deadline = time.monotonic() + min(_field(query, "wait", float, 0.0), MESSAGES_WAIT_MAX_S)
        events = bot.outbox_after(chat_id, after, after_seq)
        while not events and time.monotonic() < deadline:
            await bot.wait_for_outbox(chat_id, deadline - time.monotonic())
            events = bot.outbox_after(chat_id, after, after_seq)
        return {"ok": True, "messages": events, "last_seq": bot.seq}

    def fault(self, body: dict) -> dict:
        bot = self.user_bot(body)
        asked = _field(body, "method", str)
        method = "*" if asked == "*" else self._served.get(asked.lower())
        if method is None:
            raise UserError(f"method {asked!r} is not served (known: {', '.join(SERVED_METHODS)})")
        status = 0 if body.get("kind") == "disconnect" else _field(body, "status", int, 500)
        if status != 0 and not 400 <= status <= 599:
            raise UserError("status must be 400-599, or 0 to drop the connection")
        fault = Fault(status=status, retry_after=_field(body, "retry_after", int, None),
                      description=_field(body, "description", str, None),
                      delay=_field(body, "delay", float, 0.0))
        times = _field(body, "times", int, 1)
        if not 0 <= times <= MAX_FAULT_TIMES or not 0 <= fault.delay <= MAX_FAULT_DELAY_S:
            raise UserError(f"times must be 0-{MAX_FAULT_TIMES} and delay 0-{MAX_FAULT_DELAY_S} s")
        pending = bot.faults.setdefault(method, collections.deque())
        if times == 0:
            pending.clear()
            LOG.info("bot %s: faults of %s cleared", bot.bot_id, method)
        pending.extend(fault for _ in range(times))
        LOG.info("bot %s: next %d %s call(s) fail with %s", bot.bot_id, times, method, status)
        return {"ok": True, "method": method, "pending": len(pending)}

    def calls(self, query: dict) -> dict:
        bot = self.user_bot(query)
        method = query.get("method")
        calls = [c for c in bot.calls if method is None or c["method"].lower() == method.lower()]
        return {"ok": True, "calls": calls}

    def revoke(self, body: dict) -> dict:
        bot = self.user_bot(body)
        bot.revoked = True
        bot.end_poll("revoked")
        LOG.info("bot %s: token revoked", bot.bot_id)
        return {"ok": True}

    def health(self, query: dict) -> dict:
        """Liveness, and how many long polls and message waits are in progress."""
        polls = sum(bot.poller is not None for bot in self.bots.values())
        waits = sum(len(w) for bot in self.bots.values() for w in bot.outbox_waiters.values())
        return {"ok": True, "bots": len(self.bots), "spec_version": self.spec.version,
                "waiting": {"getUpdates": polls, "messages": waits}}


def _check_pressable(bot: BotState, message: dict | None, message_id: int, data: str) -> None:
    if message is None or message["from"]["id"] != bot.bot_id:
        raise UserError(f"message {message_id} is not a message of this bot in this chat")
    rows = (message.get("reply_markup") or {}).get("inline_keyboard", [])
    offered = [button.get("callback_data") for row in rows for button in row
               if "callback_data" in button]
    if data not in offered:
        raise UserError(f"message {message_id} has no button with callback_data {data!r} "
                        f"(offered: {offered}); pass \"forge\": true to send it anyway")


def _field(source: dict, name: str, kind: type, default=dataclasses.MISSING):
    """A typed field of a /sandbox request body or query string."""
    value = source.get(name)
    if value is None or value == "":
        if default is dataclasses.MISSING:
            raise UserError(f"missing field {name!r}")
        return default
    wrong = UserError(f"field {name!r} must be {kind.__name__}")
    if isinstance(value, bool) or (kind is str and not isinstance(value, str)):
        raise wrong
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise wrong from None


def _jsonable(params: dict) -> dict:
    """Parameters as recorded in /sandbox/calls: uploads become {"upload", "size"}."""
    return {key: {"upload": value.filename, "size": len(value.data)}
            if isinstance(value, Upload) else value for key, value in params.items()}


# =============================================================================
# HTTP/1.1 server
# =============================================================================

@dataclasses.dataclass
class Request:
    method: str
    path: str
    version: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


class HttpError(Exception):
    """A request the server cannot parse; answered with status and the connection closed."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status


async def read_request(reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> Request | None:
    """The next request on a connection, or None when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if err.partial.strip():
            raise HttpError(400, "truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(431, "request head too large") from None
    lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, "malformed request line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    target = urllib.parse.urlsplit(parts[1])
    query = dict(urllib.parse.parse_qsl(target.query, keep_blank_values=True))
    return Request(parts[0].upper(), urllib.parse.unquote(target.path), parts[2], query,
                   headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if length > MAX_BODY_BYTES:
        raise HttpError(413, "request body too large")
    try:
        return await reader.readexactly(length) if length > 0 else b""
    except asyncio.IncompleteReadError:
        raise HttpError(400, "truncated request body") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks, total = [], 0
    try:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise HttpError(413, "request body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        raise HttpError(400, "malformed chunked body") from None


def parse_form(request: Request) -> dict:
    """Bot API parameters from the query string and any body, as Telegram's text values."""
    params: dict = dict(request.query)
    content_type = request.headers.get("content-type", "").lower()
    if not request.body:
        return params
    if content_type.startswith("application/json"):
        try:
            decoded = json.loads(request.body)
        except (ValueError, RecursionError):
            raise ApiError(400, "Bad Request: can't parse JSON object") from None
        if not isinstance(decoded, dict):
            raise ApiError(400, "Bad Request: JSON object expected")
        params.update({key: value if isinstance(value, str) else json.dumps(value)
                       for key, value in decoded.items() if value is not None})
    elif content_type.startswith("multipart/form-data"):
        params.update(parse_multipart(request.body, request.headers["content-type"]))
    else:
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "Bad Request: request body is not UTF-8") from None
        params.update(urllib.parse.parse_qsl(text, keep_blank_values=True))
    return params


BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
DISPOSITION_PARAM_RE = re.compile(r';\s*([\w*]+)="((?:[^"\\]|\\.)*)"|;\s*([\w*]+)=([^;]*)')


def parse_multipart(body: bytes, content_type: str) -> dict:
    """Fields of a multipart/form-data body: text as str, files as Upload."""
    match = BOUNDARY_RE.search(content_type)
    if match is None:
        raise ApiError(400, "Bad Request: multipart body without boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    fields: dict = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = {
            (m.group(1) or m.group(3)).lower(): (m.group(2) if m.group(1) else m.group(4).strip())
            for m in DISPOSITION_PARAM_RE.finditer(headers.get("content-disposition", ""))}
        content = content.removesuffix(b"\r\n")
        if "name" not in disposition:
            continue
        if "filename" in disposition:
            fields[disposition["name"]] = Upload(
                disposition["filename"], headers.get("content-type", "application/octet-stream"),
                content)
        else:
            fields[disposition["name"]] = content.decode("utf-8", "replace")
    return fields


def encode_response(status: int, body: bytes, content_type: str, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {_reason(status)}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("latin-1") + body


def json_bytes(body: dict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif"}
NOT_FOUND = {"ok": False, "error_code": 404, "description": "Not Found"}
INTERNAL_ERROR = {"ok": False, "error_code": 500, "description": "Internal Server Error"}


def _loggable_path(path: str) -> str:
    """The request path with any token cut down to its bot id."""
    return re.sub(r"^(/(?:file/)?bot)([^/]*)", lambda m: m.group(1) + bot_id_of(m.group(2)),
                  path)


class SandboxServer:
    """The asyncio HTTP/1.1 server (keep-alive, pipelining in order) in front of the core."""

    def __init__(self, core: SandboxCore, host: str = "127.0.0.1", port: int = 0):
        self.core = core
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._user_routes = {
            ("POST", "/sandbox/send"): core.send, ("POST", "/sandbox/press"): core.press,
            ("POST", "/sandbox/fault"): core.fault, ("POST", "/sandbox/revoke"): core.revoke,
            ("GET", "/sandbox/messages"): core.messages, ("GET", "/sandbox/calls"): core.calls,
            ("GET", "/sandbox/health"): core.health,
        }

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port,
                                                  limit=64 * 1024, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve_connection(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve_requests(reader, writer)
        except HttpError as err:
            body = json_bytes({"ok": False, "error_code": err.status, "description": str(err)})
            writer.write(encode_response(err.status, body, "application/json", False))
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_requests(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        while True:
            request = await read_request(reader, writer)
            if request is None:
                return
            try:
                status, body, content_type = await self._route(request)
            except Exception:  # a sandbox bug must not look like a network error to the bot
                LOG.exception("internal error answering %s %s", request.method,
                              _loggable_path(request.path))
                status, body, content_type = 500, json_bytes(INTERNAL_ERROR), "application/json"
            if body is None:
                writer.transport.abort()
                return
            writer.write(encode_response(status, body, content_type, request.keep_alive))
            await writer.drain()
            if not request.keep_alive:
                return

    async def _route(self, request: Request) -> tuple[int, bytes | None, str]:
        path = request.path
        if path.startswith("/bot"):
            token, _, method = path[len("/bot"):].partition("/")
            try:
                params = parse_form(request)
            except ApiError as err:
                return err.code, json_bytes(err.body()), "application/json"
            status, body = await self.core.call(token, method, params)
            return status, None if body is None else json_bytes(body), "application/json"
        if path.startswith("/file/bot"):
            token, _, file_path = path[len("/file/bot"):].partition("/")
            stored = self.core.file(token, file_path)
            if stored is None:
                return 404, json_bytes(NOT_FOUND), "application/json"
            extension = file_path.rpartition(".")[2]
            return 200, stored.data, CONTENT_TYPES.get(extension, "application/octet-stream")
        handler = self._user_routes.get((request.method, path))
        if handler is None:
            return 404, json_bytes(NOT_FOUND), "application/json"
        return await self._user_route(handler, request)

    async def _user_route(self, handler, request: Request) -> tuple[int, bytes, str]:
        try:
            source = request.query if request.method == "GET" else json.loads(request.body or b"{}")
            if not isinstance(source, dict):
                raise UserError("the body must be a JSON object")
            answer = handler(source)
            if asyncio.iscoroutine(answer):
                answer = await answer
        except (UserError, ValueError) as err:
            detail = str(err) if isinstance(err, UserError) else "the body is not valid JSON"
            return 400, json_bytes({"ok": False, "error_code": 400, "description": detail}), \
                "application/json"
        return 200, json_bytes(answer), "application/json"


# =============================================================================
# Client over HTTP (the user side from any process)
# =============================================================================

class SandboxError(Exception):
    """The sandbox refused a /sandbox request or could not be reached."""

    def __init__(self, status: int, description: str):
        super().__init__(f"{status}: {description}" if status else description)
        self.status = status
        self.description = description


class SandboxClient:
    """Acts as Telegram users against a sandbox at url, over HTTP with urllib."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def api_url(self) -> str:
        """The Bot API root: python-telegram-bot's base_url, DIMS's TELEGRAM_API_URL."""
        return f"{self.url}/bot"

    @property
    def file_url(self) -> str:
        """python-telegram-bot's base_file_url."""
        return f"{self.url}/file/bot"

    def send(self, token: str, user_id: int, text: str, **profile) -> dict:
        """A private message from the user; profile: first_name, last_name, username."""
        return self._post("send", {"token": token, "user_id": user_id, "text": text, **profile})

    def press(self, token: str, user_id: int, message_id: int, data: str,
              forge: bool = False) -> dict:
        """The user presses the inline button with callback_data == data of a bot message."""
        return self._post("press", {"token": token, "user_id": user_id,
                                    "message_id": message_id, "data": data, "forge": forge})

    def messages(self, token: str, chat_id: int, after: int = 0, wait: float = 0.0,
                 after_seq: int | None = None) -> list[dict]:
        """What the bot sent, edited or deleted in the chat since message `after` was sent
        (edits of it included) and after event after_seq, waiting up to wait s for one."""
        query = {"token": token, "chat_id": chat_id, "after": after, "wait": wait}
        if after_seq is not None:
            query["after_seq"] = after_seq
        return self._get("messages", query, timeout=wait + self.timeout)["messages"]

    def wait_for_reply(self, token: str, chat_id: int, after_seq: int = 0,
                       timeout: float = 10.0, match=None) -> dict:
        """The first bot message event after after_seq (that match(event) accepts)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            for event in self.messages(token, chat_id, after_seq=after_seq, wait=remaining):
                after_seq = event["seq"]
                if match is None or match(event):
                    return event
        raise TimeoutError(f"no matching bot message in chat {chat_id} within {timeout} s")

    def fault(self, token: str, method: str, status: int = 500, times: int = 1,
              retry_after: int | None = None, kind: str = "error",
              description: str | None = None, delay: float = 0.0) -> dict:
        """The next `times` calls of method ("*": any) fail with status (429 carries
        retry_after), after delay s; kind="disconnect" drops the connection unanswered;
        times=0 clears the faults still queued for method."""
        return self._post("fault", {"token": token, "method": method, "status": status,
                                    "times": times, "retry_after": retry_after, "kind": kind,
                                    "description": description, "delay": delay})

    def calls(self, token: str, method: str | None = None) -> list[dict]:
        """The bot's Bot API calls, oldest first (the last 10,000): method, params, status
        (None while the call is in progress, 0 for a dropped connection), description."""
        query = {"token": token} if method is None else {"token": token, "method": method}
        return self._get("calls", query)["calls"]

    def revoke(self, token: str) -> dict:
        """From now on the token is answered 401 Unauthorized, as a revoked token is."""
        return self._post("revoke", {"token": token})

    def health(self) -> dict:
        return self._get("health", {})

    def _post(self, route: str, body: dict) -> dict:
        data = json.dumps({k: v for k, v in body.items() if v is not None}).encode("utf-8")
        request = urllib.request.Request(f"{self.url}/sandbox/{route}", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        return self._open(request, self.timeout)

    def _get(self, route: str, query: dict, timeout: float | None = None) -> dict:
        url = f"{self.url}/sandbox/{route}?{urllib.parse.urlencode(query)}"
        return self._open(urllib.request.Request(url), timeout or self.timeout)

    def _open(self, request: urllib.request.Request, timeout: float) -> dict:
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                description = json.loads(body)["description"]
            except (ValueError, KeyError, TypeError):
                description = body.decode("utf-8", "replace")
            raise SandboxError(err.code, description) from None
        except (urllib.error.URLError, OSError) as err:
            raise SandboxError(0, f"sandbox at {self.url} unreachable: {err}") from None


# =============================================================================
# Running the server: in this thread, in a background thread, in a child process
# =============================================================================

def banner(url: str) -> str:
    return f"Telegram sandbox listening on {url} (Bot API root: {url}/bot)"


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(host: str, port: int, stop: asyncio.Event, ready=None) -> None:
    """Runs the sandbox until stop is set; ready(url) is called once it listens."""
    server = SandboxServer(SandboxCore(Spec.load()), host, port)
    port = await server.start()
    url = url_for(host, port)
    LOG.info("listening on %s", url)
    if ready is not None:
        ready(url)
    try:
        await stop.wait()
    finally:
        await server.close()


class Sandbox(SandboxClient):
    """The sandbox in a background thread with its own event loop; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        super().__init__(url_for(host, port), timeout)
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None

    def start(self, timeout: float = 10.0) -> "Sandbox":
        self._thread = threading.Thread(target=self._run, name="telegram-sandbox", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"sandbox did not start within {timeout} s")
        if self._failure is not None:
            raise RuntimeError(f"sandbox failed to start: {self._failure}") from self._failure
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as err:  # reported to start(), which re-raises it
            self._failure = err
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await serve(self.host, self.port, self._stop, ready=self._ready)

    def _ready(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self._started.set()


class SandboxProcess(SandboxClient):
    """`python telegram_sandbox.py` in a child process (no GIL shared); a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                 log_level: str = "WARNING"):
        super().__init__(url_for(host, port), timeout)
        self.host, self.port, self.log_level = host, port, log_level
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "SandboxProcess":
        command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--host", self.host,
                   "--port", str(self.port), "--log-level", self.log_level, "--exit-with-stdin"]
        # Its own session: a Ctrl-C meant for the parent does not cut the sandbox away from
        # bots that are still stopping; it ends when the parent stops it or dies (stdin EOF).
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(self.process.stdout.readline()),
                         daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            raise RuntimeError(f"sandbox process printed no URL within {timeout} s") from None
        match = re.search(r"listening on (http://\S+)", line)
        if match is None:
            self.close()
            raise RuntimeError(f"sandbox process did not start: {line.strip() or 'no output'}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def close(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        self.process.stdout.close()
        self.process.stdin.close()

    def __enter__(self) -> "SandboxProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


# =============================================================================
# Terminal chat
# =============================================================================

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
    gives a readable transcript. /quit or end of input ends it (status 0); 1 if the sandbox
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
        for line in stdin:
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


def _chat_input(client: SandboxClient, view: _ChatView, token: str, user_id: int,
                first_name: str, text: str, reply_timeout: float) -> None:
    press = re.fullmatch(r"#(\d+)", text)
    if press is None:
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


# =============================================================================
# Command line
# =============================================================================

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="telegram_sandbox.py",
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


def run_server(host: str, port: int, exit_with_stdin: bool = False) -> int:
    """Serves until SIGINT or SIGTERM (or, with exit_with_stdin, until stdin closes);
    prints the URL as the first line of stdout."""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        LOG.warning("listening on %s: the sandbox is reachable from other machines", host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if exit_with_stdin:
            loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 4096) or stop.set())
        await serve(host, port, stop, ready=lambda url: print(banner(url), flush=True))

    try:
        asyncio.run(main())
    except OSError as err:
        print(f"telegram_sandbox: cannot listen on {host}:{port}: {err.strerror}",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "chat":
        return chat(args.url, args.token, user_id=args.user_id, first_name=args.first_name)
    return run_server(args.host, args.port, args.exit_with_stdin)


if __name__ == "__main__":
    sys.exit(main())
