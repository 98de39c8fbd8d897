"""The fleet's health as an operator and a monitor read it: `ok`, `degraded` or `down`, for each
bot, for the database, and in all, with every problem named.

`system_health()` turns what the supervisor reports (its `bot_list` answer) and what the
database says (latency, migrations, inbox counts) into the `system_health --json` object. A bot
is `ok` when it is wanted, RUNNING, with a fresh heartbeat and no problem of its own (its
heartbeats carry what keeps it from its work, e.g. an unreachable database); `down` when it is
wanted but not running; `degraded` in between. Each bot's entry also carries its inbox (pending
and dead updates, the age of the oldest dead one); a bot's dead updates are a problem of their
own, naming the command that shows them, until they are retried successfully or discarded. The
whole is `down` without a supervisor or a database, `degraded` with any problem, else `ok`.

Called by the operator CLI. Pure functions of their arguments; standard library only, nothing
of DIMS (the caller gathers the facts).
"""

from __future__ import annotations

from typing import Any

INBOX_SQL = """
    SELECT bot, count(*) FILTER (WHERE status = 'pending') AS backlog,
           count(*) FILTER (WHERE status = 'dead') AS dead,
           round(extract(epoch FROM now() - min(received_at) FILTER (WHERE status = 'dead'))::numeric, 1)::float8
               AS oldest_dead_age_s
      FROM dims_inbox WHERE status IN ('pending', 'dead') GROUP BY bot ORDER BY bot"""


def bot_health(row: dict[str, Any], heartbeat_timeout: float) -> dict[str, Any]:
    """One bot's health from its bot_list row: ok (reason null), degraded or down, with the reason."""
    report = {"name": row["name"], "state": row["state"], "status": "ok", "reason": None}
    if row["wanted"] == "stopped":
        report["reason"] = "stopped by an operator"
    elif row["state"] != "RUNNING":
        why = row.get("problem") or row["last_error"]
        report.update(status="down", reason=f"{row['state']}" + (f": {why}" if why else ""))
    elif row["heartbeat_age_s"] is None or row["heartbeat_age_s"] > heartbeat_timeout:
        report.update(status="degraded", reason=f"no heartbeat for {row['heartbeat_age_s']} s")
    elif row.get("problem"):
        report.update(status="degraded", reason=row["problem"])
    return report


def database_health(facts: dict[str, Any]) -> dict[str, Any]:
    """The database's health from what it answered ({"latency_ms", "migrations", "inbox"}) or
    why it could not ({"error"})."""
    if "error" in facts:
        return {"status": "down", "reason": facts["error"]}
    report = {"status": "ok", **facts}
    reasons = []
    migrations = facts["migrations"]
    if migrations["pending"]:
        reasons.append(f"{migrations['pending']} migrations pending (run db_migrate)")
    if migrations["drifted"]:
        reasons.append(f"{len(migrations['drifted'])} migrations drifted")
    if reasons:
        report.update(status="degraded", reason="; ".join(reasons))
    return report


def bot_inbox(row: dict[str, Any] | None) -> dict[str, Any]:
    """A bot's entry "inbox" from its row of INBOX_SQL (None: nothing pending or dead)."""
    row = row or {}
    return {"pending": row.get("backlog", 0), "dead": row.get("dead", 0),
            "oldest_dead_age_s": row.get("oldest_dead_age_s")}


def dead_problem(row: dict[str, Any]) -> str:
    """The problem of a bot with dead updates: how many, since when, and what to do."""
    count = row["dead"]
    return (f"bot {row['bot']}: {count} dead update{'s' if count != 1 else ''} in the inbox, the oldest received "
            f"{_duration(row['oldest_dead_age_s'] or 0)} ago: inbox_list {row['bot']} shows them, "
            f"inbox_retry or inbox_discard deals with them")


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def system_health(fleet: dict[str, Any] | None, unreachable: str | None, database: dict[str, Any]) -> dict[str, Any]:
    """The `system_health` object from the supervisor's bot_list answer (None, with the reason
    it could not be asked) and the database's facts."""
    problems: list[str] = []
    if fleet is None:
        supervisor, bots = {"status": "down", "reason": unreachable}, []
        problems.append(unreachable)
    else:
        supervisor = {"status": "ok", "reason": None, **fleet["supervisor"]}
        agent = supervisor.get("database_agent")
        if agent and agent["state"] != "up":
            supervisor.update(status="degraded", reason=f"the database agent is down"
                              + (f" for {agent['down_s']:g} s" if agent.get("down_s") is not None else "")
                              + (f" ({agent['last_error']})" if agent.get("last_error") else "")
                              + ": events are queued, not yet written")
            problems.append(f"supervisor: {supervisor['reason']}")
        bots = [bot_health(row, fleet["heartbeat_timeout_s"]) for row in fleet["bots"]]
        problems += [f"bot {b['name']}: {b['reason']}" for b in bots if b["status"] != "ok"]
    db = database_health(database)
    if db["status"] != "ok":
        problems.append(f"database: {db['reason']}")
    inbox = {row["bot"]: row for row in database.get("inbox", ())}   # none when the database did not answer
    for bot in bots:
        bot["inbox"] = bot_inbox(inbox.get(bot["name"])) if "error" not in database else None
    problems += [dead_problem(row) for row in inbox.values() if row["dead"]]   # removed bots' too
    if supervisor["status"] == "down" or db["status"] == "down":
        status = "down"
    elif problems:
        status = "degraded"
    else:
        status = "ok"
    return {"status": status, "problems": problems, "supervisor": supervisor, "bots": bots, "database": db}
