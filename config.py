"""DIMS configuration: one validated, immutable view of the TOML file and the environment.

Every process (supervisor, bot children, the operator CLI) calls `load_config()` and gets the
same `Config`. Precedence is: command-line flag > environment variable > config file > default.
The file is found by one rule wherever a command is started (`find_config_file`), and a
relative data directory is taken from the file's own directory, so the CLI finds the supervisor
it manages from any working directory. A bot's missing `token_env` variable is not an error
here: it is recorded on the bot (`BotConfig.token_problem`) and is an error only for the
process that runs that bot, so operator commands run without the bots' tokens.
Errors are `ConfigError`s that name the file, the key and what was expected; callers turn them
into exit status 2. Secrets (bot tokens, database passwords) never appear in a repr, an error or
a log line: `install_log_redaction()` adds a filter that scrubs them from every record.

This module is the bottom of the import graph: it imports only the standard library, and only
its light parts (no dataclasses, no logging until redaction is installed), because every operator
command loads it before doing anything else.
"""

from __future__ import annotations

import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Mapping, NamedTuple

DEFAULT_API_URL = "https://api.telegram.org/bot"
BOT_NAME_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
TOKEN_RE = re.compile(r"^\d+:[A-Za-z0-9_-]+$")


class ConfigError(Exception):
    """A configuration problem a person can fix; the message says where and what."""


# --------------------------------------------------------------------------- the model


class DatabaseConfig(NamedTuple):
    url: str | None = None          # None: the embedded PostgreSQL under the data directory
    pool_min: int = 1
    pool_max: int = 4               # per process, before the connection budget is applied
    max_connections: int = 80       # ceiling for all DIMS processes together
    connect_timeout: float = 5.0    # seconds, per connection attempt
    checkout_timeout: float = 10.0  # seconds a caller waits for a free pooled connection

    def __repr__(self) -> str:
        return f"DatabaseConfig(url={redact_url(self.url)!r}, pool_max={self.pool_max})"


class TelegramConfig(NamedTuple):
    api_url: str = DEFAULT_API_URL
    max_rate: float = 30.0          # messages/s a bot sends in all (Telegram's flood limit); 0: no limit
    retry_for: float = 600.0        # seconds a Bot API call is retried through network errors, 5xx and 429


class SupervisorConfig(NamedTuple):
    socket: str = ""                # "" means {data_dir}/dims.sock
    stop_timeout: float = 10.0      # stop request -> SIGKILL
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 15.0  # no heartbeat for this long: the child is hung
    start_timeout: float = 60.0     # STARTING without `ready` for this long: failed start
    backoff_initial: float = 0.05
    backoff_max: float = 30.0
    stable_after: float = 10.0      # RUNNING this long resets the backoff
    restart_window: float = 60.0
    restart_budget: int = 5         # restarts per window before FATAL
    fatal_cooldown: float = 300.0   # FATAL recovers by itself after this long


class BotConfig(NamedTuple):
    name: str
    token: str                      # never in a repr; "" when token_problem says why there is none
    display_name: str = ""
    admins: tuple[int, ...] = ()
    roster_tags: tuple[str, ...] = ()
    token_problem: str | None = None  # e.g. "dims.toml: bots[0].token_env: environment variable X is not set"
    token_env: str | None = None      # the variable the token came from (None: the file, or BOT_TOKEN)

    def __repr__(self) -> str:
        return f"BotConfig(name={self.name!r}, display_name={self.display_name!r})"

    def require_token(self) -> str:
        """The token, or ConfigError saying why this process has none."""
        if self.token_problem:
            raise ConfigError(self.token_problem)
        return self.token


class Config(NamedTuple):
    path: Path | None
    data_dir: Path
    database: DatabaseConfig
    telegram: TelegramConfig
    supervisor: SupervisorConfig
    bots: tuple[BotConfig, ...]
    data_dir_source: str = ""       # how data_dir was chosen, for messages that name it

    @property
    def socket_path(self) -> Path:
        return Path(self.supervisor.socket) if self.supervisor.socket else self.data_dir / "dims.sock"

    def bots_without_token(self) -> list[BotConfig]:
        return [bot for bot in self.bots if bot.token_problem]

    def bot(self, name: str) -> BotConfig:
        for bot in self.bots:
            if bot.name == name:
                return bot
        known = ", ".join(b.name for b in self.bots) or "none"
        raise ConfigError(f"bot {name!r} is not configured (known: {known})")

    def secrets(self) -> list[str]:
        """Every secret this configuration holds, for log redaction."""
        found = [bot.token for bot in self.bots]
        password = _url_password(self.database.url)
        if password:
            found.append(password)
        return [s for s in found if s]


CLI_RESERVED_CONNECTIONS = 3   # kept free for the supervisor's database agent and operator commands


def pool_max_for(db: DatabaseConfig, processes: int) -> int:
    """Per-process pool size under the connection budget.

    Each bot process holds its pool plus one listener connection; `CLI_RESERVED_CONNECTIONS`
    stay free for the supervisor and operator commands. So with N bot processes the pool is
    min(pool_max, (max_connections - reserved) // N - 1), and at least 1.
    """
    share = (db.max_connections - CLI_RESERVED_CONNECTIONS) // max(1, processes) - 1
    if share < 1:
        raise ConfigError(
            f"database.max_connections = {db.max_connections} is too small for {processes} bot "
            f"processes: each needs at least 2 connections and {CLI_RESERVED_CONNECTIONS} stay "
            f"reserved (raise it to {2 * processes + CLI_RESERVED_CONNECTIONS} or more)")
    return min(db.pool_max, share)


# --------------------------------------------------------------------------- validation

# Allowed keys per table, with the Python type each must have. One table drives checking.
_NUMBER = (int, float)
_SCHEMA: dict[str, dict[str, Any]] = {
    "database": {
        "url": str, "pool_min": int, "pool_max": int, "max_connections": int,
        "connect_timeout": _NUMBER, "checkout_timeout": _NUMBER,
    },
    "telegram": {"api_url": str, "max_rate": _NUMBER, "retry_for": _NUMBER},
    "supervisor": {
        "socket": str, "stop_timeout": _NUMBER, "heartbeat_interval": _NUMBER,
        "heartbeat_timeout": _NUMBER, "start_timeout": _NUMBER, "backoff_initial": _NUMBER,
        "backoff_max": _NUMBER, "stable_after": _NUMBER, "restart_window": _NUMBER,
        "restart_budget": int, "fatal_cooldown": _NUMBER,
    },
    "bots": {
        "name": str, "token": str, "token_env": str, "display_name": str,
        "admins": list, "roster_tags": list,
    },
    "": {"data_dir": str},
}
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", _NUMBER: "a number"}


class _Checker:
    """Names the file and the key in every error it raises."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {reason}")

    def table(self, section: str, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        allowed = _SCHEMA[section]
        out = {}
        for key, value in data.items():
            where = f"{prefix}{key}"
            if key not in allowed:
                raise self.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
            expected = allowed[key]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise self.fail(where, f"expected {_TYPE_NAMES[expected]}, got {_describe(value)}")
            out[key] = value
        return out

    def positive(self, values: Mapping[str, Any], section: str, *, allow_zero: tuple[str, ...] = ()) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and (value < 0 or (value == 0 and key not in allow_zero)):
                raise self.fail(f"{section}.{key}", f"must be greater than 0, got {value}")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return "a string"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


INSTALLATION = Path(__file__).resolve().parent   # where DIMS's own files are (the launchers' real path)


def config_candidates(explicit: str | os.PathLike | None, env: Mapping[str, str]) -> list[Path]:
    """Where the configuration file is looked for, in order: --config, $DIMS_CONFIG, ./dims.toml,
    then the dims.toml of the installation (beside the real path of `dims` and main.py)."""
    if explicit:
        return [Path(explicit)]
    if env.get("DIMS_CONFIG"):
        return [Path(env["DIMS_CONFIG"])]
    return [Path("dims.toml"), INSTALLATION / "dims.toml"]


def find_config_file(explicit: str | os.PathLike | None, env: Mapping[str, str]) -> Path | None:
    """The file `config_candidates` names first: an explicit one always (it must exist), else the
    first that exists, else None."""
    candidates = config_candidates(explicit, env)
    if explicit or env.get("DIMS_CONFIG"):
        return candidates[0]
    return next((path for path in candidates if path.exists()), None)


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                data_dir: str | os.PathLike | None = None) -> Config:
    """Read and validate the configuration. Raises ConfigError."""
    env = os.environ if env is None else env
    file_path = find_config_file(path, env)
    raw = _read_file(file_path) if file_path else {}
    check = _Checker(str(file_path) if file_path else "configuration")

    top = {k: v for k, v in raw.items() if k not in _SCHEMA or k == ""}
    for key in top:
        if key not in _SCHEMA[""]:
            raise check.fail(key, "unknown key (expected one of: bots, data_dir, database, supervisor, telegram)")
    top = check.table("", top, "")
    sections = {}
    for name in ("database", "telegram", "supervisor"):
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise check.fail(name, f"expected a table [{name}], got {_describe(value)}")
        sections[name] = check.table(name, value, f"{name}.")

    database = _database(check, sections["database"], env)
    check.positive(sections["telegram"], "telegram", allow_zero=("max_rate",))
    if env.get("TELEGRAM_API_URL"):
        sections["telegram"]["api_url"] = env["TELEGRAM_API_URL"]
    telegram = TelegramConfig(**sections["telegram"])
    if not telegram.api_url.startswith(("http://", "https://")):
        raise check.fail("telegram.api_url", f"expected an http(s) URL, got {telegram.api_url!r}")
    check.positive(sections["supervisor"], "supervisor", allow_zero=("stable_after",))
    if env.get("DIMS_SOCKET"):
        sections["supervisor"]["socket"] = env["DIMS_SOCKET"]
    supervisor = SupervisorConfig(**sections["supervisor"])
    if supervisor.backoff_initial > supervisor.backoff_max:
        raise check.fail("supervisor.backoff_initial", f"is {supervisor.backoff_initial:g}, larger than "
                                                       f"supervisor.backoff_max ({supervisor.backoff_max:g})")

    chosen_dir, source = _data_dir(data_dir, env, top, file_path)

    bots = _bots(check, raw.get("bots", []), env)
    return Config(path=file_path, data_dir=chosen_dir.absolute(), database=database,
                  telegram=telegram, supervisor=supervisor, bots=bots, data_dir_source=source)


def _data_dir(explicit: str | os.PathLike | None, env: Mapping[str, str], top: dict[str, Any],
              file_path: Path | None) -> tuple[Path, str]:
    """The data directory and how it was chosen: --data-dir or DIMS_DATA_DIR, else the file's
    data_dir (relative to the file), else var beside the file, else var in the working directory."""
    if explicit:
        return Path(explicit), "given on the command line"
    if env.get("DIMS_DATA_DIR"):
        return Path(env["DIMS_DATA_DIR"]), "from DIMS_DATA_DIR"
    if "data_dir" in top:
        return file_path.parent / top["data_dir"], f"data_dir in {file_path}"
    if file_path is not None:
        return file_path.parent / "var", f"the default, var beside {file_path}"
    looked = " and ".join(str(p) for p in config_candidates(None, env))
    return Path("var"), f"the default, var in the working directory; no configuration file: looked for {looked}"


def _database(check: _Checker, values: dict[str, Any], env: Mapping[str, str]) -> DatabaseConfig:
    check.positive({k: v for k, v in values.items() if k != "url"}, "database", allow_zero=("pool_min",))
    url = env.get("DATABASE_URL") or values.get("url") or None
    db = DatabaseConfig(**{**values, "url": url})
    if db.pool_min > db.pool_max:
        raise check.fail("database.pool_min", f"is {db.pool_min}, larger than database.pool_max ({db.pool_max})")
    return db


def _bots(check: _Checker, raw_bots: Any, env: Mapping[str, str]) -> tuple[BotConfig, ...]:
    if not isinstance(raw_bots, list):
        raise check.fail("bots", "expected an array of tables [[bots]]")
    bots: list[BotConfig] = []
    for index, entry in enumerate(raw_bots):
        where = f"bots[{index}]"
        if not isinstance(entry, dict):
            raise check.fail(where, "expected a table [[bots]]")
        values = check.table("bots", entry, f"{where}.")
        name = values.get("name")
        if name is None:
            raise check.fail(f"{where}.name", "missing (every bot needs a name)")
        if not BOT_NAME_RE.match(name):
            raise check.fail(f"{where}.name", f"{name!r} must match ^[a-z0-9_-]{{1,32}}$")
        if any(b.name == name for b in bots):
            raise check.fail(f"{where}.name", f"{name!r} is used by another bot")
        token, token_problem = _token(check, where, values, env)
        admins = values.get("admins", [])
        if not all(isinstance(a, int) and not isinstance(a, bool) and a > 0 for a in admins):
            raise check.fail(f"{where}.admins", "expected a list of Telegram user ids (positive integers)")
        tags = values.get("roster_tags", [])
        if not all(isinstance(t, str) and re.fullmatch(r"[a-z0-9_-]{1,32}", t) for t in tags):
            raise check.fail(f"{where}.roster_tags", "expected a list of tags matching [a-z0-9_-]{1,32}")
        bots.append(BotConfig(name=name, token=token, display_name=values.get("display_name") or name.title(),
                              admins=tuple(admins), roster_tags=tuple(tags), token_problem=token_problem,
                              token_env=values.get("token_env")))
    if not bots and env.get("BOT_TOKEN"):
        token = env["BOT_TOKEN"].strip()
        if not TOKEN_RE.match(token):
            raise ConfigError("BOT_TOKEN: does not look like a Telegram bot token (expected digits:letters)")
        bots.append(BotConfig(name="main", token=token, display_name="Main"))
    return tuple(bots)


def _token(check: _Checker, where: str, values: dict[str, Any], env: Mapping[str, str]) -> tuple[str, str | None]:
    """(token, None), or ("", why there is none) when its environment variable is not set: that
    is an error only for the process that runs the bot (`BotConfig.require_token`)."""
    if "token" in values and "token_env" in values:
        raise check.fail(f"{where}.token", "set either token or token_env, not both")
    if "token_env" in values:
        var = values["token_env"]
        token = env.get(var, "").strip()
        if not token:
            return "", str(check.fail(f"{where}.token_env", f"environment variable {var} is not set or empty"))
        source = f"environment variable {var} (from {where}.token_env)"
    elif "token" in values:
        token, source = values["token"].strip(), f"{where}.token"
    else:
        raise check.fail(where, "missing token_env (or token)")
    if not TOKEN_RE.match(token):
        raise ConfigError(f"{check.source}: {source}: does not look like a Telegram bot token "
                          "(expected digits:letters)")
    return token, None


# --------------------------------------------------------------------------- secrets


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    if "://" in url:
        return urllib.parse.urlsplit(url).password
    match = re.search(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", url)
    return match.group(1).strip("'") if match else None


def redact_url(url: str | None) -> str | None:
    """A database URL or DSN with its password replaced by '***'."""
    if not url:
        return url
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)


_TOKEN_SHAPE = re.compile(r"(?<!\d)(\d{3,}):[A-Za-z0-9_-]{20,}")


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Text with every known secret and anything shaped like a bot token masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _TOKEN_SHAPE.sub(r"\1:***", text)


class RedactingFilter:
    """Scrubs secrets from a record's final message (httpx logs URLs that contain the token).

    A logging filter by duck type (an object with `filter(record)`), so that this module need not
    import logging: the operator CLI imports it only for the commands that log."""

    def __init__(self, secrets: list[str] | tuple[str, ...] = ()):
        self.secrets = list(secrets)

    def filter(self, record) -> bool:
        import logging  # loaded already: something is logging

        message = record.getMessage()
        cleaned = redact(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install_log_redaction(secrets: list[str] | tuple[str, ...] = ()) -> RedactingFilter:
    """Attach one redacting filter to every root handler (call after logging is configured)."""
    import logging

    root = logging.getLogger()
    existing = next((f for h in root.handlers for f in h.filters if isinstance(f, RedactingFilter)), None)
    redactor = existing or RedactingFilter()
    redactor.secrets = sorted(set(redactor.secrets) | set(secrets), key=len, reverse=True)
    for handler in root.handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)
    return redactor
