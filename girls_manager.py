"""The roster: the profiles ("girls") a bot presents, stored in PostgreSQL and cached per process.

`GirlsManager` is the roster domain for one bot: it validates profiles (messages a Telegram
user can act on), reads what the bot presents (every visible profile, or the visible ones
carrying one of the bot's `roster_tags`), writes admin changes, keeps favourites and the users
each bot has seen, and imports/exports the whole roster. `bot.py` calls it from worker threads
(`asyncio.to_thread`); the operator CLI calls it for roster administration.

Reads go through a bounded LRU cache with a TTL. The cache serves only while this manager's
listener is connected: every write sends `pg_notify` inside its transaction (delivered on
commit), and each process's listener thread drops what the notification names. The writer's
own process invalidates at once. When the LISTEN connection is lost the cache is flushed and
switched off until the listener has reconnected, so nothing stale is served.

Sections, in dependency order: errors and data; validation; the cache; the listener; the
manager. Imports: the standard library, psycopg2 and `multiprocess_connection_manager`; never
telegram.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import math
import os
import random
import re
import secrets
import select
import threading
import unicodedata
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from time import monotonic
from typing import Any

import psycopg2
import psycopg2.errors

from multiprocess_connection_manager import ConnectionManager, DatabaseError, Transaction

log = logging.getLogger(__name__)

CHANNEL = "dims_roster"  # the NOTIFY channel every roster write and favourite change goes to
EDITABLE_FIELDS = ("name", "bio", "tags", "photo")
NAME_MAX, BIO_MAX, TAGS_MAX, PHOTO_URL_MAX = 64, 1000, 10, 2048
TAG_RE = re.compile(r"[a-z0-9_-]{1,32}")
FILE_ID_RE = re.compile(r"[A-Za-z0-9_-]{20,255}")  # the shape of a Telegram file id
LISTEN_BACKOFF_INITIAL, LISTEN_BACKOFF_MAX = 0.1, 5.0
LISTEN_WAKE_INTERVAL = 5.0  # the listener's select() deadline; stop wakes it at once anyway


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


class NotCached(Exception):
    """A read inside `cache_only()` whose answer is not in the cache."""


_CACHE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("dims_roster_cache_only", default=False)


@contextlib.contextmanager
def cache_only():
    """Reads inside answer from the cache or raise NotCached; they never touch the database,
    so an event loop can try a read inline before handing it to a thread."""
    token = _CACHE_ONLY.set(True)
    try:
        yield
    finally:
        _CACHE_ONLY.reset(token)


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


_COLUMNS = ("id", "name", "bio", "tags", "photo", "visible", "created_at", "updated_at")
_SELECT = ", ".join(_COLUMNS)
_SELECT_G = ", ".join(f"g.{column}" for column in _COLUMNS)  # the same, from dims_girls AS g


def _profile(row: tuple) -> Profile:
    values = dict(zip(_COLUMNS, row))
    return Profile(**{**values, "tags": tuple(values["tags"])})


# --------------------------------------------------------------------------- validation


def _shown(value: str, limit: int = 40) -> str:
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
    """Tags from a list, or from text like "a,b c": lower-cased, de-duplicated, in order."""
    if isinstance(value, str):
        raw = [t for t in re.split(r"[,\s]+", value) if t]
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
            raise RosterError(f"tags: {_shown(tag)} must match [a-z0-9_-]{{1,32}}")
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
        raise RosterError(f"photo: {_shown(photo)} must be an http(s) URL or a Telegram file id")
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
        raise RosterError(f"{field}: {_shown(text)} is not an ISO 8601 time") from None
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


def _clean_rows(rows: list[Any]) -> list[dict[str, Any]]:
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


_TAG_TEXT = re.compile(r"[a-z0-9_-]+")   # text that can be part of a tag


def _like_pattern(text: str) -> str:
    """'%text%' with LIKE's wildcards in text taken literally (escape character: backslash)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _storable(text: str) -> bool:
    """PostgreSQL text holds neither NUL nor lone surrogates; such input can match nothing."""
    return "\x00" not in text and not any(unicodedata.category(ch) == "Cs" for ch in text)


def _lookup_name(name: str) -> str:
    """A name to look a profile up by: trimmed; one that no profile can have is not found."""
    name = name.strip()
    if not _storable(name):
        raise ProfileNotFound(f"no profile named {_shown(name)}")
    return name


# --------------------------------------------------------------------------- the cache


class _Cache:
    """A thread-safe LRU with a TTL that serves only while enabled (the listener is connected).

    A read that misses gets a generation token and stores its result only if no invalidation
    happened meanwhile, so a read racing a write never caches what the write replaced.
    """

    def __init__(self, size: int, ttl: float):
        self.size, self.ttl = size, ttl
        self._entries: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()
        self._cond = threading.Condition()
        self._generation = 0
        self._owner_pid: int | None = None  # the process whose listener enabled it; None: off
        self.hits = self.misses = self.evictions = self.invalidations = 0

    def lookup(self, key: tuple) -> tuple[bool, Any, int | None]:
        """(found, value, token for store())."""
        with self._cond:
            if self._owner_pid != os.getpid():
                self.misses += 1
                return False, None, None
            entry = self._entries.get(key)
            if entry is not None and entry[0] > monotonic():
                self._entries.move_to_end(key)
                self.hits += 1
                return True, entry[1], None
            self._entries.pop(key, None)
            self.misses += 1
            return False, None, self._generation

    def store(self, key: tuple, value: Any, token: int | None) -> None:
        with self._cond:
            if token != self._generation or self._owner_pid != os.getpid() or self.size <= 0:
                return
            self._entries[key] = (monotonic() + self.ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
                self.evictions += 1

    def invalidate(self, keys: Iterable[tuple] | None = None) -> None:
        """Drop `keys`, or everything when None; counts as one invalidation."""
        with self._cond:
            if keys is None:
                self._entries.clear()
            for key in keys or ():
                self._entries.pop(key, None)
            self._generation += 1
            self.invalidations += 1
            self._cond.notify_all()

    def set_enabled(self, enabled: bool) -> None:
        """Start or stop serving; either way the cache starts empty."""
        with self._cond:
            self._entries.clear()
            self._generation += 1
            self._owner_pid = os.getpid() if enabled else None

    def wait_invalidations(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.invalidations >= count, timeout)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            looked_up = self.hits + self.misses
            return {"hits": self.hits, "misses": self.misses,
                    "hit_rate": round(self.hits / looked_up, 3) if looked_up else None,   # no lookups: no rate
                    "entries": len(self._entries), "evictions": self.evictions,
                    "invalidations": self.invalidations}


# --------------------------------------------------------------------------- the listener


class _Listener:
    """A thread holding a LISTEN connection; reconnects with capped backoff when it is lost.

    Callbacks: `on_connected()` once LISTEN is in place, `on_notify(payload)` per notification,
    `on_lost()` when the connection dies, `on_stopped()` when the thread ends for any reason.
    """

    def __init__(self, db: ConnectionManager, label: str, on_notify: Callable[[str], None],
                 on_connected: Callable[[], None], on_lost: Callable[[], None],
                 on_stopped: Callable[[], None]):
        self.db, self.label = db, label
        self.on_notify, self.on_connected, self.on_lost, self.on_stopped = \
            on_notify, on_connected, on_lost, on_stopped
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # a pipe: stop() writes, select() wakes

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._close_wake_pipe()
            self._stop.clear()
            self._wake = os.pipe()
            self._thread = threading.Thread(target=self._run, name=f"{self.label}-listener", daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> None:
        with self._lock:
            if self._thread is None:
                return
            self._stop.set()
            os.write(self._wake[1], b"x")
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: the roster listener did not stop within %g s", self.label, timeout)
                return
            self._thread = None
            self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _run(self) -> None:
        delay = LISTEN_BACKOFF_INITIAL
        try:
            while not self._stop.is_set():
                conn = self._connect()
                if conn is None:
                    self._stop.wait(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, LISTEN_BACKOFF_MAX)
                    continue
                delay = LISTEN_BACKOFF_INITIAL
                try:
                    self._serve(conn)
                except (psycopg2.Error, OSError, ValueError) as exc:
                    self.ready.clear()
                    log.warning("%s: roster listener lost its connection (%s); cache flushed, reconnecting",
                                self.label, " ".join(str(exc).split()))
                    self.on_lost()
                finally:
                    conn.close()
        except Exception:
            log.exception("%s: roster listener failed; the cache stays off", self.label)
        finally:
            self.ready.clear()
            self.on_stopped()

    def _connect(self) -> Any:
        """A connection that LISTENs on CHANNEL, or None after logging why not."""
        try:
            conn = self.db.connect(autocommit=True, role_suffix=":listen")
        except DatabaseError as exc:
            log.warning("%s: roster listener cannot connect: %s", self.label, exc)
            return None
        try:
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
        except psycopg2.Error as exc:
            log.warning("%s: roster listener cannot LISTEN: %s", self.label, " ".join(str(exc).split()))
            conn.close()
            return None
        self.on_connected()
        self.ready.set()
        log.info("%s: roster listener connected", self.label)
        return conn

    def _serve(self, conn: Any) -> None:
        """Deliver notifications until stopped; raises when the connection is lost."""
        while not self._stop.is_set():
            readable, _, _ = select.select([conn, self._wake[0]], [], [], LISTEN_WAKE_INTERVAL)
            if conn in readable:
                conn.poll()
                while conn.notifies:
                    self.on_notify(conn.notifies.pop(0).payload)


# --------------------------------------------------------------------------- the manager


class GirlsManager:
    """The roster as one bot presents it, plus the admin writes and bulk import/export.

    Thread-safe. Reads are cached once `start_listener()` has connected; `close()` stops it.
    """

    def __init__(self, db: ConnectionManager, bot_name: str, roster_tags: tuple[str, ...] = (), *,
                 cache_size: int = 1024, cache_ttl: float = 60.0):
        self.db = db
        self.bot_name = bot_name
        self.roster_tags = tuple(roster_tags)
        self._presented = "visible AND tags && %(roster_tags)s::text[]" if self.roster_tags else "visible"
        self._origin = f"{os.getpid()}:{secrets.token_hex(6)}"  # tells our own notifications apart
        self._cache = _Cache(cache_size, cache_ttl)
        self._listener = _Listener(db, bot_name, self._on_notify, on_connected=lambda: self._cache.set_enabled(True),
                                   on_lost=self._on_listener_lost,
                                   on_stopped=lambda: self._cache.set_enabled(False))

    # -- reads: what this bot presents (cached)

    def count(self) -> int:
        return self._cached(("count",), lambda: self.db.fetchval(
            f"SELECT count(*) FROM dims_girls WHERE {self._presented}", self._params()))

    def page(self, number: int, per_page: int = 8) -> Page:
        """Page `number` (0-based, clamped into range) in the order lower(name), id."""
        if per_page < 1:
            raise ValueError(f"per_page must be at least 1, got {per_page}")
        return self._cached(("page", number, per_page), lambda: self._load_page(number, per_page))

    def get(self, profile_id: int) -> Profile:
        in_range = 0 < profile_id < 2 ** 63  # a bigint id; anything else names no profile
        found = in_range and self._cached(("get", profile_id), lambda: self._load_one("id = %(id)s", id=profile_id))
        if not found:
            raise ProfileNotFound(f"no profile with id {profile_id}")
        return found

    def find_by_name(self, name: str) -> Profile:
        name = _lookup_name(name)
        found = self._cached(("name", name), lambda: self._load_one("lower(name) = lower(%(name)s)", name=name))
        if found is None:
            raise ProfileNotFound(f"no profile named {_shown(name)}")
        return found

    def search(self, text: str, limit: int = 20) -> list[Profile]:
        """Profiles whose name, bio or a tag contains `text`, case-insensitively (wildcards literal)."""
        text = text.strip()
        if not text:
            raise RosterError("give some text to search for")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        return list(self._cached(("search", text, limit), lambda: self._load_search(text, limit)))

    def favourites(self, user_id: int) -> list[Profile]:
        """This user's favourites on this bot that this bot still presents."""
        return list(self._cached(("favourites", user_id), lambda: tuple(self._fetch(
            f"SELECT {_SELECT_G} FROM dims_favourites f "
            f"JOIN dims_girls g ON g.id = f.girl_id "
            f"WHERE f.bot = %(bot)s AND f.user_id = %(user)s AND {self._presented} "
            f"ORDER BY lower(g.name), g.id", user=user_id))))

    def is_favourite(self, user_id: int, profile_id: int) -> bool:
        return any(profile.id == profile_id for profile in self.favourites(user_id))

    def _params(self, **values: Any) -> dict[str, Any]:
        return {"roster_tags": list(self.roster_tags), "bot": self.bot_name, **values}

    def _fetch(self, sql: str, **values: Any) -> list[Profile]:
        return [_profile(row) for row in self.db.fetchall(sql, self._params(**values))]

    def _load_one(self, condition: str, **values: Any) -> Profile | None:
        found = self._fetch(f"SELECT {_SELECT} FROM dims_girls WHERE {condition} AND {self._presented}", **values)
        return found[0] if found else None

    def _load_page(self, number: int, per_page: int) -> Page:
        with self.db.transaction() as tx:
            tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # count and rows agree
            total = tx.fetchval(f"SELECT count(*) FROM dims_girls WHERE {self._presented}", self._params())
            pages = max(1, math.ceil(total / per_page))
            number = min(max(number, 0), pages - 1)
            rows = tx.fetchall(f"SELECT {_SELECT} FROM dims_girls WHERE {self._presented} "
                               f"ORDER BY lower(name), id LIMIT %(limit)s OFFSET %(offset)s",
                               self._params(limit=per_page, offset=number * per_page))
        return Page(tuple(_profile(row) for row in rows), number, pages, total)

    def _load_search(self, text: str, limit: int) -> tuple[Profile, ...]:
        if not _storable(text):
            return ()
        matches = "ILIKE %(pattern)s ESCAPE '\\'"
        # Tags hold only [a-z0-9_-] (a CHECK says so): other text is in no tag, and text without a
        # space cannot reach across the space between two tags, so one ILIKE over the joined tags
        # finds a tag containing it (a third of the cost of a subquery over unnest(tags) per row).
        in_tags = f" OR array_to_string(tags, ' ') {matches}" if _TAG_TEXT.fullmatch(text.lower()) else ""
        return tuple(self._fetch(
            f"SELECT {_SELECT} FROM dims_girls WHERE {self._presented} "
            f"AND (name {matches} OR bio {matches}{in_tags}) "
            f"ORDER BY lower(name), id LIMIT %(limit)s", pattern=_like_pattern(text), limit=limit))

    def _cached(self, key: tuple, load: Callable[[], Any]) -> Any:
        found, value, token = self._cache.lookup(key)
        if found:
            return value
        if _CACHE_ONLY.get():
            raise NotCached(key)
        value = load()
        self._cache.store(key, value, token)
        return value

    # -- writes (admins address profiles by name, hidden or not, whatever the roster_tags)

    def add(self, name: str, bio: str = "", tags: Iterable[str] | str = (), photo: str | None = None) -> Profile:
        values = {"name": clean_name(name), "bio": clean_bio(bio), "tags": list(clean_tags(tags)),
                  "photo": clean_photo(photo)}
        return self._write_one("added", f"INSERT INTO dims_girls (name, bio, tags, photo) "
                               f"VALUES (%(name)s, %(bio)s, %(tags)s, %(photo)s) RETURNING {_SELECT}",
                               values, values["name"], conflict=values["name"])

    def edit(self, name: str, field: str, value: str) -> Profile:
        """Set one of EDITABLE_FIELDS; tags as "a,b c"; photo "-" or "" clears it."""
        field = field.strip().lower()
        if field not in EDITABLE_FIELDS:
            raise RosterError(f"cannot edit {_shown(field)}; editable fields: {', '.join(EDITABLE_FIELDS)}")
        cleaner: Callable[[Any], Any] = {"name": clean_name, "bio": clean_bio, "photo": clean_photo,
                                         "tags": lambda v: list(clean_tags(v))}[field]
        new_value = cleaner(value)
        return self._update(f"edited {field} of", name, f"{field} = %(value)s", value=new_value,
                            conflict=new_value if field == "name" else None)

    def hide(self, name: str) -> Profile:
        return self._update("hid", name, "visible = false")

    def show(self, name: str) -> Profile:
        return self._update("showed", name, "visible = true")

    def delete(self, name: str) -> Profile:
        """Delete a profile (its favourites go with it); returns what was deleted."""
        name = _lookup_name(name)
        return self._write_one("deleted", f"DELETE FROM dims_girls WHERE lower(name) = lower(%(name)s) "
                               f"RETURNING {_SELECT}", {"name": name}, name)

    def get_any(self, name: str) -> Profile:
        """By name, hidden ones included (admin use; not cached)."""
        name = _lookup_name(name)
        rows = self.db.fetchall(f"SELECT {_SELECT} FROM dims_girls WHERE lower(name) = lower(%s)", (name,))
        if not rows:
            raise ProfileNotFound(f"no profile named {_shown(name)}")
        return _profile(rows[0])

    def all_profiles(self) -> list[Profile]:
        """Every profile, hidden ones included, in roster order (admin use; not cached)."""
        return [_profile(row) for row in self.db.fetchall(f"SELECT {_SELECT} FROM dims_girls ORDER BY lower(name), id")]

    def toggle_favourite(self, user_id: int, name: str) -> tuple[Profile, bool]:
        """Add or remove a favourite among the profiles this bot presents; (profile, now favourite)."""
        name = _lookup_name(name)
        with self.db.transaction() as tx:
            row = tx.fetchone(f"SELECT {_SELECT} FROM dims_girls WHERE lower(name) = lower(%(name)s) "
                              f"AND {self._presented} FOR KEY SHARE", self._params(name=name))
            if row is None:
                raise ProfileNotFound(f"no profile named {_shown(name)}")
            profile = _profile(row)
            key = self._params(user=user_id, girl=profile.id)
            removed = tx.execute("DELETE FROM dims_favourites WHERE bot = %(bot)s AND user_id = %(user)s "
                                 "AND girl_id = %(girl)s", key)
            if not removed:
                tx.execute("INSERT INTO dims_favourites (bot, user_id, girl_id) VALUES (%(bot)s, %(user)s, %(girl)s) "
                           "ON CONFLICT DO NOTHING", key)
            self._notify(tx, kind="favourites", bot=self.bot_name, user=user_id)
        self._cache.invalidate([("favourites", user_id)])
        return profile, not removed

    def touch_user(self, user_id: int, username: str | None, first_name: str | None) -> None:
        """Record that this user used this bot: first_seen once, last_seen every time."""
        self.db.execute("INSERT INTO dims_users (bot, user_id, username, first_name) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (bot, user_id) DO UPDATE SET username = EXCLUDED.username, "
                        "first_name = EXCLUDED.first_name, last_seen = now()",
                        (self.bot_name, user_id, username, first_name))

    def _update(self, action: str, name: str, assignment: str, *, value: Any = None,
                conflict: str | None = None) -> Profile:
        name = _lookup_name(name)
        return self._write_one(action, f"UPDATE dims_girls SET {assignment}, updated_at = now() "
                               f"WHERE lower(name) = lower(%(name)s) RETURNING {_SELECT}",
                               {"name": name, "value": value}, name, conflict=conflict)

    def _write_one(self, action: str, sql: str, params: dict[str, Any], name: str, *,
                   conflict: str | None = None) -> Profile:
        """One roster statement returning the profile it changed; notified, invalidated, logged."""
        try:
            with self.db.transaction() as tx:
                row = tx.fetchone(sql, params)
                if row is None:
                    raise ProfileNotFound(f"no profile named {_shown(name)}")
                self._notify(tx, kind="roster")
        except psycopg2.errors.UniqueViolation:
            existing = self.db.fetchval("SELECT name FROM dims_girls WHERE lower(name) = lower(%s)", (conflict,))
            raise NameTaken(existing or conflict) from None
        self._cache.invalidate()
        profile = _profile(row)
        log.info("%s: roster: %s %r (id %d)", self.bot_name, action, profile.name, profile.id)
        return profile

    def _notify(self, tx: Transaction, **message: Any) -> None:
        """Queue a notification; PostgreSQL delivers it when (and only if) the transaction commits."""
        tx.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"origin": self._origin, **message})))

    # -- bulk, for the CLI

    def export(self) -> list[dict[str, Any]]:
        """Every profile, hidden ones too, JSON-ready; ids are left out (import matches by name)."""
        return [{k: v for k, v in profile.as_dict().items() if k != "id"} for profile in self.all_profiles()]

    def import_profiles(self, rows: list[dict], *, replace: bool = False) -> dict[str, int]:
        """Upsert by name in one transaction; with `replace`, delete the profiles the rows don't name.

        Every row is validated first: any bad row raises ImportRejected and nothing changes. A
        field missing from a row keeps its current value (or the default, for a new profile).
        Returns {"added", "updated", "unchanged", "deleted"}.
        """
        cleaned = _clean_rows(rows)
        counts = {"added": 0, "updated": 0, "unchanged": 0, "deleted": 0}
        with self.db.transaction() as tx:
            tx.execute("LOCK TABLE dims_girls IN SHARE ROW EXCLUSIVE MODE")
            existing = tx.fetchall(f"SELECT {_SELECT_G} FROM unnest(%s::text[]) WITH ORDINALITY AS r(name, n) "
                                   f"LEFT JOIN dims_girls g ON lower(g.name) = lower(r.name) ORDER BY r.n",
                                   ([values["name"] for values in cleaned],))
            kept = [self._upsert(tx, values, _profile(row) if row[0] is not None else None, counts)
                    for values, row in zip(cleaned, existing)]
            if replace:
                counts["deleted"] = tx.execute("DELETE FROM dims_girls WHERE NOT (id = ANY(%s))", (kept,))
            changed = counts["added"] or counts["updated"] or counts["deleted"]
            if changed:
                self._notify(tx, kind="roster")
        if changed:
            self._cache.invalidate()
        log.info("%s: roster import: %s", self.bot_name, counts)
        return counts

    @staticmethod
    def _upsert(tx: Transaction, values: dict[str, Any], current: Profile | None, counts: dict[str, int]) -> int:
        """Insert or update one cleaned row; returns the profile's id and counts what it did."""
        content = {"bio": "", "tags": (), "photo": None, "visible": True}
        if current is not None:
            content = {key: getattr(current, key) for key in content}
        content.update({key: values[key] for key in ("name", "bio", "tags", "photo", "visible") if key in values})
        params = {**content, "tags": list(content["tags"]),
                  "created_at": values.get("created_at"), "updated_at": values.get("updated_at")}
        if current is None:
            counts["added"] += 1
            return tx.fetchval("INSERT INTO dims_girls (name, bio, tags, photo, visible, created_at, updated_at) "
                               "VALUES (%(name)s, %(bio)s, %(tags)s, %(photo)s, %(visible)s, "
                               "COALESCE(%(created_at)s::timestamptz, now()), "
                               "COALESCE(%(updated_at)s::timestamptz, %(created_at)s::timestamptz, now())) "
                               "RETURNING id", params)
        if all(getattr(current, key) == value for key, value in content.items()):
            counts["unchanged"] += 1
            return current.id
        counts["updated"] += 1
        tx.execute("UPDATE dims_girls SET name = %(name)s, bio = %(bio)s, tags = %(tags)s, photo = %(photo)s, "
                   "visible = %(visible)s, updated_at = COALESCE(%(updated_at)s::timestamptz, now()) "
                   "WHERE id = %(id)s", {**params, "id": current.id})
        return current.id

    # -- cache and cross-process invalidation

    def cache_stats(self) -> dict[str, Any]:
        """{"hits", "misses", "hit_rate", "entries", "evictions", "invalidations"}."""
        return self._cache.stats()

    def start_listener(self) -> None:
        """Listen for other processes' roster changes in a background thread; enables the cache."""
        self._listener.start()

    def stop_listener(self, timeout: float = 5.0) -> None:
        self._listener.stop(timeout)

    def close(self) -> None:
        self.stop_listener()

    def wait_listening(self, timeout: float) -> bool:
        """True once the listener is connected (and the cache serving), False after `timeout`."""
        return self._listener.ready.wait(timeout)

    def wait_invalidations(self, count: int, timeout: float) -> bool:
        """True once this manager has applied `count` invalidations in all, False after `timeout`."""
        return self._cache.wait_invalidations(count, timeout)

    def _on_notify(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            message = {}  # not ours to understand: flush, to be safe
        if message.get("origin") == self._origin:
            return  # our own write, invalidated when it committed
        if message.get("kind") != "favourites":
            self._cache.invalidate()
        elif message.get("bot") == self.bot_name:
            self._cache.invalidate([("favourites", message.get("user"))])

    def _on_listener_lost(self) -> None:
        self._cache.set_enabled(False)
        self._cache.invalidate()
