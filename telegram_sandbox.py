"""Launcher: `python telegram_sandbox.py ...` runs the sandbox's command line, as
`python -m telegram_sandbox ...` does. The sandbox itself is the package telegram_sandbox/
beside this file (a package takes precedence over this module on import)."""

import sys

from telegram_sandbox.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="telegram_sandbox.py"))
