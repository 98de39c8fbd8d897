"""The durable inbox of one bot: every update Telegram sends is stored here (`dims_inbox`, keyed
by Telegram's bot id and update_id) before it is confirmed to Telegram, marked done when its
handler finished, parked as dead when its handler keeps failing, and pruned after a few days
(with the dead updates an operator discarded; `inbox_commands` is the operator's side).

Called by `bot.BotRunner` (through `asyncio.to_thread`: psycopg2 blocks) and by the tests.
Synchronous and small: each method is one statement. Imports the standard library and the
database layer's pool type; never telegram.
"""

from __future__ import annotations

import json
from typing import Any

from db_pool import ConnectionManager

MAX_ATTEMPTS = 3                       # handler failures before an update is parked as dead
INBOX_RETENTION_S = 3 * 24 * 3600      # done rows are deleted after this long


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

    def park(self, update_id: int, error: str) -> bool:
        """Park a pending update as dead at once (not its handler's fault, but it cannot be
        answered now); True if it was pending."""
        status = self.db.fetchval(
            "UPDATE dims_inbox SET status = 'dead', error = %s WHERE bot_id = %s AND update_id = %s "
            "AND status = 'pending' RETURNING status", (error[:2000], self.bot_id, update_id))
        return status == "dead"

    def counts(self) -> dict[str, int]:
        rows = self.db.fetchall("SELECT status, count(*) FROM dims_inbox WHERE bot_id = %s AND status <> 'done' "
                                "GROUP BY status", (self.bot_id,))
        found = dict(rows)
        return {"backlog": found.get("pending", 0), "dead": found.get("dead", 0)}

    def prune(self, older_than_s: float = INBOX_RETENTION_S) -> int:
        """Delete done rows, and those an operator discarded, older than `older_than_s`."""
        return self.db.execute(
            "DELETE FROM dims_inbox WHERE bot_id = %s AND status IN ('done', 'discarded') "
            "AND done_at < now() - make_interval(secs => %s)",
            (self.bot_id, older_than_s))

