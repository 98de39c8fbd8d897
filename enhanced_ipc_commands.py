"""The operator CLI: `python enhanced_ipc_commands.py COMMAND [ARGS] [--json] [--config PATH]`.

`EnhancedIPCCommands` holds one method per command; `COMMANDS` maps each name to its method and
to the function that declares its arguments, so a new command is one method and one entry.
Database commands talk to PostgreSQL through the connection manager. Human output is a short
aligned table; with `--json`, stdout is exactly one JSON object. Errors go to stderr.

Exit status: 0 success / healthy, 1 failed / not healthy, 2 usage or configuration error,
3 the supervisor is not running. This module must stay light: it never imports telegram.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from config import Config, ConfigError, install_log_redaction, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_SUPERVISOR = 0, 1, 2, 3


class CommandError(Exception):
    """A command failed; the message is for the operator, `exit_code` for scripts."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, payload: dict[str, Any] | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.payload = payload or {}


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as an aligned text table with a header line."""
    cells = [[str(row.get(c, "")) if row.get(c) is not None else "-" for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


class EnhancedIPCCommands:
    """The operator commands. Each returns (exit status, result object) and prints nothing."""

    def __init__(self, config: Config):
        self.config = config

    # -- database

    def _database(self, role: str = "cli"):
        from multiprocess_connection_manager import DatabaseIntegrationManager
        return DatabaseIntegrationManager(self.config, role=role, pool_max=1)

    def db_status(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        from multiprocess_connection_manager import DatabaseError, Migrator
        manager = self._database()
        result: dict[str, Any] = {"connected": False, "embedded": manager.embedded is not None}
        try:
            db = manager.connection_manager()
            result["target"] = db.target
            started = time.perf_counter()
            version, server_started = db.fetchone("SELECT current_setting('server_version'), pg_postmaster_start_time()")
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                db.fetchval("SELECT 1")
                samples.append((time.perf_counter() - t0) * 1000)
            result.update(connected=True, server_version=version, server_started=server_started.isoformat(),
                          latency_ms=round(min(samples), 3),
                          connect_ms=round((time.perf_counter() - started) * 1000 - sum(samples), 1))
            result["migrations"] = Migrator(db).status().as_dict()
            result["connections"] = db.fetchdicts(_CONNECTIONS_SQL)
            result["database_connections"] = db.fetchdicts(_DB_CONNECTIONS_SQL)[0]
        except DatabaseError as exc:
            result["error"] = str(exc)
            return EXIT_FAILED, result
        finally:
            manager.shutdown()
        healthy = not result["migrations"]["drifted"]
        return (EXIT_OK if healthy else EXIT_FAILED), result

    def db_migrate(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        from multiprocess_connection_manager import DatabaseError, Migrator
        manager = self._database(role="cli:migrate")
        try:
            db = manager.connection_manager()
            migrations = Migrator(db).migrate(dry_run=args.dry_run)
            status = Migrator(db).status().as_dict()
        except DatabaseError as exc:
            raise CommandError(str(exc)) from None
        finally:
            manager.shutdown()
        return EXIT_OK, {"dry_run": args.dry_run, "target": db.target,
                         "migrations": [m.label for m in migrations], "status": status}


_CONNECTIONS_SQL = """
    SELECT application_name AS process,
           count(*) AS total,
           count(*) FILTER (WHERE state = 'active') AS active,
           count(*) FILTER (WHERE state = 'idle') AS idle,
           count(*) FILTER (WHERE state LIKE 'idle in transaction%%') AS idle_in_transaction,
           array_agg(pid ORDER BY pid) AS server_pids
      FROM pg_stat_activity
     WHERE datname = current_database() AND application_name LIKE 'dims:%%'
     GROUP BY application_name ORDER BY application_name"""

_DB_CONNECTIONS_SQL = """
    SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend') AS in_use,
           current_setting('max_connections')::int AS server_max"""


# --------------------------------------------------------------------------- human output


def _show_db_status(result: dict[str, Any]) -> str:
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
    return "\n".join(lines)


def _show_db_migrate(result: dict[str, Any]) -> str:
    names = result["migrations"]
    if result["dry_run"]:
        return "would apply: " + ", ".join(names) if names else "nothing to apply: the database is up to date"
    if not names:
        return f"nothing to apply: the database is up to date ({result['status']['applied']} migrations)"
    return "applied: " + ", ".join(names)


# --------------------------------------------------------------------------- the command table


@dataclass(frozen=True)
class Command:
    run: Callable[[EnhancedIPCCommands, argparse.Namespace], tuple[int, dict[str, Any]]]
    show: Callable[[dict[str, Any]], str]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list pending migrations, apply nothing")


COMMANDS: dict[str, Command] = {
    "db_status": Command(EnhancedIPCCommands.db_status, _show_db_status,
                         "database reachability, version, latency, migrations, connections"),
    "db_migrate": Command(EnhancedIPCCommands.db_migrate, _show_db_migrate,
                          "apply pending migrations (safe to run concurrently)", _migrate_arguments),
}


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--json and --config, accepted before and after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    suppress = {} if defaults else {"default": argparse.SUPPRESS}
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout", **suppress)
    common.add_argument("--config", metavar="PATH", help="configuration file (default: $DIMS_CONFIG or ./dims.toml)",
                        **suppress)
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="enhanced_ipc_commands.py", description="DIMS operator commands",
                                     parents=[_common_options(defaults=True)])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    after = _common_options(defaults=False)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help, parents=[after]))
    return parser


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=stderr)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error already
        return EXIT_USAGE if exc.code else EXIT_OK
    command = COMMANDS[args.command]
    try:
        config = load_config(args.config)
        install_log_redaction(config.secrets())
        status, result = command.run(EnhancedIPCCommands(config), args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=stderr)
        return EXIT_USAGE
    except CommandError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), **exc.payload}), file=stdout)
        print(f"{args.command}: {exc}", file=stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(result, default=str), file=stdout)
    else:
        print(command.show(result), file=stdout)
    if status != EXIT_OK and not args.json and "error" in result:
        print(f"{args.command}: {result['error']}", file=stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
