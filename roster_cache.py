"""The roster's per-process read cache, and the LISTEN thread that keeps it coherent.

`RosterCache` is what `girls_manager.GirlsManager` reads through: an LRU with a TTL (`_Cache`)
that serves only while its listener (`_Listener`) holds a LISTEN connection on `CHANNEL`. A
writer `announce()`s its change inside its transaction (`pg_notify`, delivered on commit) and
`invalidate()`s its own process's entries once it has committed; every other process's listener
drops what the notification names. When the LISTEN connection is lost the cache is flushed and
switched off until the listener has reconnected (capped backoff, `backoff.Backoff`), so nothing
stale is served. `cache_only()` lets an event loop try a read inline: inside it a read answers
from the cache or raises `NotCached`, never touching the database.

Called by `girls_manager` (which re-exports `NotCached` and `cache_only`). Imports the standard
library, psycopg2, `db_pool` (the database layer's pool) and `backoff`; never telegram, and nothing
of the roster above it (`girls_manager`, `roster_rules`): cache keys and values are opaque here.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import secrets
import select
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from time import monotonic
from typing import Any

import psycopg2

from backoff import Backoff
from db_pool import ConnectionManager, DatabaseError, Transaction

log = logging.getLogger(__name__)

CHANNEL = "dims_roster"  # the NOTIFY channel every roster write and favourite change goes to
LISTEN_BACKOFF_INITIAL, LISTEN_BACKOFF_MAX = 0.1, 5.0
LISTEN_WAKE_INTERVAL = 5.0  # the listener's select() deadline; stop wakes it at once anyway


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


def favourites_key(user_id: int) -> tuple:
    """The cache key of one user's favourites: the one key a notification names."""
    return ("favourites", user_id)


# --------------------------------------------------------------------------- the face


class RosterCache:
    """One bot's cached roster reads in this process, kept coherent across processes by NOTIFY.

    Thread-safe. Serves only between `start()` (once the listener is connected) and `stop()`;
    until then, and while the listener is reconnecting, every read goes to `load`.
    """

    def __init__(self, db: ConnectionManager, bot_name: str, size: int, ttl: float, *,
                 reconnect: Backoff | None = None):
        self.bot_name = bot_name
        self._origin = f"{os.getpid()}:{secrets.token_hex(6)}"  # tells our own notifications apart
        self._entries = _Cache(size, ttl)
        self._listener = _Listener(db, bot_name, self._on_notify,
                                   on_connected=lambda: self._entries.set_enabled(True),
                                   on_lost=self._on_lost,
                                   on_stopped=lambda: self._entries.set_enabled(False),
                                   reconnect=reconnect or Backoff(LISTEN_BACKOFF_INITIAL, LISTEN_BACKOFF_MAX))

    def read(self, key: tuple, load: Callable[[], Any]) -> Any:
        """The cached value of `key`, else `load()` (cached unless an invalidation raced it)."""
        found, value, token = self._entries.lookup(key)
        if found:
            return value
        if _CACHE_ONLY.get():
            raise NotCached(key)
        value = load()
        self._entries.store(key, value, token)
        return value

    def announce(self, tx: Transaction, *, favourites_of: int | None = None) -> None:
        """Tell every process of a change to the roster, or to one user's favourites on this bot.

        Queued in the writer's transaction: PostgreSQL delivers it when (and only if) it commits.
        """
        message: dict[str, Any] = {"origin": self._origin, "kind": "roster"}
        if favourites_of is not None:
            message.update(kind="favourites", bot=self.bot_name, user=favourites_of)
        tx.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(message)))

    def invalidate(self, *, favourites_of: int | None = None) -> None:
        """Drop, in this process, what a committed change made stale (everything, or one user's
        favourites); other processes drop it when the announcement reaches them."""
        self._entries.invalidate(None if favourites_of is None else [favourites_key(favourites_of)])

    def stats(self) -> dict[str, Any]:
        """{"hits", "misses", "hit_rate", "entries", "evictions", "invalidations"}."""
        return self._entries.stats()

    def start(self) -> None:
        """Start the listener thread (idempotent); the cache serves once it has connected."""
        self._listener.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._listener.stop(timeout)

    def wait_listening(self, timeout: float) -> bool:
        """True once the listener is connected (and the cache serving), False after `timeout`."""
        return self._listener.ready.wait(timeout)

    def wait_invalidations(self, count: int, timeout: float) -> bool:
        """True once `count` invalidations have been applied in all, False after `timeout`."""
        return self._entries.wait_invalidations(count, timeout)

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
            self._entries.invalidate()
        elif message.get("bot") == self.bot_name:
            self._entries.invalidate([favourites_key(message.get("user"))])

    def _on_lost(self) -> None:
        self._entries.set_enabled(False)
        self._entries.invalidate()


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
    A failed attempt is logged once per doubling of the delay, not at every attempt.
    """

    def __init__(self, db: ConnectionManager, label: str, on_notify: Callable[[str], None],
                 on_connected: Callable[[], None], on_lost: Callable[[], None],
                 on_stopped: Callable[[], None], reconnect: Backoff):
        self.db, self.label = db, label
        self.on_notify, self.on_connected, self.on_lost, self.on_stopped = \
            on_notify, on_connected, on_lost, on_stopped
        self.reconnect = reconnect
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
        self.reconnect.reset()
        down_since: float | None = None   # no connection since then (a loss or a failed attempt)
        connected_before = False
        try:
            while not self._stop.is_set():
                try:
                    conn = self._connect()
                except DatabaseError as exc:
                    down_since = monotonic() if down_since is None else down_since
                    self._stop.wait(self._retry_delay(exc))
                    continue
                self._log_connected(down_since, connected_before)
                down_since, connected_before = None, True
                self.reconnect.reset()
                self.on_connected()
                self.ready.set()
                try:
                    self._serve(conn)
                except (psycopg2.Error, OSError, ValueError) as exc:
                    self.ready.clear()
                    down_since = monotonic()
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

    def _retry_delay(self, exc: DatabaseError) -> float:
        """The wait before the next attempt; the failure is logged only when the delay has doubled."""
        delay = self.reconnect.next()
        if self.reconnect.grew:
            then = f", then every {self.reconnect.cap:g} s without logging" if self.reconnect.capped else ""
            log.warning("%s: roster listener %s; cache off, attempt %d, next in %.2f s%s",
                        self.label, exc, self.reconnect.failures, delay, then)
        return delay

    def _log_connected(self, down_since: float | None, again: bool) -> None:
        """One line per connection; after a loss or failed attempts it says how long it took."""
        if down_since is None:
            log.info("%s: roster listener connected", self.label)
            return
        failures = self.reconnect.failures
        log.info("%s: roster listener %s after %.2f s (%d failed attempt%s); cache on",
                 self.label, "reconnected" if again else "connected", monotonic() - down_since,
                 failures, "" if failures == 1 else "s")

    def _connect(self) -> Any:
        """A connection that LISTENs on CHANNEL; DatabaseError says why there is none."""
        conn = self.db.connect(autocommit=True, role_suffix=":listen")
        try:
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {CHANNEL}")
        except psycopg2.Error as exc:
            conn.close()
            raise DatabaseError(f"cannot LISTEN: {' '.join(str(exc).split())}") from None
        return conn

    def _serve(self, conn: Any) -> None:
        """Deliver notifications until stopped; raises when the connection is lost."""
        while not self._stop.is_set():
            readable, _, _ = select.select([conn, self._wake[0]], [], [], LISTEN_WAKE_INTERVAL)
            if conn in readable:
                conn.poll()
                while conn.notifies:
                    self.on_notify(conn.notifies.pop(0).payload)
