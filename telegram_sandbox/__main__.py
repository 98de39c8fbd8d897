"""`python -m telegram_sandbox`: the sandbox's command line (see cli.py)."""

import sys

from .cli import main

sys.exit(main(prog="python -m telegram_sandbox"))
