"""ProcessSupervisor: the lifecycle of every configured bot, each in its own OS process - start,
watch, restart with backoff, give up (FATAL) when restarting does not help, stop, reload. The
operator's requests from the control socket are answered by `control_requests.ControlRequests`,
which the loop feeds.

The supervisor is one loop blocked on `Host.wait()` over the children's pipes and sentinels and
a wake-up pipe (written by signal handlers and the control socket's thread), so a death, a
message or a signal is acted on at once. Every state change goes through `change_state()`,
which checks the table of allowed moves (`states.py`), logs the move - an unexpected exit as a
WARNING, FATAL as an ERROR, with the reason - and records it in the event log. Restarts use
capped exponential backoff with jitter (`backoff.py`), a restart budget per time window, and a
watchdog on heartbeats and start-up.

Everything it does to the operating system goes through a `host.Host` (processes, waiting, the
clocks, randomness, the OOM killer's count) and its database work through a
`database_agent.DatabaseAgent` (the supervisor never touches the database itself); both are
passed in, so the policy is unit tested with fakes and scripted histories
(tests/test_supervisor_policy.py) as well as with real processes (tests/test_supervisor.py).

Called by `main.py`. Imports: `backoff`, `config`, `control`, `control_requests`, `host`,
`states`, `pipe_protocol`, `process_setup`, and `bot_process` and `database_agent` for their
entry functions (light at import: neither loads telegram or psycopg2 in this process).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
from collections import deque
from typing import Any

from backoff import Backoff
from bot_process import child_config, child_main
from config import BotConfig, Config, load_config, pool_max_for
from control import ControlServer, SocketInUse, claim, make_authkey
from control_requests import ControlRequests
from database_agent import AgentUnavailable, DatabaseAgent
from host import Host
from pipe_protocol import Kind, Message
from process_setup import set_process_title
from states import ALLOWED_MOVES, EXIT_FAILED, EXIT_TOKEN_REJECTED, EXIT_USAGE, LIVE, IllegalMove, State, describe_exit

FORKSERVER_GONE = 255   # multiprocessing's exit code for a child whose forkserver went away

log = logging.getLogger("dims.supervisor")

RELOAD_STATES_WAIT_S = 2.0  # a reload waits this long for the added bots' desired states


class SupervisorError(RuntimeError):
    """The supervisor cannot run; the message says why, `exit_code` is main.py's status."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class SupervisorRunning(SupervisorError):
    """A live supervisor already answers on the control socket."""


class SupervisorUnavailable(RuntimeError):
    """The supervisor itself cannot run here (its socket, its processes); the bots and the
    database are not the problem, so one bot can still run without it."""


def claim_control_socket(config: Config) -> ControlServer:
    """The control socket, bound for this data directory's supervisor. SupervisorRunning when a
    live supervisor answers on it; OSError when it cannot be made."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.socket_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return claim(config.socket_path, make_authkey(config.data_dir), lambda: None, log)
    except SocketInUse as exc:
        raise SupervisorRunning(str(exc)) from None


# --------------------------------------------------------------------------- what it keeps per bot


class Child:
    """What the supervisor knows about one bot. (A plain class, not a dataclass: importing
    dataclasses costs the supervisor process a quarter of a megabyte of inspect, ast and dis.)"""

    def __init__(self, config: BotConfig, backoff: Backoff):
        self.config = config
        self.backoff = backoff                  # restart delays; reset after stable_after of RUNNING
        self.state = State.STOPPED
        self.process: Any = None                # the Host's process handle while LIVE
        self.spawn: Any = None                  # the Host's Spawn while its process is being started
        self.spawn_restart = False              # that start is a restart after a crash
        self.free_restart = False               # the next restart is not the bot's fault: no budget spent
        self.forkserver_pid: int | None = None  # the forkserver its process was forked from
        self.conn: Any = None                   # our end of its pipe
        self.wanted = True                      # desired state: running
        self.started_at = 0.0
        self.running_since = 0.0
        self.last_heartbeat = 0.0
        self.stats: dict[str, Any] = {}
        self.restarts = 0                       # after a crash (what RESTARTS counts)
        self.operator_restarts = 0              # bot_restart, and reloads that changed the bot
        self.recent_restarts: deque[float] = deque()   # times of restarts within restart_window
        self.next_start = 0.0                   # BACKOFF / FATAL: when to start again
        self.stop_deadline = 0.0
        self.term_sent = False
        self.killed_by_us = False               # we sent the SIGKILL it died of (hung, or a stop deadline)
        self.oom_kills_at_start: int | None = None
        self.last_error: str | None = None
        self.restart_after_stop = False
        self.removed = False                    # no longer configured: forgotten once stopped

    def __repr__(self) -> str:
        return f"Child({self.name!r}, {self.state.value}, pid={self.pid})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.state in LIVE else None


# --------------------------------------------------------------------------- the supervisor


class ProcessSupervisor:
    """Runs every configured bot in its own process and keeps them running."""

    def __init__(self, config: Config, log_level: str = "INFO", *, host: Host | None = None,
                 agent: DatabaseAgent | None = None, control: ControlServer | None = None):
        self.config = config
        self.settings = config.supervisor
        self.log_level = log_level
        self.host = host or Host()
        self.agent = agent
        self.control = control
        self.children: dict[str, Child] = {}
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        if control is not None:
            control.wake = self._wake
        self.host.on_spawned = self._wake
        self.requests = ControlRequests(self)
        self._shutting_down = False
        self.started_at = self.host.time()
        self._environment = dict(os.environ)   # what reload() reads tokens from

    def hide_tokens_from_children(self) -> None:
        """Take every bot's token variable out of this process's environment before the
        forkserver is started from it, so that no bot process can read another bot's token
        there (each is handed its own in its configuration); reload() reads them from a copy."""
        for bot_config in self.config.bots:
            if bot_config.token_env:
                os.environ.pop(bot_config.token_env, None)

    # -- the state machine

    def change_state(self, child: Child, new: State, reason: str = "") -> None:
        old = child.state
        if new not in ALLOWED_MOVES[old]:
            raise IllegalMove(f"bot {child.name}: {old.value} -> {new.value} is not allowed")
        child.state = new
        pid = child.process.pid if child.process is not None else None
        suffix = f" (pid {pid})" if pid and new in (*LIVE, State.EXITED) else ""
        # A crash and its restart delay are warnings, giving up is an error; the rest is routine.
        level = logging.ERROR if new is State.FATAL else (
            logging.WARNING if new in (State.EXITED, State.BACKOFF) else logging.INFO)
        log.log(level, "bot %s: %s -> %s%s%s", child.name, old.value, new.value, suffix, f": {reason}" if reason else "")
        self.agent.record(child.name, "state", reason, state_from=old, state_to=new, pid=pid)
        self.requests.on_state_change(child)

    # -- lifecycle of one child

    def _new_child(self, bot_config: BotConfig) -> Child:
        s = self.settings
        return Child(bot_config, Backoff(s.backoff_initial, s.backoff_max, jitter=0.25, jitter_first=False,
                                         random=self.host.random))

    def _spawn(self, child: Child, restart: bool = False) -> None:
        """Start the bot's process (`restart`: after a crash, counted in RESTARTS once it started).
        The start runs off the loop (`Host.spawn`); the bot is STARTING meanwhile and `_spawned`
        takes the process when the host has it."""
        if child.config.token_problem:   # nothing to start it with: an operator must act
            child.last_error = child.config.token_problem
            child.next_start = float("inf")
            if child.state is State.FATAL:
                log.error("bot %s: still cannot start: %s", child.name, child.last_error)
                self.requests.on_state_change(child)
            else:
                self.change_state(child, State.FATAL, f"cannot start: {child.last_error}")
            return
        if child.spawn is not None:
            return   # already being started
        wanted = sum(1 for c in self.children.values() if not c.removed)   # as reload() checked the budget
        pool_max = pool_max_for(self.config.database, max(1, wanted))
        child.process = child.conn = None
        child.spawn_restart = restart
        child.started_at = self.host.monotonic()
        child.last_heartbeat = 0.0
        child.stats = {}
        child.term_sent = child.killed_by_us = False
        child.oom_kills_at_start = self.host.oom_kills()
        child.spawn = self.host.spawn(
            child_main, (child.config, child_config(self.config, child.config), pool_max, self.log_level),
            f"dims-bot-{child.name}")
        self.change_state(child, State.STARTING)
        if child.spawn.done:
            self._spawned(child)

    def _spawned(self, child: Child) -> None:
        """The host finished starting the bot's process (or could not)."""
        spawn, child.spawn = child.spawn, None
        try:
            child.process, child.conn = spawn.result()
        except OSError as exc:   # fork failed (EAGAIN, ENOMEM, EMFILE), or the forkserver died or hung
            self._start_failed(child, exc)
            return
        child.forkserver_pid = spawn.forkserver_pid
        if child.spawn_restart:
            child.restarts += 1
            self.agent.record(child.name, "restart", f"restart #{child.restarts}")
        self.agent.record(child.name, "start", pid=child.process.pid)
        if child.state is State.STOPPING:   # asked to stop while it was being started
            child.stop_deadline = self.host.monotonic() + self.settings.stop_timeout
            self.send(child, Message(Kind.STOP))

    def _start_failed(self, child: Child, exc: OSError) -> None:
        """No process could be started: try again after the next restart delay (within the
        restart budget, as a crash would), never letting the error out of the loop."""
        child.process = child.conn = None
        child.last_error = f"could not start its process: {exc}"
        self.agent.record(child.name, "start_failed", child.last_error)
        if child.state is State.STOPPING:
            self.change_state(child, State.STOPPED, f"stopped; {child.last_error}")
            self._after_stopped(child)
            return
        now = self.host.monotonic()
        if self._budget_spent(child, now):
            child.next_start = now + self.settings.fatal_cooldown
            reason = f"{child.last_error}; retrying in {self.settings.fatal_cooldown:g} s or on bot_start"
            if child.state is State.FATAL:
                log.error("bot %s: %s", child.name, reason)
            else:
                self.change_state(child, State.FATAL, reason)
            return
        delay = child.backoff.next()
        child.next_start = now + delay
        reason = f"{child.last_error}; retrying in {delay:.2f} s"
        if child.state is State.BACKOFF:
            log.error("bot %s: %s", child.name, reason)
        else:
            self.change_state(child, State.BACKOFF, reason)

    def start_bot(self, child: Child) -> None:
        child.wanted = True
        if child.state in (State.STOPPED, State.BACKOFF, State.FATAL):
            if child.state is State.FATAL:
                child.recent_restarts.clear()
                child.backoff.reset()
            self._spawn(child)

    def stop_bot(self, child: Child, *, restart: bool = False) -> None:
        """Stop message, then SIGTERM, then SIGKILL at stop_timeout. Harmless to repeat."""
        child.restart_after_stop = restart
        if child.state in (State.BACKOFF, State.FATAL):
            self.change_state(child, State.STOPPED, "stopped while waiting to restart")
            if restart:
                self.start_bot(child)
            return
        if child.state not in (State.STARTING, State.RUNNING):
            return
        self.change_state(child, State.STOPPING)
        child.stop_deadline = self.host.monotonic() + self.settings.stop_timeout
        self.send(child, Message(Kind.STOP))

    def _forget_if_stopped(self, child: Child) -> None:
        if child.removed and child.state is State.STOPPED:
            self.children.pop(child.name, None)
            log.info("bot %s: removed from the configuration", child.name)

    def _describe_exit(self, child: Child, code: int | None) -> str:
        """The exit as an operator should read it; for a SIGKILL nobody in DIMS sent, whether
        the kernel's OOM killer is the likely sender."""
        status = describe_exit(code)
        if code == -signal.SIGKILL and not child.killed_by_us:
            now, then = self.host.oom_kills(), child.oom_kills_at_start
            if now is not None and then is not None and now > then:
                status += "; perhaps out of memory? (the kernel's OOM killer has killed a process since it started)"
            else:
                status += " (not sent by DIMS)"
        return status

    def _on_exit(self, child: Child) -> None:
        process = child.process
        process.join(0)
        code = process.exitcode
        with_forkserver = code == FORKSERVER_GONE and self.host.forkserver_died(child.forkserver_pid)
        if with_forkserver:
            status = "stopped with its forkserver, which died"
        elif code is None:   # gone, and its parent did not say how: the forkserver is stuck
            status = "exited; its forkserver, which is not answering, did not report how"
        else:
            status = self._describe_exit(child, code)
        if child.conn is not None:
            child.conn.close()
            child.conn = None
        self.agent.record(child.name, "exit", describe_exit(code), pid=process.pid, exit_code=code, described=status)
        if child.state is State.STOPPING:
            self.change_state(child, State.STOPPED, status)
            self._after_stopped(child)
            return
        was_running = child.state is State.RUNNING
        reason = child.last_error if child.killed_by_us and child.last_error else None
        child.last_error = status + (f" ({reason})" if reason else "") + (
            f"; last error: {child.stats['last_error']}" if child.stats.get("last_error") else "")
        self.change_state(child, State.EXITED, child.last_error)
        if self._shutting_down:
            self.change_state(child, State.STOPPED, "supervisor stopping")
            return
        if code == EXIT_TOKEN_REJECTED:
            child.next_start = float("inf")
            self.change_state(child, State.FATAL, "Telegram rejected the token; fix it, then bot_start")
            return
        if with_forkserver:   # not the bot's doing: restarted at once, no budget spent, no backoff
            child.free_restart = True
            child.next_start = self.host.monotonic() + self.settings.backoff_initial
            self.change_state(child, State.BACKOFF, f"restarting in {self.settings.backoff_initial:.2f} s")
            return
        self._schedule_restart(child, was_running)

    def _after_stopped(self, child: Child) -> None:
        """A stop finished: forget a removed bot, or start it again when the stop was a restart."""
        if child.removed:
            self._forget_if_stopped(child)
        elif child.restart_after_stop and not self._shutting_down:
            child.restart_after_stop = False
            child.operator_restarts += 1
            self._spawn(child)

    def _budget_spent(self, child: Child, now: float) -> bool:
        """restart_budget restarts within the last restart_window."""
        while child.recent_restarts and now - child.recent_restarts[0] > self.settings.restart_window:
            child.recent_restarts.popleft()
        return len(child.recent_restarts) >= self.settings.restart_budget

    def _schedule_restart(self, child: Child, was_running: bool) -> None:
        now = self.host.monotonic()
        if was_running and now - child.running_since >= self.settings.stable_after:
            child.backoff.reset()
        if self._budget_spent(child, now):
            child.next_start = now + self.settings.fatal_cooldown
            self.change_state(child, State.FATAL, f"{len(child.recent_restarts)} restarts within "
                              f"{self.settings.restart_window:g} s; retrying in {self.settings.fatal_cooldown:g} s "
                              "or on bot_start")
            return
        delay = child.backoff.next()
        child.next_start = now + delay
        self.change_state(child, State.BACKOFF, f"restarting in {delay:.2f} s")

    def send(self, child: Child, message: Message) -> bool:
        if child.conn is None:
            return False
        try:
            child.conn.send_bytes(message.encode())
            return True
        except (OSError, ValueError):
            return False

    # -- messages from children

    def _on_message(self, child: Child) -> None:
        try:
            message = Message.decode(child.conn.recv_bytes())
        except (EOFError, OSError):
            child.conn.close()
            child.conn = None   # the sentinel reports the exit
            return
        except (ValueError, KeyError):
            log.warning("bot %s: unreadable pipe message ignored", child.name)
            return
        if message.kind in (Kind.READY, Kind.HEARTBEAT):   # only these prove the bot's loop turns
            child.last_heartbeat = self.host.monotonic()
            child.stats = message.body
            if child.state is State.STARTING and message.body.get("problem"):
                child.started_at = child.last_heartbeat   # waiting for an outside cause, not hung
                self.requests.on_start_waiting(child)
        if message.kind is Kind.READY and child.state is State.STARTING:
            child.running_since = self.host.monotonic()
            self.change_state(child, State.RUNNING)
        elif message.kind is Kind.REPLY:
            self.requests.on_stats_reply(child, message)

    # -- timers: backoff, fatal cool-down, stop deadlines, watchdogs

    def run_timers(self) -> float:
        """Act on every due timer; return seconds until the next one."""
        now = self.host.monotonic()
        next_due = [60.0]
        for child in list(self.children.values()):
            if child.state in (State.BACKOFF, State.FATAL) and child.wanted and not self._shutting_down:
                if now >= child.next_start:
                    if not child.free_restart:   # an attempt spends the budget, whether it starts or not
                        child.recent_restarts.append(now)
                    child.free_restart = False
                    self._spawn(child, restart=True)
                if child.state in (State.BACKOFF, State.FATAL):   # waiting still (or again: the start failed)
                    next_due.append(max(0.0, child.next_start - now))
            elif child.state is State.STOPPING:
                next_due.append(self._push_stop(child, now))
            elif child.state is State.RUNNING:
                if child.backoff.failures and now - child.running_since >= self.settings.stable_after:
                    child.backoff.reset()
                silent = now - child.last_heartbeat
                if silent >= self.settings.heartbeat_timeout:
                    self._kill_hung(child, f"no heartbeat for {silent:.1f} s")
                else:
                    next_due.append(self.settings.heartbeat_timeout - silent)
            elif child.state is State.STARTING and child.spawn is None:   # a stuck spawn: the host's deadline
                waited = now - child.started_at
                if waited >= self.settings.start_timeout:
                    self._kill_hung(child, f"not ready after {waited:.1f} s")
                else:
                    next_due.append(self.settings.start_timeout - waited)
        next_due.append(self.requests.run_timers(now))
        return max(0.0, min(next_due))

    def _push_stop(self, child: Child, now: float) -> float:
        """SIGTERM at 70 % of stop_timeout, SIGKILL at the deadline; seconds until the next of them."""
        if child.process is None:   # still being started: _spawned sends the stop
            return 0.5
        term_deadline = child.stop_deadline - self.settings.stop_timeout * 0.3
        if now >= child.stop_deadline:
            log.warning("bot %s: did not stop within %g s: SIGKILL", child.name, self.settings.stop_timeout)
            child.killed_by_us = True
            child.process.kill()
            return 1.0
        if now >= term_deadline and not child.term_sent:
            child.term_sent = True
            log.info("bot %s: still running; sending SIGTERM", child.name)
            child.process.terminate()
        return (child.stop_deadline if child.term_sent else term_deadline) - now

    def _kill_hung(self, child: Child, reason: str) -> None:
        log.warning("bot %s: %s: killing it (hung)", child.name, reason)
        child.last_error = reason
        child.killed_by_us = True
        self.agent.record(child.name, "hung", reason, pid=child.process.pid)
        child.process.kill()
        child.last_heartbeat = child.started_at = self.host.monotonic()  # don't kill twice while the exit is on its way

    # -- the loop

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    def notify_signal(self, signum: int, frame: Any = None) -> None:
        """The signal handler: record the signal and wake the loop, which acts on it."""
        self._signals.append(signum)
        self._wake()

    def loop_once(self, timeout: float) -> None:
        """Wait up to `timeout` for a message, an exit, a signal or a request, and act on it."""
        objects: list[Any] = [self._wake_r]
        by_object: dict[Any, tuple[str, Any]] = {}
        forkserver = self.host.forkserver_sentinel()
        if forkserver is not None:
            objects.append(forkserver)
            by_object[forkserver] = ("forkserver", None)
        agent = self.agent.sentinel
        if agent is not None:
            objects.append(agent)
            by_object[agent] = ("agent", None)
        for child in self.children.values():
            if child.process is not None and child.state in LIVE:
                objects.append(child.process.sentinel)
                by_object[child.process.sentinel] = ("exit", child)
                if child.conn is not None:
                    objects.append(child.conn)
                    by_object[child.conn] = ("message", child)
        exits = []
        for obj in self.host.wait(objects, timeout):
            if obj == self._wake_r:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                continue
            kind, child = by_object[obj]
            if kind == "forkserver":
                pid = self.host.forkserver_exited()
                log.warning("the forkserver (pid %s) died; starting a new one", pid)
                self.agent.record(None, "forkserver", "died", pid=pid)
            elif kind == "agent":
                self.agent.on_exit()
            elif kind == "message":
                while child.conn is not None and child.conn.poll():
                    self._on_message(child)
            else:
                exits.append(child)
        for child in exits:
            while child.conn is not None and child.conn.poll():
                self._on_message(child)   # a last heartbeat or reply before the exit
            self._on_exit(child)
        for child in list(self.children.values()):
            if child.spawn is not None and child.spawn.done:
                self._spawned(child)
        while self._signals:
            self._handle_signal(self._signals.popleft())
        if self.control is not None:
            while True:
                try:
                    payload, reply = self.control.requests.get_nowait()
                except queue.Empty:
                    break
                self.requests.handle(payload, reply)

    def _handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if self._shutting_down:
                log.info("SIGHUP while stopping: not reloading")
                return
            log.info("SIGHUP: reloading the configuration")
            result = self.reload()
            log.info("reload: %s", result.get("reason") or result)
        elif not self._shutting_down:
            log.info("%s: stopping every bot (%s again: stop at once)", name, name)
            self.shutdown()
        else:
            log.warning("%s again: stopping every bot at once (SIGKILL)", name)
            for child in self.children.values():
                if child.state is State.STOPPING and child.process is not None:
                    child.killed_by_us = True
                    child.process.kill()

    def shutdown(self) -> None:
        self._shutting_down = True
        for child in self.children.values():
            child.wanted = True  # a supervisor stop is not an operator's bot_stop
            self.stop_bot(child)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def finished(self) -> bool:
        """Shutting down, and every bot has stopped."""
        return self._shutting_down and all(c.state in (State.STOPPED, State.FATAL) for c in self.children.values())

    # -- start-up and the main entry

    def run(self) -> int:
        """Start everything, loop until SIGTERM/SIGINT and every bot has stopped. Exit status.
        SupervisorUnavailable when the supervisor itself cannot run here (the caller may fall
        back to one in-process bot)."""
        try:
            if self.control is None:
                try:
                    self.control = claim_control_socket(self.config)
                except OSError as exc:
                    raise SupervisorUnavailable(f"cannot open the control socket {self.config.socket_path}: "
                                                f"{exc}") from None
            self.control.wake = self._wake
            set_process_title("dims: supervisor", "dims supervisor")
            self.hide_tokens_from_children()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, self.notify_signal)
            self.start()
            while not self.finished:
                self.loop_once(self.run_timers())
            return 0
        except SupervisorError as exc:   # another supervisor runs, the database is unreachable or too small
            log.error("%s", exc)
            return exc.exit_code
        finally:
            self.close()

    def start(self) -> None:
        """Start the database agent (which migrates first), then every bot that is wanted."""
        if self.agent is None:
            self.agent = DatabaseAgent(self.host, self.config, self.log_level, self.settings.start_timeout)
        try:
            self.agent.start()
        except AgentUnavailable as exc:
            raise SupervisorError(str(exc), EXIT_USAGE if exc.configuration else EXIT_FAILED) from None
        except OSError as exc:
            raise SupervisorUnavailable(f"cannot start child processes: {exc}") from None
        self.agent.record(None, "supervisor", "started", pid=os.getpid())
        for bot_config in self.config.bots:
            self.children[bot_config.name] = self._new_child(bot_config)
        self._load_desired_states(list(self.children), self.settings.start_timeout)
        log.info("supervisor %d: %d bots, control socket %s", os.getpid(), len(self.children),
                 self.config.socket_path)
        for child in self.children.values():
            if child.wanted:
                self.start_bot(child)
            else:
                log.info("bot %s: left STOPPED (stopped by an operator)", child.name)

    def _load_desired_states(self, names: list[str], timeout: float) -> None:
        """Each bot's desired state from dims_bots; without an answer in time, 'running'."""
        states = self.agent.desired_states(names, timeout)
        if states is None:
            log.warning("the database did not say within %g s which bots operators stopped; starting %s",
                        timeout, ", ".join(names))
            return
        for name, desired in states.items():
            self.children[name].wanted = desired == "running"

    def close(self) -> None:
        for child in self.children.values():
            if child.process is not None and child.process.is_alive():
                child.process.kill()
        if self.control is not None:
            self.control.close()
        if self.agent is not None:
            self.agent.record(None, "supervisor", "stopped", pid=os.getpid())
            self.agent.close()
        self.host.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # -- reload

    def reload(self) -> dict[str, Any]:
        if self._shutting_down:
            return {"status": "error", "reason": "the supervisor is stopping: configuration not reloaded"}
        try:
            fresh = load_config(self.config.path, env=self._environment)
            pool_max_for(fresh.database, len(fresh.bots))
        except Exception as exc:
            return {"status": "error", "reason": f"configuration not reloaded: {exc}"}
        refused = self.agent.budget_refusal(fresh, RELOAD_STATES_WAIT_S)
        if refused:
            return {"status": "error", "reason": f"configuration not reloaded: {refused}"}
        self.agent.fleet = len(fresh.bots)
        old = {c.name: c.config for c in self.children.values() if not c.removed}
        new = {b.name: b for b in fresh.bots}
        for name, child in self.children.items():   # removed, still stopping, and configured again
            if child.removed and name in new:
                child.removed, child.config, child.restart_after_stop = False, new[name], True
                old[name] = new[name]
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        changed = [n for n in new if n in old and new[n] != old[n]]
        self.config, self.settings = fresh, fresh.supervisor
        for child in self.children.values():
            child.backoff.first, child.backoff.cap = self.settings.backoff_initial, self.settings.backoff_max
        for name in removed:
            child = self.children[name]
            child.removed = True
            self.stop_bot(child)
            self._forget_if_stopped(child)
        for name in changed:
            child = self.children[name]
            child.config = new[name]
            if child.state in (State.STARTING, State.RUNNING):
                self.stop_bot(child, restart=True)
            elif child.state is State.FATAL and child.wanted:
                self.start_bot(child)   # e.g. a rejected token was replaced
        for name in added:
            self.children[name] = self._new_child(new[name])
        self._load_desired_states(added, timeout=RELOAD_STATES_WAIT_S)
        for name in added:
            if self.children[name].wanted:
                self.start_bot(self.children[name])
        self.agent.record(None, "reload", "", added=added, removed=removed, changed=changed)
        return {"status": "ok", "added": added, "removed": removed, "changed": changed}
