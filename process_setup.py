"""How a DIMS process sets itself up: the name `ps`, `top` and `pgrep` show for it, and, for a
child process, dying with its parent and leaving Ctrl-C to the supervisor.

Names: `dims: supervisor`, `dims: bot alpha`, `dims: database agent`, `dims: forkserver`,
instead of `python -B -c from multiprocessing.forkserver import main ...`. Two are set: the
command line `ps aux` shows, and the kernel's short name (`comm`: what `top`, `ps -o comm` and
`pgrep` match, 15 bytes at most), both with `setproctitle` (a small C library); without it, the
short name alone, with prctl(PR_SET_NAME) through ctypes. (ctypes costs the supervisor about
a third of a megabyte, so it is loaded only where it is needed: a child's parent-death signal.)

Called first by each process's entry function (`main.py`, `bot_process.child_main`,
`database_agent.database_agent_main`, the forkserver's preparation). Standard library only, plus
setproctitle when it is installed; imports nothing of DIMS.
"""

from __future__ import annotations

import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_COMM_MAX = 15


def set_process_title(title: str, short: str | None = None) -> None:
    """`title` for `ps`; `short` (default: the title) for the kernel's 15-byte name."""
    comm = (short or title).encode()[:_COMM_MAX].decode(errors="ignore")
    try:
        import setproctitle
    except ImportError:
        _prctl(_PR_SET_NAME, comm.encode())
    else:
        setproctitle.setproctitle(title)
        setproctitle.setthreadtitle(comm)   # the main thread's name is the process's comm


def prepare_child(title: str, short: str | None = None) -> None:
    """A child of the supervisor: named, SIGKILLed when its parent (the forkserver) dies, and
    deaf to the terminal's Ctrl-C, which is the supervisor's to handle."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    set_process_title(title, short)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prctl(option: int, value) -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        argument = ctypes.c_char_p(value) if isinstance(value, bytes) else ctypes.c_ulong(int(value))
        libc.prctl(option, argument, 0, 0, 0)
    except (OSError, AttributeError):
        pass   # not Linux: the title is all there is, and the pipe's EOF ends an orphan
