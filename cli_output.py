"""How the operator CLI shows a result to a person: a function per command, named after it
(`bot_change` serves bot_start, bot_stop and bot_restart), from the command's result object to
the text printed without `--json` (mostly a short aligned table).

Pure functions of their arguments (the standard library, `control` for the cache_stats fields,
`roster_files` for an export shown on stdout, `inbox_commands` for the updates a retry or a
discard left alone); `enhanced_ipc_commands` imports this module as `show`. Kept apart from it
because Python compiles the script it is started with on every run but loads imported modules
from cached bytecode: what the script does not hold, an operator command does not wait for.
"""

from __future__ import annotations

from typing import Any

from control import CACHE_FIELDS


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as an aligned text table with a header line."""
    cells = [[str(row.get(c, "")) if row.get(c) is not None else "-" for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


# --------------------------------------------------------------------------- the fleet


def bot_list(result: dict[str, Any]) -> str:
    rows = [{**b, "uptime": age(b["uptime_s"]), "heartbeat": age(b["heartbeat_age_s"]),
             "updates": b["updates_handled"], "last_error": shorten(b["last_error"] or "", 50) or None}
            for b in result["bots"]]
    supervisor = result["supervisor"]
    head = f"supervisor pid {supervisor['pid']}, up {age(supervisor['uptime_s'])}\n"
    return head + format_table(rows, ["name", "state", "pid", "uptime", "restarts", "heartbeat", "updates", "last_error"])


def bot_change(result: dict[str, Any]) -> str:
    bot = result["bot"]
    pid = f" (pid {bot['pid']})" if bot["pid"] else ""
    already = "" if result["changed"] else " already"
    return f"bot {bot['name']} is{already} {bot['state']}{pid}"


def reload(result: dict[str, Any]) -> str:
    parts = [f"{what}: {', '.join(names)}" for what, names in result.items() if names]
    return "reloaded; " + ("; ".join(parts) if parts else "no bot changed")


def cache_stats(result: dict[str, Any]) -> str:
    rows = [{**b, "hit_rate": f"{b['hit_rate'] * 100:.1f}%" if b.get("hit_rate") is not None else None}
            for b in result["bots"]]
    return format_table(rows, ["name", *CACHE_FIELDS])


def system_health(result: dict[str, Any]) -> str:
    lines = [f"status: {result['status']}"]
    supervisor = result["supervisor"]
    lines.append(f"supervisor: {supervisor['status']}" + (f" (pid {supervisor['pid']})" if "pid" in supervisor else ""))
    database = result["database"]
    lines.append(f"database: {database['status']}" + (f" ({database['latency_ms']} ms)" if "latency_ms" in database else ""))
    if result["bots"]:
        rows = [{**b, "dead": (b.get("inbox") or {}).get("dead")} for b in result["bots"]]
        lines.append(format_table(rows, ["name", "state", "status", "dead", "reason"]))
    lines += [f"problem: {p}" for p in result["problems"]]
    return "\n".join(lines)


def inbox_list(result: dict[str, Any]) -> str:
    bot, counts = result["bot"], result["counts"]
    head = f"bot {bot}: {counts['dead']} dead, {counts['pending']} pending"
    if not result["updates"]:
        return f"{head}; no {'' if result['status'] == 'all' else result['status'] + ' '}updates"
    rows = [{**u, "age": age(u["age_s"]), "chat": u["chat_id"], "preview": shorten(u["preview"] or "", 30) or None,
             "error": shorten(u["error"] or "", 60) or None} for u in result["updates"]]
    lines = [head, format_table(rows, ["update_id", "status", "attempts", "age", "chat", "preview", "error"])]
    if any(u["status"] == "dead" for u in result["updates"]):
        lines.append(f"inbox_retry {bot} ID... (or --all) hands them to the bot again; "
                     f"inbox_discard {bot} ID... (or --all) gives up on them")
    return "\n".join(lines)


def inbox_change(result: dict[str, Any]) -> str:
    """inbox_retry and inbox_discard."""
    done = "retried" if "retried" in result else "discarded"
    ids = result[done]
    if ids:
        lines = [f"{done} {len(ids)} dead update{'s' if len(ids) != 1 else ''} of bot {result['bot']}: "
                 + ", ".join(map(str, ids))]
    else:
        lines = [f"bot {result['bot']} has no dead updates: none {done}"]
    if result["not_dead"]:
        import inbox_commands   # here: only this view words them
        lines.append("left alone, " + inbox_commands.not_dead_text(result["bot"], result["not_dead"]))
    if result.get("note"):
        lines.append(result["note"])
    return "\n".join(lines)


def chat(result: dict[str, Any]) -> str:
    return ""


# --------------------------------------------------------------------------- database and roster


def db_status(result: dict[str, Any]) -> str:
    if not result.get("connected"):
        return "database: unreachable"
    mig = result["migrations"]
    lines = [
        f"database:    {result['target']}{' (embedded)' if result['embedded'] else ''}",
        f"server:      PostgreSQL {result['server_version']}",
        f"latency:     {result['latency_ms']:.2f} ms (SELECT 1), connect {result['connect_ms']:.0f} ms",
        f"migrations:  {mig['applied']} applied, {mig['pending']} pending, {len(mig['drifted'])} drifted"
        + (f" (latest {mig['latest']})" if mig["latest"] else ""),
    ]
    lines += [f"  pending:   {name}" for name in mig["pending_names"]]
    lines += [f"  DRIFT:     {d['name']}: {d['reason']}" for d in mig["drifted"]]
    totals = result["database_connections"]
    lines.append(f"connections: {totals['in_use']} of {totals['server_max']} on the server; DIMS processes:")
    lines.append(format_table(result["connections"], ["process", "total", "active", "idle", "idle_in_transaction"]))
    if result.get("pools"):
        lines.append("bot pools (from each bot process):")
        lines.append(format_table(result["pools"], ["bot", "size", "in_use", "idle", "max", "waits", "timeouts",
                                                    "replaced"]))
    return "\n".join(lines)


def db_migrate(result: dict[str, Any]) -> str:
    names = result["migrations"]
    if result["dry_run"]:
        return "would apply: " + ", ".join(names) if names else "nothing to apply: the database is up to date"
    if not names:
        return f"nothing to apply: the database is up to date ({result['status']['applied']} migrations)"
    return "applied: " + ", ".join(names)


def db_stop(result: dict[str, Any]) -> str:
    if not result["stopped"]:
        return f"the embedded PostgreSQL in {result['data']} is not running"
    forced = f" (it was in use by {', '.join(u['process'] for u in result['users'])})" if result["users"] else ""
    return f"stopped the embedded PostgreSQL (pid {result['pid']}) in {result['data']}{forced}"


def girls_list(result: dict[str, Any]) -> str:
    rows = [{**girl, "visible": "yes" if girl["visible"] else "no", "tags": ",".join(girl["tags"]),
             "bio": shorten(girl["bio"], 40)} for girl in result["girls"]]
    return format_table(rows, ["id", "name", "visible", "tags", "bio"]) if rows else "no profiles"


def girls_add(result: dict[str, Any]) -> str:
    return f"added {result['girl']['name']!r} (id {result['girl']['id']})"


def girls_import(result: dict[str, Any]) -> str:
    deleted = f", {result['deleted']} deleted" if result["replace"] else ""
    return (f"imported {result['file']}: {result['added']} added, {result['updated']} updated, "
            f"{result['unchanged']} unchanged{deleted}")


def girls_export(result: dict[str, Any]) -> str:
    """Without --output the data itself is the output, with or without --json."""
    if "output" in result:
        return f"exported {result['count']} profiles to {result['output']} ({result['format']})"
    import roster_files   # here: only an export to stdout needs it
    text = result["csv"] if result["format"] == "csv" else roster_files.render(result["girls"], "json")
    return text.removesuffix("\n")
