"""The database connection budget: what a fleet needs of the server, what the embedded server is
given, and the refusal of a budget the server cannot hold.

Each bot process holds its pool and one listener connection; `CLI_RESERVED_CONNECTIONS` stay free
for the supervisor's database agent and operator commands (`config.pool_max_for` shrinks the
pools so that the whole stays within `[database] max_connections`). A server admits
`max_connections` clients, of which `superuser_reserved_connections` only for superusers; so a
fleet fits when its need is at most the difference. At start, DIMS reads both settings and refuses
(exit 2, naming both) a fleet that cannot fit, rather than letting bots fail one by one with
"too many clients" once they run. The embedded PostgreSQL is started with room for the whole
`[database] max_connections` budget and a few spare.

Called by the database agent (at the supervisor's start), by `bot.run` (`--single`) and by
`multiprocess_connection_manager` (the embedded server's size). Imports `config` only; the
server's settings come in as numbers.
"""

from __future__ import annotations

from typing import NamedTuple

from config import CLI_RESERVED_CONNECTIONS, DatabaseConfig, pool_max_for

SPARE_CONNECTIONS = 10   # the embedded server's room beyond DIMS's budget: superusers' reserve, a psql
EMBEDDED_MIN_CONNECTIONS = 100   # never fewer than PostgreSQL's own default

SETTINGS_SQL = ("SELECT current_setting('max_connections')::int, "
                "current_setting('superuser_reserved_connections')::int, "
                "coalesce(current_setting('reserved_connections', true)::int, 0)")   # PostgreSQL 16+


class Need(NamedTuple):
    """What a fleet of `processes` bot processes holds at most."""
    processes: int
    pool: int
    total: int

    def explain(self) -> str:
        return (f"{self.processes} bot process{'es' if self.processes != 1 else ''} x (pool {self.pool} + 1 "
                f"listener) + {CLI_RESERVED_CONNECTIONS} for the supervisor and operator commands")


def need(db: DatabaseConfig, processes: int) -> Need:
    """The connections a fleet of `processes` bot processes holds at most (ConfigError when
    `[database] max_connections` cannot give each its minimum)."""
    processes = max(1, processes)
    pool = pool_max_for(db, processes)
    return Need(processes, pool, processes * (pool + 1) + CLI_RESERVED_CONNECTIONS)


def embedded_max_connections(db: DatabaseConfig) -> int:
    """`max_connections` for the embedded server: the whole budget, and some spare."""
    return max(EMBEDDED_MIN_CONNECTIONS, db.max_connections + SPARE_CONNECTIONS)


def refusal(db: DatabaseConfig, processes: int, server_max: int, superuser_reserved: int,
            target: str, embedded: bool = False, reserved: int = 0) -> str | None:
    """Why the server cannot hold the fleet, naming its settings and what would fit; None when
    it fits. `embedded`: the server is DIMS's own, started earlier with a smaller budget;
    `reserved`: PostgreSQL 16's `reserved_connections` (for roles with pg_use_reserved_connections)."""
    wanted = need(db, processes)
    superuser_reserved += reserved   # both kept from everyone else
    room = server_max - superuser_reserved
    if wanted.total <= room:
        return None
    smallest = max(1, processes) * 2 + CLI_RESERVED_CONNECTIONS   # a pool of one for every process
    if embedded:
        fix = ("it keeps the max_connections it was started with: stop it (enhanced_ipc_commands.py db_stop, "
               "once DIMS is stopped) and DIMS starts it again with room for [database] max_connections")
    elif smallest <= room:
        fix = (f"set [database] max_connections = {room} (the pools then shrink to fit), or raise the server's "
               f"max_connections to {wanted.total + superuser_reserved} or more")
    else:
        fix = (f"raise the server's max_connections to {wanted.total + superuser_reserved} or more (or to "
               f"{smallest + superuser_reserved}, with [database] max_connections = {smallest}), or run fewer bots")
    kept = (f"superuser_reserved_connections = {superuser_reserved - reserved} and reserved_connections = "
            f"{reserved}" if reserved else f"superuser_reserved_connections = {superuser_reserved}")
    return (f"the fleet needs up to {wanted.total} database connections ({wanted.explain()}), but {target} "
            f"has max_connections = {server_max} with {kept}, so {room} for everyone else: {fix}")


def server_refusal(db, db_config: DatabaseConfig, processes: int, embedded: bool = False) -> str | None:
    """Read the server's two settings over `db` (a pool, `db_pool.ConnectionManager`) and say why
    the fleet cannot fit, or None."""
    server_max, superuser_reserved, reserved = db.fetchone(SETTINGS_SQL)
    return refusal(db_config, processes, server_max, superuser_reserved, db.target, embedded, reserved)
