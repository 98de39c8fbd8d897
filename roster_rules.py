"""The roster's rules: what a profile is, what makes one valid, and the errors a user reads.

The errors (`RosterError` and its kinds, `ImportRejected`), the data (`Profile`, `Page`), the
validation of every field an admin or an import file can give (`clean_name` ... `clean_row`,
`clean_rows`), each refusal worded so that a Telegram user or an operator knows what to change,
and the small text rules lookups and search rely on (`lookup_name`, `storable`, `like_pattern`).
Pure functions over values: no I/O, no state.

Called by `girls_manager`, which re-exports the names other modules use; import them from there.
Imports the standard library only: never telegram, psycopg2, the database layer or the cache.
"""

from __future__ import annotations

import re
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

EDITABLE_FIELDS = ("name", "bio", "tags", "photo")
NAME_MAX, BIO_MAX, TAGS_MAX, PHOTO_URL_MAX = 64, 1000, 10, 2048
TAG_RE = re.compile(r"[a-z0-9_-]{1,32}")
FILE_ID_RE = re.compile(r"[A-Za-z0-9_-]{20,255}")  # the shape of a Telegram file id


# --------------------------------------------------------------------------- errors and data


class RosterError(ValueError):
    """A roster request that cannot be done; the message tells a Telegram user what to change."""


class ProfileNotFound(RosterError):
    """No such profile (among those this bot presents, for the presenting reads)."""


class NameTaken(RosterError):
    """Another profile already has this name (names are unique, case-insensitively)."""

    def __init__(self, name: str):
        super().__init__(f"a profile named {name!r} already exists")
        self.name = name


class ImportRejected(RosterError):
    """An import with bad rows: nothing was changed. `problems` lists one line per bad row."""

    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} bad row{'s' if len(problems) > 1 else ''}, nothing imported:\n"
                         + "\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Profile:
    id: int
    name: str
    bio: str
    tags: tuple[str, ...]
    photo: str | None
    visible: bool
    created_at: datetime
    updated_at: datetime

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, times in ISO 8601 UTC."""
        return {"id": self.id, "name": self.name, "bio": self.bio, "tags": list(self.tags),
                "photo": self.photo, "visible": self.visible,
                "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at)}


@dataclass(frozen=True)
class Page:
    items: tuple[Profile, ...]
    number: int  # 0-based
    pages: int   # at least 1, even when the roster is empty
    total: int


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


# --------------------------------------------------------------------------- validation


def quoted(value: str, limit: int = 40) -> str:
    """A value quoted for a message, shortened so a 5000-character input stays readable."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RosterError(f"{field}: expected text, got {type(value).__name__}")
    if any(unicodedata.category(ch) == "Cs" for ch in value):
        raise RosterError(f"{field} contains an invalid character (a lone surrogate)")
    return value


def clean_name(value: Any) -> str:
    name = _text("name", value).strip()
    if not name:
        raise RosterError("name is empty; a profile needs a name")
    if len(name) > NAME_MAX:
        raise RosterError(f"name is {len(name)} characters; the limit is {NAME_MAX}")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise RosterError("name contains a control character (such as a line break); use plain text")
    return name


def clean_bio(value: Any) -> str:
    bio = _text("bio", value).replace("\r\n", "\n").replace("\r", "\n").strip()
    if len(bio) > BIO_MAX:
        raise RosterError(f"bio is {len(bio)} characters; the limit is {BIO_MAX}")
    if any(unicodedata.category(ch) == "Cc" and ch not in "\n\t" for ch in bio):
        raise RosterError("bio contains a control character; only line breaks and tabs are allowed")
    return bio


def clean_tags(value: Any) -> tuple[str, ...]:
    """Tags from a list, or from text like "a, b": lower-cased, de-duplicated, in order.

    Text is separated by commas only, each piece trimmed and empty pieces ignored: a space is
    part of its piece, so "Bad Tag" is refused as one tag rather than taken as two.
    """
    if isinstance(value, str):
        raw = [piece.strip() for piece in value.split(",") if piece.strip()]
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, dict)):
        raw = list(value)
    else:
        raw = [value]
    if not all(isinstance(tag, str) for tag in raw):
        raise RosterError("tags: expected a list of tags or text like 'a,b'")
    tags: list[str] = []
    for tag in raw:
        cleaned = tag.strip().lower()
        if not TAG_RE.fullmatch(cleaned):
            raise RosterError(f"tags: {quoted(tag)} must match [a-z0-9_-]{{1,32}}")
        if cleaned not in tags:
            tags.append(cleaned)
    if len(tags) > TAGS_MAX:
        raise RosterError(f"tags: {len(tags)} given; the limit is {TAGS_MAX}")
    return tuple(tags)


def clean_photo(value: Any) -> str | None:
    """An http(s) URL or a Telegram file id; None, "" and "-" mean no photo."""
    if value is None:
        return None
    photo = _text("photo", value).strip()
    if photo in ("", "-"):
        return None
    parts = urllib.parse.urlsplit(photo)
    is_url = (parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
              and len(photo) <= PHOTO_URL_MAX and not any(ch.isspace() for ch in photo))
    if not (is_url or FILE_ID_RE.fullmatch(photo)):
        raise RosterError(f"photo: {quoted(photo)} must be an http(s) URL or a Telegram file id")
    return photo


_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def clean_visible(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise RosterError(f"visible: {value!r} must be true or false")


def _clean_time(field: str, value: Any) -> datetime:
    text = _text(field, value).strip()
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RosterError(f"{field}: {quoted(text)} is not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


_ROW_CLEANERS: dict[str, Callable[[Any], Any]] = {
    "name": clean_name, "bio": clean_bio, "tags": clean_tags, "photo": clean_photo,
    "visible": clean_visible,
    "created_at": lambda value: _clean_time("created_at", value),
    "updated_at": lambda value: _clean_time("updated_at", value),
}


def clean_row(row: Any) -> dict[str, Any]:
    """One import row, cleaned; a RosterError names every problem in it."""
    if not isinstance(row, dict):
        raise RosterError(f"expected an object with a name, got {type(row).__name__}")
    problems = [f"unknown field {key!r} (known: {', '.join(_ROW_CLEANERS)})"
                for key in row if key not in _ROW_CLEANERS]
    if "name" not in row:
        problems.append("name is missing")
    cleaned = {}
    for key, clean in _ROW_CLEANERS.items():
        if key in row:
            try:
                cleaned[key] = clean(row[key])
            except RosterError as exc:
                problems.append(str(exc))
    if problems:
        raise RosterError("; ".join(problems))
    return cleaned


def clean_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """Every row cleaned, or ImportRejected naming each bad one ("row 3: ..."; rows count from 1)."""
    cleaned, problems, first_row_of = [], [], {}
    for number, row in enumerate(rows, start=1):
        try:
            values = clean_row(row)
        except RosterError as exc:
            problems.append(f"row {number}: {exc}")
            continue
        key = values["name"].lower()
        if key in first_row_of:
            problems.append(f"row {number}: name {values['name']!r} is already used by row {first_row_of[key]}")
        first_row_of.setdefault(key, number)
        cleaned.append(values)
    if problems:
        raise ImportRejected(problems)
    return cleaned


# --------------------------------------------------------------------------- lookups and search


_TAG_TEXT = re.compile(r"[a-z0-9_-]+")   # text that can be part of a tag


def may_be_in_a_tag(text: str) -> bool:
    """Whether some tag could contain `text` (case-insensitively); other text is in no tag."""
    return bool(_TAG_TEXT.fullmatch(text.lower()))


def like_pattern(text: str) -> str:
    """'%text%' with LIKE's wildcards in text taken literally (escape character: backslash)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def storable(text: str) -> bool:
    """PostgreSQL text holds neither NUL nor lone surrogates; such input can match nothing."""
    return "\x00" not in text and not any(unicodedata.category(ch) == "Cs" for ch in text)


def lookup_name(name: str) -> str:
    """A name to look a profile up by: trimmed; one that no profile can have is not found."""
    name = name.strip()
    if not storable(name):
        raise ProfileNotFound(f"no profile named {quoted(name)}")
    return name
