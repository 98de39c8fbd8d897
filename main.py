"""DIMS entry point: `MainIntegrator` reads the command line and the configuration and picks the
mode - every bot under the supervisor, or one bot in this process (`--single`) - falling back to
single-bot, with a WARNING that says why, when the supervisor cannot run. With no bot configured
it runs the demo: the Telegram sandbox and two demo bots under the supervisor.

Exit status: 0 after a clean stop, 2 for a usage or configuration error, otherwise the bot's
or the supervisor's own code. Imports: `config`, then the layer it runs (`supervisor` or `bot`;
for the demo also `demo`, `telegram_sandbox` and the connection manager), each only when that
mode runs; nothing imports this module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from config import Config, ConfigError, install_log_redaction, load_config, pool_max_for

log = logging.getLogger("dims")

EXIT_USAGE = 2


@dataclass(frozen=True)
class Mode:
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
        parser = argparse.ArgumentParser(prog="main.py", description="Run the DIMS bot fleet.")
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--single", action="store_true", help="run one bot in this process, no supervisor")
        mode.add_argument("--multi", action="store_true", help="run under the supervisor; fail instead of falling back")
        parser.add_argument("--bot", metavar="NAME", help="the bot to run with --single (default: the first configured)")
        parser.add_argument("--config", metavar="PATH", help="configuration file (default: $DIMS_CONFIG or ./dims.toml)")
        parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                            help="logging level (default INFO)")
        return parser

    def detect_mode(self) -> Mode:
        """Validate the configuration and decide; raises ConfigError."""
        self.config = load_config(self.args.config)
        if self.args.bot:
            self.config.bot(self.args.bot)  # names the known bots when it is not one of them
        if self.args.single:
            if not self.config.bots:
                raise ConfigError("--single needs a configured bot: add a [[bots]] table or set BOT_TOKEN")
            return Mode("single", self.args.bot or self.config.bots[0].name, "--single")
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
        install_log_redaction(self.config.secrets())
        log.info("mode: %s (%s)", mode.name, mode.reason)
        if mode.name == "single":
            return self.run_single_bot_fallback(mode.bot)
        if mode.name == "demo":
            return self.run_demo()
        return self.run_multibot_production()

    def run_multibot_production(self) -> int:
        try:
            import supervisor
        except ImportError as exc:
            return self._without_supervisor(exc)
        try:
            return supervisor.ProcessSupervisor(self.config, self.args.log_level).run()
        except supervisor.SupervisorUnavailable as exc:
            return self._without_supervisor(exc)

    def _without_supervisor(self, reason: Exception) -> int:
        """The supervisor cannot run for a reason of its own: one bot in-process, said loudly
        (never with --multi, which asks for the supervisor or nothing)."""
        if self.args.multi:
            log.error("the supervisor cannot run: %s", reason)
            return 1
        first = self.config.bots[0].name
        log.warning("the supervisor cannot run (%s); falling back to single-bot mode with bot %r "
                    "(the other configured bots are not started)", reason, first)
        return self.run_single_bot_fallback(first)

    def run_demo(self) -> int:
        """No bot configured: the sandbox, a small demo roster and two demo bots, supervised."""
        import demo
        from multiprocess_connection_manager import DatabaseError
        from telegram_sandbox import SandboxProcess
        with SandboxProcess() as sandbox:
            path = demo.write_config(self.config, sandbox.api_url)
            try:
                self.config = load_config(path)
                try:
                    demo.seed_roster(self.config)
                except DatabaseError as exc:
                    log.error("the demo cannot start: %s", exc)
                    return 1
                print(demo.instructions(self.config, sandbox.url), flush=True)
                return self.run_multibot_production()
            finally:
                path.unlink(missing_ok=True)

    def run_single_bot_fallback(self, name: str) -> int:
        import bot
        bot_config = self.config.bot(name)
        bot.configure_logging(bot_config.name, self.config.secrets(), self.args.log_level)
        return bot.run(bot_config, self.config)


def main(argv: list[str] | None = None) -> int:
    try:
        integrator = MainIntegrator(argv)
    except SystemExit as exc:   # --help, or a usage error argparse has printed
        return EXIT_USAGE if exc.code else 0
    return integrator.run()


if __name__ == "__main__":
    sys.exit(main())
