"""The operator's side of the durable inbox (`dims_inbox`, see `inbox.py`): list a bot's
updates (the dead ones by default), retry dead updates (back to pending with no attempts
counted, for the bot to handle again) and discard them (they leave the dead list, are never
handled, and are pruned like done rows). Everything goes by the bot's DIMS name, so it works
from a shell without the bots' tokens, and on the database alone: whether the supervisor runs
does not matter here.

A retried update keeps the error of its last failure until it is handled: `inbox_list
--status pending` shows why it had died; once its handler succeeds it is done (and leaves every
list but `--status all`); if it fails `inbox.MAX_ATTEMPTS` times again it is dead again, with
the new error.

Called by the operator CLI (`enhanced_ipc_commands`: inbox_list, inbox_retry, inbox_discard),
which opens the database, tells the supervisor to wake the bot after a retry and shows the
result; and by the tests. Imports the standard library and `config` (to mask anything shaped
like a token in what it returns); never psycopg2 itself (it is handed a connection manager),
telegram, the supervisor, the control socket or the CLI.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from config import redact

STATUSES = ("pending", "dead", "discarded", "done")
LISTS = {"dead": ["dead"], "pending": ["pending"], "all": list(STATUSES)}   # inbox_list --status
PREVIEW_CHARS = 80
UPDATE_KINDS = ("message", "edited_message", "callback_query")   # bot.ALLOWED_UPDATES

# What retrying or discarding does to a dead row. Done rows are pruned by done_at; a discarded
# row is pruned the same way, counted from when it was discarded.
class Move(NamedTuple):
    done: str          # the result's key for the ids moved
    assignment: str    # what the move sets on a dead row


_MOVES = {
    "retry": Move("retried", "status = 'pending', attempts = 0"),
    "discard": Move("discarded", "status = 'discarded', done_at = now()"),
}


class InboxError(Exception):
    """The operator's input does not fit the inbox; `usage` for a mistake in the command line
    itself (an unknown bot), `payload` for scripts."""

    def __init__(self, message: str, usage: bool = False, payload: dict[str, Any] | None = None):
        super().__init__(message)
        self.usage = usage
        self.payload = payload or {}


def check_bot(db, bot: str, configured: list[str]) -> None:
    """InboxError(usage) unless the bot is configured or has updates in the inbox (a bot since
    removed from the configuration may still have dead updates to deal with)."""
    if bot in configured:
        return
    stored = [name for (name,) in db.fetchall("SELECT DISTINCT bot FROM dims_inbox ORDER BY bot")]
    if bot not in stored:
        known = ", ".join(sorted({*configured, *stored})) or "none"
        raise InboxError(f"bot {bot!r} is not configured and has no updates in the inbox (known: {known})",
                         usage=True)


def counts(db, bot: str) -> dict[str, int]:
    """How many of the bot's updates are in each status."""
    found = dict(db.fetchall("SELECT status, count(*) FROM dims_inbox WHERE bot = %s GROUP BY status", (bot,)))
    return {status: found.get(status, 0) for status in STATUSES}


def list_updates(db, bot: str, status: str = "dead", limit: int = 50,
                 secrets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The bot's newest `limit` updates in `status` ("dead", "pending" or "all")."""
    rows = db.fetchall(
        "SELECT update_id, status, attempts, extract(epoch FROM now() - received_at)::float8, error, payload "
        "FROM dims_inbox WHERE bot = %s AND status = ANY(%s) ORDER BY received_at DESC, update_id DESC LIMIT %s",
        (bot, LISTS[status], limit))
    updates = []
    for update_id, state, attempts, age_s, error, payload in rows:
        chat_id, preview = describe(payload)
        updates.append({"update_id": update_id, "status": state, "attempts": attempts, "age_s": round(age_s, 1),
                        "error": redact(error, secrets) if error else None, "chat_id": chat_id,
                        "preview": redact(preview, secrets) if preview else None})
    return {"bot": bot, "status": status, "updates": updates, "counts": counts(db, bot)}


def describe(payload: dict[str, Any]) -> tuple[int | None, str | None]:
    """An update's chat id and a short preview: the message's text (or caption), or a pressed
    button's data."""
    kind = next((k for k in UPDATE_KINDS if isinstance(payload.get(k), dict)), None)
    if kind is None:
        return None, None
    body = payload[kind]
    if kind == "callback_query":
        chat = (body.get("message") or {}).get("chat") or body.get("from") or {}
        text = f"button: {body['data']}" if body.get("data") is not None else None
    else:
        chat = body.get("chat") or {}
        text = body.get("text") or body.get("caption")
    if text is not None:
        text = " ".join(str(text).split())
        text = text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"
    return chat.get("id"), text


def retry(db, bot: str, ids: list[int] | None) -> dict[str, Any]:
    """Move the bot's dead updates `ids` (None: all of them) back to pending, attempts 0."""
    return _move_dead(db, bot, ids, "retry")


def discard(db, bot: str, ids: list[int] | None) -> dict[str, Any]:
    """Give up on the bot's dead updates `ids` (None: all of them): never handled, pruned later."""
    return _move_dead(db, bot, ids, "discard")


def _move_dead(db, bot: str, ids: list[int] | None, move: str) -> dict[str, Any]:
    """{"bot", "retried" or "discarded": [the ids moved], "not_dead": [{"update_id", "status"}]}: the ids
    named that are not dead, with their status (null: no such update of the bot). InboxError
    when ids were named and none of them is dead."""
    wanted = sorted(set(ids)) if ids is not None else None
    with db.transaction() as tx:
        moved = sorted({update_id for (update_id,) in tx.fetchall(
            f"UPDATE dims_inbox SET {_MOVES[move].assignment} WHERE bot = %s AND status = 'dead' "
            "AND (%s OR update_id = ANY(%s)) RETURNING update_id", (bot, wanted is None, wanted or []))})
        others = [i for i in wanted or () if i not in moved]
        statuses = dict(tx.fetchall("SELECT update_id, status FROM dims_inbox WHERE bot = %s AND update_id = ANY(%s)",
                                    (bot, others))) if others else {}
    not_dead = [{"update_id": i, "status": statuses.get(i)} for i in others]
    if wanted and not moved:
        raise InboxError(f"nothing to {move}: {not_dead_text(bot, not_dead)}", payload={"not_dead": not_dead})
    return {"bot": bot, _MOVES[move].done: moved, "not_dead": not_dead}


def not_dead_text(bot: str, not_dead: list[dict[str, Any]]) -> str:
    """"not dead updates of bot alpha: 5 (done), 9 (no such update)"."""
    each = ", ".join(f"{row['update_id']} ({row['status'] or 'no such update'})" for row in not_dead)
    return f"not dead updates of bot {bot}: {each}"
