"""DIMS entry point: `MainIntegrator` reads the command line and the configuration and picks the
mode - every bot under the supervisor, or one bot in this process (`--single`) - falling back to
single-bot, with a WARNING that says why, when the supervisor cannot run. With no bot configured
it runs the demo: the Telegram sandbox and two demo bots under the supervisor.

Exit status: 0 after a clean stop, 1 when DIMS cannot run (the database is unreachable, another
supervisor runs), 2 for a usage or configuration error (a missing requirement included),
otherwise the bot's own code. Imports: `config` and `version`, then the layer it runs
(`supervisor` or `bot`; for the demo also `demo`, `telegram_sandbox` and the connection manager),
each only when that mode runs; nothing imports this module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NamedTuple

from config import Config, ConfigError, install_log_redaction, load_config, pool_max_for
from version import __version__

log = logging.getLogger("dims")

EXIT_FAILED = 1
EXIT_USAGE = 2

DESCRIPTION = """Run the DIMS bot fleet: every configured bot in its own supervised process, all
sharing one PostgreSQL. With no bot configured (no [[bots]] in the configuration file and no
BOT_TOKEN), it runs the offline demo instead: its own PostgreSQL under the data directory, a
local Telegram sandbox and two demo bots, with instructions for talking to them."""

EPILOG = """configuration file: --config, else $DIMS_CONFIG, else ./dims.toml, else the dims.toml
beside DIMS's own files; a relative data_dir (default var) is relative to that file, or to the
working directory when there is none.

environment:
  DATABASE_URL       PostgreSQL URL or DSN (unset: DIMS's own embedded PostgreSQL)
  TELEGRAM_API_URL   the Bot API root (default https://api.telegram.org/bot; the sandbox's for tests)
  DIMS_CONFIG        the configuration file, when --config is not given
  DIMS_DATA_DIR      control socket, key, embedded database (overrides data_dir)
  DIMS_SOCKET        the control socket (default {data_dir}/dims.sock)
  BOT_TOKEN          one bot named "main", when no [[bots]] are configured
  a bot's token_env  its token (missing: that bot cannot start; the others run)

exit status:
  0  stopped cleanly (SIGTERM or SIGINT)
  1  DIMS cannot run: the database is unreachable, or another supervisor runs on the socket
  2  usage or configuration error, or a missing requirement
  75 (--single) the bot could not start; 78 (--single) Telegram rejected its token

SIGHUP re-reads the configuration. The operator CLI: dims COMMAND (dims --help)."""


class Mode(NamedTuple):
    name: str            # "single", "multi" or "demo"
    bot: str | None      # the bot to run in single mode
    reason: str          # why this mode, for the log


class MainIntegrator:
    """Picks the mode from the arguments and the configuration, and runs it."""

    def __init__(self, argv: list[str] | None = None):
        self.args = self.parser().parse_args(argv)
        self.config: Config | None = None

    @staticmethod
    def parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="main.py", description=DESCRIPTION, epilog=EPILOG,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--single", action="store_true", help="run one bot in this process, no supervisor")
        mode.add_argument("--multi", action="store_true", help="run under the supervisor; fail instead of falling back")
        parser.add_argument("--bot", metavar="NAME", help="the bot to run with --single (default: the first configured)")
        parser.add_argument("--config", metavar="PATH", help="configuration file (see below)")
        parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                            help="logging level (default INFO)")
        parser.add_argument("--version", action="version", version=f"DIMS {__version__}")
        return parser

    def detect_mode(self) -> Mode:
        """Validate the configuration and decide; raises ConfigError."""
        self.config = load_config(self.args.config)
        if self.args.bot:
            self.config.bot(self.args.bot)  # names the known bots when it is not one of them
        if self.args.single:
            if not self.config.bots:
                raise ConfigError("--single needs a configured bot: add a [[bots]] table or set BOT_TOKEN")
            name = self.args.bot or self.config.bots[0].name
            self.config.bot(name).require_token()   # this process runs the bot: it needs its token
            return Mode("single", name, "--single")
        if self.args.bot:
            raise ConfigError("--bot NAME goes with --single")
        if not self.config.bots:
            return Mode("demo", None, "no bot is configured")
        pool_max_for(self.config.database, len(self.config.bots))  # the connection budget fits
        return Mode("multi", None, "--multi" if self.args.multi else "bots configured")

    def run(self) -> int:
        logging.basicConfig(level=self.args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            mode = self.detect_mode()
        except ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        missing = missing_requirement()
        if missing:
            print(missing, file=sys.stderr)
            return EXIT_USAGE
        install_log_redaction(self.config.secrets())
        log.info("mode: %s (%s)", mode.name, mode.reason)
        if mode.name == "single":
            return self.run_single_bot_fallback(mode.bot)
        if mode.name == "demo":
            return self.run_demo()
        return self.run_multibot_production()

    def run_multibot_production(self, control=None) -> int:
        try:
            import supervisor
        except ImportError as exc:
            return self._without_supervisor(exc)
        for bot_config in self.config.bots_without_token():
            log.error("bot %s cannot start: %s", bot_config.name, bot_config.token_problem)
        try:
            return supervisor.ProcessSupervisor(self.config, self.args.log_level, control=control).run()
        except supervisor.SupervisorUnavailable as exc:
            return self._without_supervisor(exc)

    def _without_supervisor(self, reason: Exception) -> int:
        """The supervisor cannot run for a reason of its own: one bot in-process, said loudly
        (never with --multi, which asks for the supervisor or nothing)."""
        if self.args.multi:
            log.error("the supervisor cannot run: %s", reason)
            return EXIT_FAILED
        runnable = [b for b in self.config.bots if not b.token_problem]
        if not runnable:
            log.error("the supervisor cannot run (%s), and no bot has its token to run without it", reason)
            return EXIT_FAILED
        first = runnable[0].name
        log.warning("the supervisor cannot run (%s); falling back to single-bot mode with bot %r "
                    "(the other configured bots are not started)", reason, first)
        return self.run_single_bot_fallback(first)

    def run_demo(self) -> int:
        """No bot configured: the sandbox, a small demo roster and two demo bots, supervised.
        The control socket is claimed first: a demo refused because another runs changes nothing
        (its demo.toml stays) and prints no banner."""
        import demo
        import supervisor
        from multiprocess_connection_manager import DatabaseError
        from telegram_sandbox import SandboxProcess
        try:
            control = supervisor.claim_control_socket(self.config)
        except supervisor.SupervisorRunning as exc:
            log.error("%s", exc)
            return EXIT_FAILED
        except OSError as exc:
            log.error("the demo cannot run: cannot open the control socket %s: %s", self.config.socket_path, exc)
            return EXIT_FAILED
        try:
            with SandboxProcess() as sandbox:
                path = demo.write_config(self.config, sandbox.api_url)
                try:
                    self.config = load_config(path)
                    try:
                        demo.seed_roster(self.config)
                    except DatabaseError as exc:
                        log.error("the demo cannot start: %s", exc)
                        return EXIT_FAILED
                    print(demo.instructions(self.config, sandbox.url), flush=True)
                    code = self.run_multibot_production(control)
                    control = None   # the supervisor closed it
                    return code
                finally:
                    path.unlink(missing_ok=True)
        finally:
            if control is not None:
                control.close()

    def run_single_bot_fallback(self, name: str) -> int:
        import bot
        from bot_process import prepare_bot_process
        from process_setup import set_process_title
        bot_config = self.config.bot(name)
        set_process_title(f"dims: bot {name}", f"dims bot {name}")
        prepare_bot_process()
        bot.configure_logging(bot_config.name, self.config.secrets(), self.args.log_level)
        return bot.run(bot_config, self.config, check_budget=True)


REQUIRED_MODULES = {"telegram": "python-telegram-bot", "psycopg2": "psycopg2-binary"}


def missing_requirement() -> str | None:
    """What to say when this interpreter lacks one of DIMS's requirements (None: it has them)."""
    import importlib.util
    import os
    missing = [package for module, package in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    return (f"DIMS needs {' and '.join(missing)}, not installed for {sys.executable}. Install the requirements: "
            f"{os.path.join(here, 'run')} does it in a virtual environment of its own (or: "
            f"{sys.executable} -m pip install -r {os.path.join(here, 'requirements.txt')})")


def main(argv: list[str] | None = None) -> int:
    try:
        integrator = MainIntegrator(argv)
    except SystemExit as exc:   # --help, --version, or a usage error argparse has printed
        return EXIT_USAGE if exc.code else 0
    return integrator.run()


if __name__ == "__main__":
    sys.exit(main())
