"""The supervisor's answers to the control socket: one method per command of `control.COMMANDS`
(`_cmd_bot_list`, `_cmd_bot_start`, ...), a bot's row as `bot_list` shows it, and the requests
that wait - for a bot to reach a state (`bot_start` answers once it is RUNNING), for fresh stats
from every bot (`cache_stats`) - each with its deadline.

`ProcessSupervisor` owns one `ControlRequests` and feeds it: the requests the control server
queued (`handle`), every state change (`on_state_change`), the bots' stats replies
(`on_stats_reply`) and its timer pass (`run_timers`). It acts on the fleet only through the
supervisor's own methods (`start_bot`, `stop_bot`, `reload`, `send`) and reads the time from the
supervisor's host. Imports: `control`, `pipe_protocol`, `states`; never `supervisor` (which
imports this module) or anything that loads telegram or psycopg2.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from control import BAD_REQUEST, CACHE_FIELDS
from pipe_protocol import Kind, Message
from states import LIVE, State

log = logging.getLogger("dims.supervisor")

STATS_WAIT_S = 3.0        # a bot asked for fresh stats must answer within this


class Waiter:
    """An operator's request waiting for a bot to reach one of `targets` (or fail into `terminal`)."""

    def __init__(self, name: str, targets: set[State], terminal: set[State], deadline: float,
                 reply: Callable[[dict], None]):
        self.name, self.targets, self.terminal, self.deadline, self.reply = name, targets, terminal, deadline, reply


class StatsQuery:
    """A request for fresh stats from several bots, answered once all replied or the deadline passed."""

    def __init__(self, names: list[str], asked: set[str], deadline: float, reply: Callable[[dict], None],
                 row: Callable[[Any, dict], dict]):
        self.results: dict[str, dict | None] = {name: None for name in names}
        self.asked, self.deadline, self.reply, self.row = asked, deadline, reply, row

    def answer(self, children: dict[str, Any]) -> None:
        rows = []
        for name, stats in self.results.items():
            child = children.get(name)
            if child is None:
                continue
            if stats is None:   # could not answer: not RUNNING, or silent until the deadline
                rows.append({**self.row(child, {}), "state": child.state.value, "unavailable": True})
            else:
                rows.append(self.row(child, stats))
        self.reply({"status": "ok", "bots": rows})


class ControlRequests:
    """Answers the control socket's requests for one supervisor."""

    def __init__(self, supervisor):
        self.sup = supervisor
        self._waiters: list[Waiter] = []
        self._queries: dict[int, StatsQuery] = {}
        self._next_id = 1

    def bot_row(self, child) -> dict[str, Any]:
        now = self.sup.host.monotonic()
        live = child.state in LIVE
        return {
            "name": child.name, "state": child.state.value, "pid": child.pid,
            "uptime_s": round(now - child.running_since, 1) if child.state is State.RUNNING else None,
            "restarts": child.restarts, "operator_restarts": child.operator_restarts,
            "heartbeat_age_s": round(now - child.last_heartbeat, 1) if live and child.last_heartbeat else None,
            "updates_handled": child.stats.get("updates_handled", 0),
            "backlog": child.stats.get("backlog"),
            "last_error": child.last_error or child.stats.get("last_error"),
            "problem": child.stats.get("problem") if child.state in (State.RUNNING, State.STARTING) else None,
            "wanted": "running" if child.wanted else "stopped",
        }

    def handle(self, payload: dict[str, Any], reply: Callable[[dict], None]) -> None:
        command = payload.get("command")
        handler = getattr(self, f"_cmd_{command}", None) if isinstance(command, str) else None
        if handler is None:
            reply({"status": "error", "reason": f"unknown command {command!r}", "code": BAD_REQUEST})
            return
        try:
            handler(payload, reply)
        except Exception as exc:  # answered, logged; the supervisor carries on
            log.exception("control command %s failed", command)
            reply({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})

    def _unknown(self, name: Any, reply: Callable[[dict], None]) -> None:
        known = ", ".join(self.sup.children) or "none"
        reply({"status": "error", "reason": f"bot {name!r} is not configured (known: {known})", "code": BAD_REQUEST})

    def _named(self, payload: dict[str, Any], reply: Callable[[dict], None], removed_ok: bool = False) -> Any:
        """The named bot, or None once answered with why not (unknown, or being removed)."""
        name = payload.get("name")
        child = self.sup.children.get(name) if isinstance(name, str) else None
        if child is None:
            self._unknown(name, reply)
        elif child.removed and not removed_ok:
            reply({"status": "error", "reason": f"bot {name!r} is being removed (no longer configured)",
                   "code": BAD_REQUEST})
            return None
        return child

    def _uptime(self) -> float:
        return round(self.sup.host.time() - self.sup.started_at, 1)

    def _cmd_ping(self, payload, reply) -> None:
        reply({"status": "ok", "pid": os.getpid(), "uptime_s": self._uptime()})

    def _cmd_bot_list(self, payload, reply) -> None:
        reply({"status": "ok", "supervisor": {"pid": os.getpid(), "uptime_s": self._uptime(),
                                              "socket": str(self.sup.config.socket_path),
                                              "database_agent": self.sup.agent.status()},
               "heartbeat_timeout_s": self.sup.settings.heartbeat_timeout,
               "bots": [self.bot_row(c) for c in self.sup.children.values()]})

    def _wanted(self, payload, reply, running: bool) -> Any:
        """The named bot with its desired state set and saved (None: answered with an error)."""
        child = self._named(payload, reply)
        if child is not None:
            child.wanted = running
            self.sup.agent.save_desired(child.name, running)
        return child

    def _bring_up(self, child, restart: bool) -> None:
        if child.state is State.STOPPING:
            child.restart_after_stop = True
        elif restart and child.state in (State.STARTING, State.RUNNING):
            self.sup.stop_bot(child, restart=True)
        else:
            self.sup.start_bot(child)

    def _cmd_bot_start(self, payload, reply) -> None:
        self._start_and_wait(payload, reply, restart=False)

    def _cmd_bot_restart(self, payload, reply) -> None:
        self._start_and_wait(payload, reply, restart=True)

    def _start_and_wait(self, payload, reply, restart: bool) -> None:
        """Bring the bot up (a running one only when restarting); answer once it is RUNNING."""
        if self.sup.shutting_down:
            reply({"status": "error", "reason": "the supervisor is stopping: no bot is started"})
            return
        child = self._wanted(payload, reply, running=True)
        if child is None:
            return
        if child.state is State.RUNNING and not restart:
            reply({"status": "ok", "bot": self.bot_row(child), "changed": False})
            return
        self._bring_up(child, restart)
        self._wait_for(child, {State.RUNNING}, payload, reply, terminal={State.FATAL})

    def _cmd_bot_stop(self, payload, reply) -> None:
        child = self._wanted(payload, reply, running=False)
        if child is None:
            return
        child.restart_after_stop = False
        if child.state is State.STOPPED:
            reply({"status": "ok", "bot": self.bot_row(child), "changed": False})
            return
        self.sup.stop_bot(child)
        self._wait_for(child, {State.STOPPED}, payload, reply)

    def _cmd_wait(self, payload, reply) -> None:
        """Answer when the bot is in one of payload["states"] (or after payload["timeout"])."""
        child = self._named(payload, reply, removed_ok=True)
        if child is not None:
            try:
                states = {State(s) for s in payload.get("states") or ()}
            except ValueError:
                reply({"status": "error", "reason": f"unknown state in {payload.get('states')}", "code": BAD_REQUEST})
                return
            self._wait_for(child, states, payload, reply)

    def _cmd_reload(self, payload, reply) -> None:
        reply(self.sup.reload())

    def _cmd_inbox_wake(self, payload, reply) -> None:
        """Tell a RUNNING bot to handle its pending updates now; any other bot handles them
        when it runs again (every start begins with what is pending)."""
        child = self._named(payload, reply)
        if child is not None:
            woken = child.state is State.RUNNING and self.sup.send(child, Message(Kind.WAKE))
            reply({"status": "ok", "bot": self.bot_row(child), "woken": woken})

    def _cmd_cache_stats(self, payload, reply) -> None:
        self._query_children(payload, reply, lambda child, stats: {"name": child.name, **dict.fromkeys(CACHE_FIELDS),
                                                                   **(stats.get("cache") or {})})

    def _cmd_stats(self, payload, reply) -> None:
        self._query_children(payload, reply, lambda child, stats: {"name": child.name, **stats})

    def _wait_for(self, child, targets: set[State], payload, reply, terminal: set[State] = frozenset()) -> None:
        if child.state in targets:
            reply({"status": "ok", "bot": self.bot_row(child), "changed": True})
            return
        deadline = self.sup.host.monotonic() + float(payload.get("timeout", 30))
        self._waiters.append(Waiter(child.name, set(targets), set(terminal), deadline, reply))
        self.on_state_change(child)   # already failed (FATAL at once: no token)

    def on_state_change(self, child) -> None:
        for waiter in list(self._waiters):
            if waiter.name != child.name or child.state not in waiter.targets | waiter.terminal:
                continue
            self._waiters.remove(waiter)
            if child.state in waiter.targets:
                waiter.reply({"status": "ok", "bot": self.bot_row(child), "changed": True})
            else:
                waiter.reply({"status": "error", "reason": f"bot {child.name} is {child.state.value}: {child.last_error}",
                              "bot": self.bot_row(child)})

    def on_start_waiting(self, child) -> None:
        """A starting bot says it waits for an outside cause (the database down): whoever waits
        for it to run hears so now, not at their deadline. It goes on waiting by itself."""
        for waiter in list(self._waiters):
            if waiter.name == child.name and State.RUNNING in waiter.targets:
                self._waiters.remove(waiter)
                waiter.reply({"status": "error", "bot": self.bot_row(child),
                              "reason": f"bot {child.name} is STARTING: {child.stats.get('problem')}; "
                                        "it runs by itself once that is over"})

    def _query_children(self, payload, reply, row: Callable[[Any, dict], dict]) -> None:
        """Ask every RUNNING bot (or the one named) for fresh stats; answer when all replied. A bot
        that cannot answer (not RUNNING, or silent for STATS_WAIT_S) gets the row of no stats,
        marked `unavailable`, with its state."""
        names = [payload["name"]] if payload.get("name") else list(self.sup.children)
        unknown = [n for n in names if n not in self.sup.children]
        if unknown:
            self._unknown(unknown[0], reply)
            return
        query_id = self._next_id
        self._next_id += 1
        asked = {n for n in names if self.sup.children[n].state is State.RUNNING
                 and self.sup.send(self.sup.children[n], Message(Kind.STATS, id=query_id))}
        self._queries[query_id] = StatsQuery(names, asked, self.sup.host.monotonic() + STATS_WAIT_S, reply, row)
        if not asked:
            self._finish_query(query_id)

    def on_stats_reply(self, child, message: Message) -> None:
        query = self._queries.get(message.id)
        if query is None:
            return
        query.results[child.name] = message.body
        query.asked.discard(child.name)
        if not query.asked:
            self._finish_query(message.id)

    def _finish_query(self, query_id: int) -> None:
        self._queries.pop(query_id).answer(self.sup.children)

    def run_timers(self, now: float) -> float:
        """Answer the requests whose deadline passed; seconds until the next deadline."""
        next_due = [60.0]
        for query_id, query in list(self._queries.items()):
            if now >= query.deadline:
                self._finish_query(query_id)
            else:
                next_due.append(query.deadline - now)
        for waiter in list(self._waiters):
            if now < waiter.deadline:
                next_due.append(waiter.deadline - now)
                continue
            self._waiters.remove(waiter)
            child = self.sup.children.get(waiter.name)
            waiter.reply({"status": "error",
                          "reason": f"bot {waiter.name} is {child.state.value if child else 'gone'} after waiting; "
                                    f"it did not reach {'/'.join(s.value for s in waiter.targets)}",
                          "bot": self.bot_row(child) if child else None})
        return min(next_due)
