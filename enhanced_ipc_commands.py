"""The operator CLI: `python enhanced_ipc_commands.py COMMAND [ARGS] [--json] [--config PATH]`.

`EnhancedIPCCommands` holds one method per command; `COMMANDS` maps each name to its method, to
the function in `cli_output` that shows its result, and to the function that declares its
arguments, so a new command is one method, one view, its arguments and one entry.
Fleet commands talk to the running supervisor over its control socket (`control.py`); database,
roster and inbox commands talk to PostgreSQL through the connection manager (imported only by the
commands that need it; the inbox's logic is `inbox_commands`, and `inbox_retry` then asks the
supervisor, when one runs, to wake the bot); `chat` talks to the Telegram sandbox. Human output
is a short aligned table; with `--json`, stdout is exactly one JSON object. Errors go to stderr.

Exit status: 0 success / healthy, 1 failed / not healthy, 2 usage or configuration error,
3 the supervisor is not running. This module must stay light, because an operator command should
answer in tens of milliseconds: it never imports telegram, and the fleet commands import neither
the database layer nor logging (only the commands that use the database or the sandbox set logging
up, with redaction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import AuthenticationError
from pathlib import Path
from typing import Any, Callable, NamedTuple, TextIO

import cli_output as show
from config import INSTALLATION, Config, ConfigError, install_log_redaction, load_config
from control import KEY_FILE, read_authkey, request
from version import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_SUPERVISOR = 0, 1, 2, 3


class CommandError(Exception):
    """A command failed; the message is for the operator, `exit_code` for scripts."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, payload: dict[str, Any] | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.payload = payload or {}


class MissingRequirement(CommandError):
    """This interpreter lacks a package the command needs (psycopg2 for the database commands)."""

    def __init__(self, exc: ModuleNotFoundError):
        requirements = INSTALLATION / "requirements.txt"
        super().__init__(f"this command needs the Python package {exc.name!r}, which is not installed for "
                         f"{sys.executable}: run {INSTALLATION / 'run'} once (it installs DIMS's requirements "
                         f"into a virtual environment), or: {sys.executable} -m pip install -r {requirements}",
                         EXIT_USAGE)


VENV = INSTALLATION / ".venv"
REQUIREMENT_MODULES = {"psycopg2", "telegram", "httpx", "setproctitle"}   # of requirements.txt
REEXEC_MARK = "DIMS_CLI_REEXEC"   # set in the environment of the re-run, so it happens once


class EnhancedIPCCommands:
    """The operator commands. Each returns (exit status, result object) and prints nothing."""

    def __init__(self, config: Config, stderr: TextIO | None = None):
        self.config = config
        self.stderr = stderr or sys.stderr

    def _start_logging(self, config: Config | None = None) -> None:
        """Warnings to stderr, the secrets of `config` (default: ours) redacted: for the layers
        that log (database, sandbox)."""
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=self.stderr)
        install_log_redaction((config or self.config).secrets())

    # -- database

    def _database(self, role: str = "cli"):
        self._start_logging()
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
        result["pools"] = self._bot_pools()
        healthy = not result["migrations"]["drifted"]
        return (EXIT_OK if healthy else EXIT_FAILED), result

    def _bot_pools(self) -> list[dict[str, Any]] | None:
        """Each running bot's own pool figures, when a supervisor runs (None when none does)."""
        try:
            answer = self._supervisor({"command": "stats"}, timeout=5)
        except CommandError:
            return None
        return [{"bot": b["name"], **b["pool"]} for b in answer["bots"] if b.get("pool")]

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

    def db_stop(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        """Stop the embedded PostgreSQL (a fast shutdown), unless another DIMS process still uses
        it - the supervisor, its bots, a `--single` bot - or `--force`."""
        if self.config.database.url:
            raise CommandError("db_stop stops DIMS's embedded PostgreSQL, and this configuration names a database "
                               "server (database.url or DATABASE_URL): stop that one with its own tools", EXIT_USAGE)
        from multiprocess_connection_manager import DatabaseError
        manager = self._database()
        server = manager.embedded
        result: dict[str, Any] = {"data": str(server.pgdata), "pid": server.server_pid(), "stopped": False, "users": []}
        if server.running_pid() is None:
            return EXIT_OK, result
        try:
            users = manager.connection_manager().fetchdicts(_OTHER_DIMS_PROCESSES_SQL)
        except DatabaseError as exc:
            if not args.force:
                raise CommandError(f"{exc}; --force stops it without asking who uses it") from None
            users = []
        finally:
            manager.shutdown()
        if users and not args.force:
            names = ", ".join(f"{u['process']} ({u['connections']})" for u in users)
            raise CommandError(f"the embedded PostgreSQL is in use by {names}; stop DIMS first "
                               "(or --force: they lose the database until it is started again)", payload={"users": users})
        if not server.stop():
            raise CommandError(f"the embedded PostgreSQL (pid {result['pid']}) did not stop within 30 s")
        return EXIT_OK, {**result, "stopped": True, "users": users}

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

    @staticmethod
    def _roster_file(action: str, *args: Any) -> Any:
        """roster_files.<action>(*args), its errors as usage errors (imported here: only the
        roster file commands need it)."""
        import roster_files
        try:
            return getattr(roster_files, action)(*args)
        except roster_files.RosterFileError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from None

    def girls_list(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        profiles = self._with_roster(lambda roster: roster.all_profiles())
        return EXIT_OK, {"girls": [p.as_dict() for p in profiles if args.all or p.visible]}

    def girls_add(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        profile = self._with_roster(lambda roster: roster.add(args.name, args.bio, args.tags, args.photo))
        return EXIT_OK, {"girl": profile.as_dict()}

    def girls_import(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        rows, file_format = self._roster_file("read", args.file)
        counts = self._with_roster(lambda roster: roster.import_profiles(rows, replace=args.replace))
        return EXIT_OK, {"file": args.file, "format": file_format, "replace": args.replace, **counts}

    def girls_export(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        file_format = args.format or ("csv" if (args.output or "").lower().endswith(".csv") else "json")
        rows = self._with_roster(lambda roster: roster.export())
        result: dict[str, Any] = {"format": file_format, "count": len(rows)}
        if args.output:
            self._roster_file("write", args.output, self._roster_file("render", rows, file_format))
            result["output"] = args.output
        elif file_format == "csv":
            result["csv"] = self._roster_file("render", rows, "csv")
        else:
            result["girls"] = rows
        return EXIT_OK, result

    # -- the inbox (`inbox_commands`; the database alone, but a retry wakes the bot when it can)

    def _with_inbox(self, bot: str, action: Callable[[Any], Any]) -> Any:
        """`action(db)` on the migrated database, once `bot` is known (configured, or with updates
        in the inbox); the inbox's refusals as CommandErrors (an unknown bot is a usage error)."""
        import inbox_commands
        from multiprocess_connection_manager import DatabaseError
        manager = self._database()
        try:
            db = manager.initialize_database_coordination()
            inbox_commands.check_bot(db, bot, [b.name for b in self.config.bots])
            return action(db)
        except inbox_commands.InboxError as exc:
            raise CommandError(str(exc), EXIT_USAGE if exc.usage else EXIT_FAILED, exc.payload) from None
        except DatabaseError as exc:
            raise CommandError(str(exc)) from None
        finally:
            manager.shutdown()

    def inbox_list(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        import inbox_commands
        return EXIT_OK, self._with_inbox(args.bot, lambda db: inbox_commands.list_updates(
            db, args.bot, args.status, args.n, self.config.secrets()))

    def inbox_retry(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        import inbox_commands
        ids = self._update_ids(args, "retry")
        result = self._with_inbox(args.bot, lambda db: inbox_commands.retry(db, args.bot, ids))
        result.update(self._wake(args.bot) if result["retried"] else {"woken": False, "note": None})
        return EXIT_OK, result

    def inbox_discard(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        import inbox_commands
        ids = self._update_ids(args, "discard")
        return EXIT_OK, self._with_inbox(args.bot, lambda db: inbox_commands.discard(db, args.bot, ids))

    @staticmethod
    def _update_ids(args: argparse.Namespace, verb: str) -> list[int] | None:
        """The update ids named, or None for --all: one or the other."""
        if args.ids and args.all:
            raise CommandError("name update ids or give --all, not both", EXIT_USAGE)
        if not args.ids and not args.all:
            raise CommandError(f"name the dead updates to {verb} (their update ids, as inbox_list {args.bot} shows "
                               f"them), or give --all for every one", EXIT_USAGE)
        return None if args.all else args.ids

    def _wake(self, bot: str) -> dict[str, Any]:
        """Have the supervisor tell the bot to handle its pending updates now: {"woken", "note"}.
        Whatever it answers, the retried updates are pending in the inbox and will be handled."""
        try:
            answer = self._supervisor({"command": "inbox_wake", "name": bot}, timeout=5)
        except CommandError as exc:
            if exc.exit_code == EXIT_NO_SUPERVISOR:
                return {"woken": False, "note": f"the supervisor is not running: bot {bot} handles them when it next runs"}
            return {"woken": False, "note": f"bot {bot} could not be told ({exc}): it handles them on its next pass "
                                            "over the inbox, or when it next runs"}
        if answer["woken"]:
            return {"woken": True, "note": f"bot {bot} was told to handle them now"}
        if answer["bot"]["state"] == "RUNNING":   # its pipe broke just now: it is on its way down
            return {"woken": False, "note": f"bot {bot} could not be told: it handles them on its next pass "
                                            "over the inbox, or when it next runs"}
        return {"woken": False, "note": f"bot {bot} is {answer['bot']['state']}: it handles them when it runs again"}

    # -- the fleet (through the supervisor's control socket)

    def _supervisor(self, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """One request to the running supervisor; CommandError(3) when none answers."""
        path = self.config.socket_path
        key = read_authkey(self.config.data_dir)
        if not path.exists() or key is None:
            raise CommandError(f"the supervisor is not running (no control socket at {path}; {self._where()}); "
                               f"start it with {INSTALLATION / 'run'}", EXIT_NO_SUPERVISOR)
        try:
            answer = request(path, key, {**payload, "timeout": timeout}, timeout=timeout + 5)
        except (ConnectionRefusedError, FileNotFoundError, EOFError):
            raise CommandError(f"the supervisor is not running (nothing answers on {path}; {self._where()}); "
                               f"start it with {INSTALLATION / 'run'}", EXIT_NO_SUPERVISOR) from None
        except AuthenticationError:
            raise CommandError(f"the supervisor on {path} refused the key in {self.config.data_dir / KEY_FILE}: "
                               "it runs with another data directory (data_dir, DIMS_DATA_DIR)") from None
        except OSError as exc:   # TimeoutError included: it is stopped or hung
            raise CommandError(f"cannot talk to the supervisor on {path}: {exc}") from None
        if answer.get("status") != "ok":
            raise CommandError(answer.get("reason", "the supervisor refused"), answer.get("code", EXIT_FAILED),
                               payload={k: v for k, v in answer.items() if k not in ("status", "reason")})
        return answer

    def _where(self) -> str:
        """Which data directory this CLI looked in and why, with a hint when the installation's
        own data directory has a supervisor's socket and this one has none."""
        where = f"data directory {self.config.data_dir}, {self.config.data_dir_source}"
        beside = INSTALLATION / "var" / "dims.sock"
        if self.config.path is None and beside.exists() and beside != self.config.socket_path:
            where += f"; a supervisor's socket is at {beside}: set DIMS_DATA_DIR={beside.parent} to manage it"
        return where

    def bot_list(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        answer = self._supervisor({"command": "bot_list"})
        return EXIT_OK, {"supervisor": answer["supervisor"], "bots": answer["bots"]}

    def _change_bot(self, command: str, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        answer = self._supervisor({"command": command, "name": args.name}, timeout=args.timeout)
        return EXIT_OK, {"command": command, "bot": answer["bot"], "changed": answer.get("changed", True)}

    def bot_start(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        return self._change_bot("bot_start", args)

    def bot_stop(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        return self._change_bot("bot_stop", args)

    def bot_restart(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        return self._change_bot("bot_restart", args)

    def reload(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        answer = self._supervisor({"command": "reload"}, timeout=30)
        return EXIT_OK, {k: answer[k] for k in ("added", "removed", "changed")}

    def cache_stats(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        answer = self._supervisor({"command": "cache_stats", "name": args.bot})
        return EXIT_OK, {"bots": answer["bots"]}

    def system_health(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        """The fleet's health (`health.py`): ok, degraded or down, with every problem."""
        import health
        try:
            fleet = self._supervisor({"command": "bot_list"})
        except CommandError as exc:
            fleet, unreachable = None, str(exc)
        else:
            unreachable = None
        report = health.system_health(fleet, unreachable, self._database_facts())
        return (EXIT_OK if report["status"] == "ok" else EXIT_FAILED), report

    def _database_facts(self) -> dict[str, Any]:
        """What the database says for health: latency, migrations, inbox counts (or why not)."""
        from health import INBOX_SQL
        from multiprocess_connection_manager import DatabaseError, Migrator
        manager = self._database()
        if manager.embedded is not None and manager.embedded.running_pid() is None:   # a health check starts nothing
            return {"error": f"the embedded PostgreSQL in {manager.embedded.pgdata} is not running "
                             "(python main.py or db_status starts it)"}
        try:
            db = manager.connection_manager()
            started = time.perf_counter()
            db.fetchval("SELECT 1")
            latency = round((time.perf_counter() - started) * 1000, 2)
            migrations = Migrator(db).status().as_dict()
            inbox = db.fetchdicts(INBOX_SQL) if db.fetchval("SELECT to_regclass('dims_inbox')") else []
        except DatabaseError as exc:
            return {"error": str(exc)}
        finally:
            manager.shutdown()
        return {"latency_ms": latency, "migrations": migrations, "inbox": inbox}

    def chat(self, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
        """Talk to a bot in the sandbox as a Telegram user, from this terminal."""
        if args.json:
            raise CommandError("chat is a conversation on this terminal; it has no --json output", EXIT_USAGE)
        config = self.config
        demo = config.data_dir / "demo.toml"
        if not any(b.name == args.name for b in config.bots) and demo.exists():
            config = load_config(demo)   # the demo's bots, while `python main.py` runs the demo
        if not any(b.name == args.name for b in config.bots):
            known = ", ".join(b.name for b in config.bots) or "none"
            raise CommandError(f"bot {args.name!r} is not configured (known: {known}). The demo's bots (alpha, beta) "
                               f"exist while the demo runs: start it with {INSTALLATION / 'run'} (with no bot "
                               f"configured), then chat again ({self._where()})", EXIT_USAGE)
        bot = config.bot(args.name)
        token = bot.require_token()
        api_url = config.telegram.api_url
        if not api_url.endswith("/bot") or "api.telegram.org" in api_url:
            raise CommandError(f"chat talks to the Telegram sandbox, but bot {bot.name} uses {api_url}; "
                               "use a real Telegram client for it", EXIT_USAGE)
        self._start_logging(config)
        from telegram_sandbox.terminal_chat import chat
        code = chat(api_url[: -len("/bot")], token, user_id=args.user_id,
                    describe_silence=lambda: self._bot_state(bot.name))
        return code, {"bot": bot.name}

    def _bot_state(self, name: str) -> str | None:
        """What the supervisor says of a bot that does not answer, for chat's note."""
        try:
            rows = self._supervisor({"command": "bot_list"}, timeout=3)["bots"]
        except CommandError as exc:
            return str(exc)
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            return f"the supervisor runs no bot {name!r}"
        if row["state"] == "RUNNING":
            return f"bot {name} is RUNNING" + (f" but {row['problem']}" if row.get("problem") else "")
        detail = "stopped by an operator; bot_start starts it" if row["wanted"] == "stopped" else row["last_error"]
        return f"bot {name} is {row['state']}" + (f" ({detail})" if detail else "")


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


_OTHER_DIMS_PROCESSES_SQL = """
    SELECT application_name AS process, count(*) AS connections
      FROM pg_stat_activity
     WHERE application_name LIKE 'dims:%%' AND pid <> pg_backend_pid()
     GROUP BY application_name ORDER BY application_name"""

# --------------------------------------------------------------------------- arguments and the command table


def _migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="list pending migrations, apply nothing")


def _db_stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="stop it even while DIMS processes use it")


def _girls_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true", help="include hidden profiles")


def _girls_add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME")
    parser.add_argument("--bio", default="", metavar="TEXT")
    parser.add_argument("--tags", default="", metavar="a,b", help="comma-separated tags")
    parser.add_argument("--photo", metavar="URL", help="an http(s) URL or a Telegram file id")


def _girls_import_arguments(parser: argparse.ArgumentParser) -> None:
    from roster_files import CSV_COLUMNS   # here: only this command's parser names them
    parser.add_argument("file", metavar="FILE", help="a JSON array of profiles; CSV with a header "
                        f"({','.join(CSV_COLUMNS)}) when it ends in .csv")
    parser.add_argument("--replace", action="store_true", help="also delete the profiles the file does not name")


def _girls_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("json", "csv"),
                        help="default: csv for an --output ending in .csv, else json")
    parser.add_argument("--output", metavar="FILE", help="write the file here instead of to stdout")


def _bot_name_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the bot's name")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the new state (default 30)")


def _cache_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bot", metavar="BOT", nargs="?", help="one bot (default: every bot)")


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="BOT", help="the bot to talk to (a configured or a demo bot)")
    parser.add_argument("--user-id", type=int, default=1000, help="your Telegram user id in the sandbox (default 1000)")


def _inbox_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bot", metavar="BOT")
    parser.add_argument("--status", choices=("dead", "pending", "all"), default="dead",
                        help="which updates (default: dead)")
    parser.add_argument("-n", type=_at_least_one, default=50, metavar="N", help="the newest N (default 50)")


def _inbox_change_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bot", metavar="BOT")
    parser.add_argument("ids", metavar="ID", type=int, nargs="*", default=[],   # default: not "required"
                        help="update ids, as inbox_list shows them")
    parser.add_argument("--all", action="store_true", help="every dead update of BOT")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


class Command(NamedTuple):
    run: Callable[[EnhancedIPCCommands, argparse.Namespace], tuple[int, dict[str, Any]]]
    show: Callable[[dict[str, Any]], str]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None


COMMANDS: dict[str, Command] = {
    "db_status": Command(EnhancedIPCCommands.db_status, show.db_status,
                         "database reachability, version, latency, migrations, connections"),
    "db_migrate": Command(EnhancedIPCCommands.db_migrate, show.db_migrate,
                          "apply pending migrations (safe to run concurrently)", _migrate_arguments),
    "db_stop": Command(EnhancedIPCCommands.db_stop, show.db_stop,
                       "stop the embedded PostgreSQL (refused while DIMS processes use it, unless --force)",
                       _db_stop_arguments),
    # -- roster
    "girls_list": Command(EnhancedIPCCommands.girls_list, show.girls_list,
                          "the profiles every bot can present (--all: hidden ones too)", _girls_list_arguments),
    "girls_add": Command(EnhancedIPCCommands.girls_add, show.girls_add, "add a profile", _girls_add_arguments),
    "girls_import": Command(EnhancedIPCCommands.girls_import, show.girls_import,
                            "add or update profiles from a JSON or CSV file, all or nothing",
                            _girls_import_arguments),
    "girls_export": Command(EnhancedIPCCommands.girls_export, show.girls_export,
                            "every profile as JSON or CSV (stdout, or --output FILE)", _girls_export_arguments),
    # -- the fleet
    "bot_list": Command(EnhancedIPCCommands.bot_list, show.bot_list,
                        "every bot: state, pid, uptime, restarts, heartbeat, updates, last error"),
    "bot_start": Command(EnhancedIPCCommands.bot_start, show.bot_change,
                         "start one bot and wait until it is RUNNING", _bot_name_arguments),
    "bot_stop": Command(EnhancedIPCCommands.bot_stop, show.bot_change,
                        "stop one bot (it stays stopped across restarts) and wait until it is STOPPED",
                        _bot_name_arguments),
    "bot_restart": Command(EnhancedIPCCommands.bot_restart, show.bot_change,
                           "restart one bot and wait until it is RUNNING again", _bot_name_arguments),
    "cache_stats": Command(EnhancedIPCCommands.cache_stats, show.cache_stats,
                           "per bot: cache hits, misses, hit rate, entries, evictions, invalidations",
                           _cache_stats_arguments),
    "system_health": Command(EnhancedIPCCommands.system_health, show.system_health,
                             "supervisor, bots, database, migrations, inbox: ok, degraded or down"),
    "inbox_list": Command(EnhancedIPCCommands.inbox_list, show.inbox_list,
                          "a bot's updates in the inbox (default: the dead ones): error, chat, preview",
                          _inbox_list_arguments),
    "inbox_retry": Command(EnhancedIPCCommands.inbox_retry, show.inbox_change,
                           "hand a bot's dead updates (IDs, or --all) to it again, now if it runs",
                           _inbox_change_arguments),
    "inbox_discard": Command(EnhancedIPCCommands.inbox_discard, show.inbox_change,
                             "give up on a bot's dead updates (IDs, or --all): never handled",
                             _inbox_change_arguments),
    "reload": Command(EnhancedIPCCommands.reload, show.reload,
                      "re-read the configuration: start added bots, stop removed ones, restart changed ones"),
    "chat": Command(EnhancedIPCCommands.chat, show.chat,
                    "talk to a bot in the Telegram sandbox as a user (type text, #N presses button N)",
                    _chat_arguments),
}


class UsageError(Exception):
    """Bad arguments, as argparse words them; `main` reports them (also as JSON with --json)."""

    def __init__(self, message: str, usage: str, prog: str):
        super().__init__(message)
        self.usage, self.prog = usage, prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, raising UsageError where argparse would print and exit (its subparsers
    are of this class too)."""

    def error(self, message: str):
        raise UsageError(message, self.format_usage(), self.prog)


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--json and --config, accepted before and after the command name."""
    common = argparse.ArgumentParser(add_help=False)
    suppress = {} if defaults else {"default": argparse.SUPPRESS}
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout", **suppress)
    common.add_argument("--config", metavar="PATH", help="configuration file (default: $DIMS_CONFIG, else "
                        "./dims.toml, else the installation's dims.toml)", **suppress)
    return common


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or with only the subparser of `only` (see `named_command`)."""
    parser = ArgumentParser(description="DIMS operator commands", parents=[_common_options(defaults=True)])
    parser.add_argument("--version", action="version", version=f"DIMS {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    after = _common_options(defaults=False)
    for name, command in COMMANDS.items():
        if only in (None, name):
            command.arguments(sub.add_parser(name, help=command.help, description=command.help, parents=[after]))
    return parser


def named_command(argv: list[str]) -> str | None:
    """The command of a plain command line, `[--json] [--config PATH] COMMAND ...`, else None.

    For such a line the parser needs only that command's subparser, and building the others
    is a few milliseconds of every operator command. Anything else before the command
    (--help, an abbreviated option, a typo) gets the whole parser and its usual messages."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif word != "--json" and not word.startswith("--config="):
            return word if word in COMMANDS else None
    return None


def _suggestion(argv: list[str]) -> str:
    """"; did you mean bot_list?" for a command name that is close to a real one, else ""."""
    word = next((w for w in argv if not w.startswith("-") and w not in COMMANDS), None)
    if word is None or any(w in COMMANDS for w in argv):
        return ""
    import difflib   # only on this error path
    close = difflib.get_close_matches(word, COMMANDS, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def main(argv: list[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None,
         allow_reexec: bool = False) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(only=named_command(argv)).parse_args(argv)
    except UsageError as exc:
        message = f"{exc}{_suggestion(argv)}"
        print(f"{exc.usage}{exc.prog}: error: {message}", file=stderr)   # as argparse prints it
        if "--json" in argv:
            print(json.dumps({"error": message}), file=stdout)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return EXIT_USAGE if exc.code else EXIT_OK
    command = COMMANDS[args.command]
    try:
        try:
            config = load_config(args.config)
            status, result = command.run(EnhancedIPCCommands(config, stderr), args)
        except ConfigError as exc:
            raise CommandError(f"configuration error: {exc}", EXIT_USAGE) from None
        except ModuleNotFoundError as exc:   # a database command on a Python without psycopg2
            if (exc.name or "").partition(".")[0] not in REQUIREMENT_MODULES:
                raise   # not a requirement: a bug, shown as one
            raise MissingRequirement(exc) from None
    except MissingRequirement as exc:
        if allow_reexec:
            _reexec_in_environment(argv)   # returns only when there is no such environment
        if args.json:
            print(json.dumps({"error": str(exc)}), file=stdout)
        print(f"{args.command}: {exc}", file=stderr)
        return exc.exit_code
    except CommandError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), **exc.payload}, default=str), file=stdout)
        print(f"{args.command}: {exc}", file=stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(result, default=str), file=stdout)
    elif text := command.show(result):
        print(text, file=stdout)
    if status != EXIT_OK and not args.json and "error" in result:
        print(f"{args.command}: {result['error']}", file=stderr)
    return status


def _reexec_in_environment(argv: list[str]) -> None:
    """Run this command again with the Python of the installation's virtual environment (made by
    `./run`), when there is one and it is not us: the database commands need its packages."""
    import os
    python = VENV / "bin" / "python"
    if not python.exists() or os.environ.get(REEXEC_MARK) or Path(sys.prefix).resolve() == VENV.resolve():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[REEXEC_MARK] = "1"
    os.execv(python, [str(python), str(INSTALLATION / "enhanced_ipc_commands.py"), *argv])


def run() -> None:
    """Run `main()` on the process's arguments and exit with its status - the entry point of this
    script and of the `dims` launcher. A command that needs a package this Python lacks is run
    again by the installation's virtual environment, when it has one.

    The exit skips the interpreter's final garbage collection: a sweep over every object the
    imports made, about 7 ms, a tenth of a `bot_list`. Reference counting still frees and closes
    everything on the way out (and exit handlers run); only cyclic garbage is left to the OS."""
    status = main(allow_reexec=True)
    import gc
    gc.freeze()
    sys.exit(status)


if __name__ == "__main__":
    run()
