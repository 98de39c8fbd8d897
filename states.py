"""The life of a supervised bot: its states, the moves allowed between them, and the exit codes
a bot process ends with.

`ProcessSupervisor.change_state()` checks every move against `ALLOWED_MOVES`; the operator CLI,
the control socket and the tests name states with `State`. The exit codes are the contract
between a bot process and its supervisor: a code that retrying cannot fix (a rejected token)
is not retried. Standard library only; imports nothing of DIMS, so every layer may import it.
"""

from __future__ import annotations

import enum
import signal


class State(str, enum.Enum):
    STOPPED = "STOPPED"      # not running: never started, stopped by an operator, or the supervisor is stopping
    STARTING = "STARTING"    # process being started, or started and not yet ready
    RUNNING = "RUNNING"      # ready; heartbeats arriving
    BACKOFF = "BACKOFF"      # exited unexpectedly; restarting after a delay
    STOPPING = "STOPPING"    # asked to stop: stop message, SIGTERM, then SIGKILL
    EXITED = "EXITED"        # just exited (a moment)
    FATAL = "FATAL"          # gave up: restart budget spent, token rejected, or no token to start with


S = State
ALLOWED_MOVES: dict[State, frozenset[State]] = {
    S.STOPPED: frozenset({S.STARTING, S.FATAL, S.BACKOFF}),   # FATAL: no token; BACKOFF: no process could be made
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.EXITED, S.BACKOFF, S.FATAL}),   # BACKOFF, FATAL: no process
    S.RUNNING: frozenset({S.STOPPING, S.EXITED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.EXITED: frozenset({S.BACKOFF, S.FATAL, S.STOPPED}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED, S.FATAL}),
    S.FATAL: frozenset({S.STARTING, S.STOPPED, S.BACKOFF}),
}
LIVE = frozenset({S.STARTING, S.RUNNING, S.STOPPING})   # a process exists


class IllegalMove(RuntimeError):
    """A state change the table does not allow: a supervisor bug, never an operator's mistake."""


# Exit codes of a bot process (sysexits.h where one fits).
EXIT_OK = 0
EXIT_USAGE = 2               # the configuration cannot work (the database cannot hold the fleet, ...)
EXIT_FAILED = 1              # stopped on an error of its own (a crash)
EXIT_START_FAILED = 75       # EX_TEMPFAIL: could not start (database unreachable, ...): worth retrying
EXIT_TOKEN_REJECTED = 78     # EX_CONFIG: Telegram rejected the token: restarting cannot help


def describe_exit(code: int | None) -> str:
    """An exit code as an operator reads it: 'exit status 1', 'killed by SIGKILL'."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_TOKEN_REJECTED:
        return f"exit status {code} (token rejected by Telegram)"
    if code == EXIT_START_FAILED:
        return f"exit status {code} (could not start)"
    return f"exit status {code}"
