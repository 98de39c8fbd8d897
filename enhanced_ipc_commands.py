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
import csv
import io
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

    # -- roster

    def _with_roster(self, action: Callable[[Any], Any]) -> Any:
        """`action(GirlsManager)` on the migrated database, as bot "cli": the roster is global."""
        from girls_manager import GirlsManager, ImportRejected, RosterError
        from multiprocess_connection_manager import DatabaseError
        manager = self._database()
        try:
            return action(GirlsManager(manager.initialize_database_coordination(), "cli"))
        except ImportRejected as exc:
            raise CommandError(str(exc), payload={"errors": exc.problems}) from None
        except (RosterError, DatabaseError) as exc:
            raise CommandError(str(exc)) from None
        finally:
            manager.shutdown()

    def girls_list(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        profiles = self._with_roster(lambda roster: roster.all_profiles())
        return EXIT_OK, {"girls": [p.as_dict() for p in profiles if args.all or p.visible]}

    def girls_add(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        profile = self._with_roster(lambda roster: roster.add(args.name, args.bio, args.tags, args.photo))
        return EXIT_OK, {"girl": profile.as_dict()}

    def girls_import(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        rows, file_format = read_roster_file(args.file)
        counts = self._with_roster(lambda roster: roster.import_profiles(rows, replace=args.replace))
        return EXIT_OK, {"file": args.file, "format": file_format, "replace": args.replace, **counts}

    def girls_export(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        file_format = args.format or ("csv" if (args.output or "").lower().endswith(".csv") else "json")
        rows = self._with_roster(lambda roster: roster.export())
        result: dict[str, Any] = {"format": file_format, "count": len(rows)}
        if args.output:
            write_roster_file(args.output, render_roster(rows, file_format))
            result["output"] = args.output
        elif file_format == "csv":
            result["csv"] = render_roster(rows, "csv")
        else:
            result["girls"] = rows
        return EXIT_OK, result


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


# --------------------------------------------------------------------------- roster files and output

ROSTER_CSV_COLUMNS = ("name", "bio", "tags", "photo", "visible", "created_at", "updated_at")
_CSV_OPTIONAL = ("visible", "created_at", "updated_at")  # an empty cell: keep or default


def read_roster_file(path: str) -> tuple[list[Any], str]:
    """The rows of a JSON file (an array, or {"girls": [...]}) or, for *.csv, a CSV file with a
    header. A file that is missing or unparsable is a usage error (exit 2) naming the file."""
    file_format = "csv" if path.lower().endswith(".csv") else "json"
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            return (_csv_rows(path, fh) if file_format == "csv" else _json_rows(path, fh.read())), file_format
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text", EXIT_USAGE) from None


def _json_rows(path: str, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CommandError(f"{path}: not valid JSON: {exc}", EXIT_USAGE) from None
    if isinstance(data, dict) and isinstance(data.get("girls"), list):
        data = data["girls"]  # what `girls_export --json` prints
    if not isinstance(data, list):
        raise CommandError(f"{path}: expected a JSON array of profiles", EXIT_USAGE)
    return data


def _csv_rows(path: str, fh: TextIO) -> list[dict[str, Any]]:
    try:
        reader = csv.DictReader(fh, restkey="cells beyond the header")
        header = reader.fieldnames or []
        if "name" not in header or not set(header) <= set(ROSTER_CSV_COLUMNS):
            raise CommandError(f"{path}: the CSV header must have a name column and only these: "
                               f"{', '.join(ROSTER_CSV_COLUMNS)} (it has: {', '.join(header) or 'nothing'})",
                               EXIT_USAGE)
        return [{key: value for key, value in row.items()
                 if value is not None and not (value == "" and key in _CSV_OPTIONAL)} for row in reader]
    except csv.Error as exc:
        raise CommandError(f"{path}: not valid CSV: {exc}", EXIT_USAGE) from None


def render_roster(rows: list[dict[str, Any]], file_format: str) -> str:
    """Exported rows as the text of a JSON or CSV file (which girls_import reads back)."""
    if file_format == "json":
        return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"
    out = io.StringIO()
    writer = csv.DictWriter(out, ROSTER_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "tags": ",".join(row["tags"]), "photo": row["photo"] or "",
                         "visible": "true" if row["visible"] else "false"})
    return out.getvalue()


def write_roster_file(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror}", EXIT_USAGE) from None


def _show_girls_list(result: dict[str, Any]) -> str:
    rows = [{**girl, "visible": "yes" if girl["visible"] else "no", "tags": ",".join(girl["tags"]),
             "bio": _shorten(girl["bio"], 40)} for girl in result["girls"]]
    return format_table(rows, ["id", "name", "visible", "tags", "bio"]) if rows else "no profiles"


def _shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _show_girls_add(result: dict[str, Any]) -> str:
    return f"added {result['girl']['name']!r} (id {result['girl']['id']})"


def _show_girls_import(result: dict[str, Any]) -> str:
    deleted = f", {result['deleted']} deleted" if result["replace"] else ""
    return (f"imported {result['file']}: {result['added']} added, {result['updated']} updated, "
            f"{result['unchanged']} unchanged{deleted}")


def _show_girls_export(result: dict[str, Any]) -> str:
    """Without --output the data itself is the output, with or without --json."""
    if "output" in result:
        return f"exported {result['count']} profiles to {result['output']} ({result['format']})"
    text = result["csv"] if result["format"] == "csv" else render_roster(result["girls"], "json")
    return text.removesuffix("\n")


def _girls_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="include hidden profiles")


def _girls_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--bio", default="", metavar="TEXT")
    parser.add_argument("--tags", default="", metavar="a,b", help="comma- or space-separated tags")
    parser.add_argument("--photo", metavar="URL", help="an http(s) URL or a Telegram file id")


def _girls_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a JSON array of profiles; CSV with a header "
                        f"({','.join(ROSTER_CSV_COLUMNS)}) when it ends in .csv")
    parser.add_argument("--replace", action="store_true", help="also delete the profiles the file does not name")


def _girls_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("json", "csv"),
                        help="default: csv for an --output ending in .csv, else json")
    parser.add_argument("--output", metavar="FILE", help="write the file here instead of to stdout")


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
    # -- roster
    "girls_list": Command(EnhancedIPCCommands.girls_list, _show_girls_list,
                          "the profiles every bot can present (--all: hidden ones too)", _girls_list_arguments),
    "girls_add": Command(EnhancedIPCCommands.girls_add, _show_girls_add, "add a profile", _girls_add_arguments),
    "girls_import": Command(EnhancedIPCCommands.girls_import, _show_girls_import,
                            "add or update profiles from a JSON or CSV file, all or nothing",
                            _girls_import_arguments),
    "girls_export": Command(EnhancedIPCCommands.girls_export, _show_girls_export,
                            "every profile as JSON or CSV (stdout, or --output FILE)", _girls_export_arguments),
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
