"""The roster: the profiles ("girls") a bot presents, stored in PostgreSQL and cached per process.

`GirlsManager` is the roster domain for one bot: it validates profiles (messages a Telegram
user can act on), reads what the bot presents (every visible profile, or the visible ones
carrying one of the bot's `roster_tags`), writes admin changes, keeps favourites and the users
each bot has seen, and imports/exports the whole roster. `bot.py` calls it from worker threads
(`asyncio.to_thread`); the operator CLI calls it for roster administration.

This file is the face and the SQL; the rest of the roster lives beside it, and the names other
modules use are re-exported here (`__all__`), so they import from `girls_manager` only:
- `roster_rules`: the errors, `Profile` and `Page`, and the validation of every field;
- `roster_cache`: the per-process read cache and the LISTEN thread that keeps it coherent
  across processes (a write notifies inside its transaction; other processes drop what it
  names; a lost LISTEN connection switches the cache off until it is back).

Imports flow one way: `girls_manager` -> `roster_cache`, `roster_rules` -> the standard
library, psycopg2, `db_pool` (the database layer's pool), `backoff`; never telegram, and nothing
imports back up into this file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import psycopg2
import psycopg2.errors

from db_pool import ConnectionManager, Transaction
from roster_cache import NotCached, RosterCache, cache_only, favourites_key
from roster_rules import (
    EDITABLE_FIELDS, ImportRejected, NameTaken, Page, Profile, ProfileNotFound, RosterError,
    clean_bio, clean_name, clean_photo, clean_rows, clean_tags, like_pattern, lookup_name,
    may_be_in_a_tag, quoted, storable,
)

__all__ = [
    "EDITABLE_FIELDS", "GirlsManager", "ImportRejected", "NameTaken", "NotCached", "Page", "Profile",
    "ProfileNotFound", "RosterError", "cache_only",
]

log = logging.getLogger(__name__)

_COLUMNS = ("id", "name", "bio", "tags", "photo", "visible", "created_at", "updated_at")
_SELECT = ", ".join(_COLUMNS)
_SELECT_G = ", ".join(f"g.{column}" for column in _COLUMNS)  # the same, from dims_girls AS g


def _profile(row: tuple) -> Profile:
    values = dict(zip(_COLUMNS, row))
    return Profile(**{**values, "tags": tuple(values["tags"])})


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
        self._cache = RosterCache(db, bot_name, cache_size, cache_ttl)

    # -- reads: what this bot presents (cached)

    def count(self) -> int:
        return self._cache.read(("count",), lambda: self.db.fetchval(
            f"SELECT count(*) FROM dims_girls WHERE {self._presented}", self._params()))

    def page(self, number: int, per_page: int = 8) -> Page:
        """Page `number` (0-based, clamped into range) in the order lower(name), id."""
        if per_page < 1:
            raise ValueError(f"per_page must be at least 1, got {per_page}")
        return self._cache.read(("page", number, per_page), lambda: self._load_page(number, per_page))

    def get(self, profile_id: int) -> Profile:
        in_range = 0 < profile_id < 2 ** 63  # a bigint id; anything else names no profile
        found = in_range and self._cache.read(("get", profile_id), lambda: self._load_one("id = %(id)s", id=profile_id))
        if not found:
            raise ProfileNotFound(f"no profile with id {profile_id}")
        return found

    def find_by_name(self, name: str) -> Profile:
        name = lookup_name(name)
        found = self._cache.read(("name", name), lambda: self._load_one("lower(name) = lower(%(name)s)", name=name))
        if found is None:
            raise ProfileNotFound(f"no profile named {quoted(name)}")
        return found

    def search(self, text: str, limit: int = 20) -> list[Profile]:
        """Profiles whose name, bio or a tag contains `text`, case-insensitively (wildcards literal)."""
        text = text.strip()
        if not text:
            raise RosterError("give some text to search for")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        return list(self._cache.read(("search", text, limit), lambda: self._load_search(text, limit)))

    def favourites(self, user_id: int) -> list[Profile]:
        """This user's favourites on this bot that this bot still presents."""
        return list(self._cache.read(favourites_key(user_id), lambda: tuple(self._fetch(
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
        if not storable(text):
            return ()
        matches = "ILIKE %(pattern)s ESCAPE '\\'"
        # Tags hold only [a-z0-9_-] (a CHECK says so): other text is in no tag, and text without a
        # space cannot reach across the space between two tags, so one ILIKE over the joined tags
        # finds a tag containing it (a third of the cost of a subquery over unnest(tags) per row).
        in_tags = f" OR array_to_string(tags, ' ') {matches}" if may_be_in_a_tag(text) else ""
        return tuple(self._fetch(
            f"SELECT {_SELECT} FROM dims_girls WHERE {self._presented} "
            f"AND (name {matches} OR bio {matches}{in_tags}) "
            f"ORDER BY lower(name), id LIMIT %(limit)s", pattern=like_pattern(text), limit=limit))

    # -- writes (admins address profiles by name, hidden or not, whatever the roster_tags)

    def add(self, name: str, bio: str = "", tags: Iterable[str] | str = (), photo: str | None = None) -> Profile:
        values = {"name": clean_name(name), "bio": clean_bio(bio), "tags": list(clean_tags(tags)),
                  "photo": clean_photo(photo)}
        return self._write_one("added", f"INSERT INTO dims_girls (name, bio, tags, photo) "
                               f"VALUES (%(name)s, %(bio)s, %(tags)s, %(photo)s) RETURNING {_SELECT}",
                               values, values["name"], conflict=values["name"])

    def edit(self, name: str, field: str, value: str) -> Profile:
        """Set one of EDITABLE_FIELDS; tags as text "a, b" (commas only); photo "-" or "" clears it."""
        field = field.strip().lower()
        if field not in EDITABLE_FIELDS:
            raise RosterError(f"cannot edit {quoted(field)}; editable fields: {', '.join(EDITABLE_FIELDS)}")
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
        name = lookup_name(name)
        return self._write_one("deleted", f"DELETE FROM dims_girls WHERE lower(name) = lower(%(name)s) "
                               f"RETURNING {_SELECT}", {"name": name}, name)

    def get_any(self, name: str) -> Profile:
        """By name, hidden ones included (admin use; not cached)."""
        name = lookup_name(name)
        rows = self.db.fetchall(f"SELECT {_SELECT} FROM dims_girls WHERE lower(name) = lower(%s)", (name,))
        if not rows:
            raise ProfileNotFound(f"no profile named {quoted(name)}")
        return _profile(rows[0])

    def all_profiles(self) -> list[Profile]:
        """Every profile, hidden ones included, in roster order (admin use; not cached)."""
        return [_profile(row) for row in self.db.fetchall(f"SELECT {_SELECT} FROM dims_girls ORDER BY lower(name), id")]

    def toggle_favourite(self, user_id: int, name: str) -> tuple[Profile, bool]:
        """Add or remove a favourite among the profiles this bot presents; (profile, now favourite)."""
        name = lookup_name(name)
        with self.db.transaction() as tx:
            row = tx.fetchone(f"SELECT {_SELECT} FROM dims_girls WHERE lower(name) = lower(%(name)s) "
                              f"AND {self._presented} FOR KEY SHARE", self._params(name=name))
            if row is None:
                raise ProfileNotFound(f"no profile named {quoted(name)}")
            profile = _profile(row)
            key = self._params(user=user_id, girl=profile.id)
            removed = tx.execute("DELETE FROM dims_favourites WHERE bot = %(bot)s AND user_id = %(user)s "
                                 "AND girl_id = %(girl)s", key)
            if not removed:
                tx.execute("INSERT INTO dims_favourites (bot, user_id, girl_id) VALUES (%(bot)s, %(user)s, %(girl)s) "
                           "ON CONFLICT DO NOTHING", key)
            self._cache.announce(tx, favourites_of=user_id)
        self._cache.invalidate(favourites_of=user_id)
        return profile, not removed

    def touch_user(self, user_id: int, username: str | None, first_name: str | None) -> None:
        """Record that this user used this bot: first_seen once, last_seen every time."""
        self.db.execute("INSERT INTO dims_users (bot, user_id, username, first_name) VALUES (%s, %s, %s, %s) "
                        "ON CONFLICT (bot, user_id) DO UPDATE SET username = EXCLUDED.username, "
                        "first_name = EXCLUDED.first_name, last_seen = now()",
                        (self.bot_name, user_id, username, first_name))

    def _update(self, action: str, name: str, assignment: str, *, value: Any = None,
                conflict: str | None = None) -> Profile:
        name = lookup_name(name)
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
                    raise ProfileNotFound(f"no profile named {quoted(name)}")
                self._cache.announce(tx)
        except psycopg2.errors.UniqueViolation:
            existing = self.db.fetchval("SELECT name FROM dims_girls WHERE lower(name) = lower(%s)", (conflict,))
            raise NameTaken(existing or conflict) from None
        self._cache.invalidate()
        profile = _profile(row)
        log.info("%s: roster: %s %r (id %d)", self.bot_name, action, profile.name, profile.id)
        return profile

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
        cleaned = clean_rows(rows)
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
                self._cache.announce(tx)
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

    # -- the cache and cross-process invalidation (roster_cache)

    def cache_stats(self) -> dict[str, Any]:
        """{"hits", "misses", "hit_rate", "entries", "evictions", "invalidations"}."""
        return self._cache.stats()

    def start_listener(self) -> None:
        """Listen for other processes' roster changes in a background thread; enables the cache."""
        self._cache.start()

    def stop_listener(self, timeout: float = 5.0) -> None:
        self._cache.stop(timeout)

    def close(self) -> None:
        self.stop_listener()

    def wait_listening(self, timeout: float) -> bool:
        """True once the listener is connected (and the cache serving), False after `timeout`."""
        return self._cache.wait_listening(timeout)

    def wait_invalidations(self, count: int, timeout: float) -> bool:
        """True once this manager has applied `count` invalidations in all, False after `timeout`."""
        return self._cache.wait_invalidations(count, timeout)
