"""The supervisor's policy with a fake host: restarts and their backoff, the restart budget and
FATAL, recovering from FATAL, the watchdog, stopping, what a child is handed, and how exits are
logged - each as a scripted history in simulated time, no process started and nothing slept."""

from __future__ import annotations

import logging
import signal

import pytest

from bot_process import child_main
from config import load_config
from pipe_protocol import Kind
from states import EXIT_TOKEN_REJECTED, State
from supervisor import ProcessSupervisor
from tests.fake_host import CRASHES, RUNS, FakeAgent, FakeHost, Script

TOKENS = {"alpha": "7000001:AAFakeTokenForTestsOnly_alpha00000000",
          "beta": "7000002:AAFakeTokenForTestsOnly_beta000000000"}
SETTINGS = {"heartbeat_interval": 0.5, "heartbeat_timeout": 3, "start_timeout": 10, "backoff_initial": 0.05,
            "backoff_max": 1, "stable_after": 10, "restart_window": 30, "restart_budget": 3,
            "fatal_cooldown": 600, "stop_timeout": 5}


def write_config(path, bots, literal_tokens: dict[str, str] | None = None, **settings) -> None:
    """Bots with tokens from *_TOKEN variables, or (literal_tokens) written into the file."""
    lines = ["[supervisor]"] + [f"{k} = {v}" for k, v in {**SETTINGS, **settings}.items()]
    for name in bots:
        token = (literal_tokens or {}).get(name)
        lines += ["[[bots]]", f'name = "{name}"', f'token = "{token}"' if token else f'token_env = "{name.upper()}_TOKEN"']
    path.write_text("\n".join(lines) + "\n")


class Fleet:
    """A supervisor on a fake host, started, with helpers to run simulated time."""

    def __init__(self, tmp_path, bots=("alpha",), env=None, desired=None, scripts=None, **settings):
        path = tmp_path / "dims.toml"
        write_config(path, bots, **settings)
        env = {f"{n.upper()}_TOKEN": t for n, t in TOKENS.items()} if env is None else env
        self.config = load_config(path, env={**env, "DATABASE_URL": "postgresql://unused/db"})
        self.host = FakeHost(self.config.supervisor.heartbeat_interval)
        self.host.scripts = {name: list(queue) for name, queue in (scripts or {}).items()}
        self.agent = FakeAgent(desired)
        self.sup = ProcessSupervisor(self.config, host=self.host, agent=self.agent)
        self.sup.start()

    def child(self, name: str):
        return self.sup.children[name]

    def state(self, name: str) -> State:
        return self.child(name).state

    def step(self, limit: float) -> None:
        self.sup.loop_once(min(self.sup.run_timers(), limit))

    def run_for(self, seconds: float) -> None:
        deadline = self.host.now + seconds
        for _ in range(100_000):
            if self.host.now >= deadline:
                return
            self.step(deadline - self.host.now)
        raise AssertionError("the supervisor made no progress")

    def run_until(self, done, within: float):
        deadline = self.host.now + within
        for _ in range(100_000):
            if done():
                return
            if self.host.now >= deadline:
                raise AssertionError(f"not done within {within} simulated seconds")
            self.step(deadline - self.host.now)
        raise AssertionError("the supervisor made no progress")

    def request(self, **payload) -> list[dict]:
        replies: list[dict] = []
        self.sup.requests.handle({"timeout": 30, **payload}, replies.append)
        return replies

    def starts(self, name: str) -> list[float]:
        return [p.started for p in self.host.of(name)]


def test_a_crashing_bot_is_restarted_after_backoff_initial_and_each_delay_doubles(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES]}, restart_budget=10)
    fleet.run_until(lambda: len(fleet.host.of("alpha")) == 5, within=10)
    starts = fleet.starts("alpha")
    delays = [round(b - a - CRASHES.exit_after, 3) for a, b in zip(starts, starts[1:])]
    assert delays == [0.05, 0.1, 0.2, 0.4]
    assert fleet.child("alpha").restarts == 4
    assert fleet.agent.moves("alpha")[:4] == ["STARTING", "EXITED", "BACKOFF", "STARTING"]


def test_the_delay_stops_growing_at_backoff_max(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES]}, restart_budget=100, restart_window=1000)
    fleet.run_until(lambda: len(fleet.host.of("alpha")) == 10, within=60)
    starts = fleet.starts("alpha")
    delays = [round(b - a - CRASHES.exit_after, 3) for a, b in zip(starts, starts[1:])]
    assert delays[-3:] == [1.0, 1.0, 1.0] and max(delays) == 1.0


def test_spending_the_restart_budget_within_the_window_is_fatal_until_the_cooldown(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES] * 4 + [RUNS]})
    fleet.run_until(lambda: fleet.state("alpha") is State.FATAL, within=10)
    assert len(fleet.host.of("alpha")) == 4 and fleet.child("alpha").restarts == 3
    fatal = [message for bot, kind, message, _, to in fleet.agent.events if kind == "state" and to is State.FATAL]
    assert fatal == ["3 restarts within 30 s; retrying in 600 s or on bot_start"]
    fleet.run_for(599)
    assert fleet.state("alpha") is State.FATAL and len(fleet.host.of("alpha")) == 4, "FATAL waits for the cooldown"
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=2)
    assert len(fleet.host.of("alpha")) == 5


def test_restarts_spread_wider_than_the_window_never_spend_the_budget(tmp_path):
    slow_crash = Script(ready_after=0.01, exit_after=12.0)   # up 12 s, past stable_after, then down
    fleet = Fleet(tmp_path, scripts={"alpha": [slow_crash]}, restart_window=20, stable_after=10)
    fleet.run_for(120)
    assert fleet.state("alpha") is not State.FATAL
    assert fleet.child("alpha").restarts >= 8
    starts = fleet.starts("alpha")
    assert all(round(b - a - 12.0, 3) == 0.05 for a, b in zip(starts, starts[1:])), "stable runs reset the backoff"


def test_a_bot_that_stayed_up_past_stable_after_restarts_from_the_first_delay_again(tmp_path):
    up_then_down = Script(ready_after=0.01, exit_after=15.0)
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES, CRASHES, up_then_down, CRASHES, RUNS]}, restart_budget=10)
    fleet.run_until(lambda: len(fleet.host.of("alpha")) == 5, within=60)
    starts = fleet.starts("alpha")
    gaps = [round(b - a, 3) for a, b in zip(starts, starts[1:])]
    assert gaps[:2] == [0.07, 0.12]             # crash at 0.02 s, then 0.05 s and 0.1 s of backoff
    assert gaps[2] == 15.05                     # up for 15 s (> stable_after): back to 0.05 s
    assert gaps[3] == 0.12                      # and doubling again from there


def test_bot_start_takes_a_fatal_bot_out_at_once_with_a_fresh_budget(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES] * 4 + [RUNS]})
    fleet.run_until(lambda: fleet.state("alpha") is State.FATAL, within=10)
    replies = fleet.request(command="bot_start", name="alpha")
    fleet.run_until(lambda: replies, within=5)
    assert replies[0]["status"] == "ok" and replies[0]["bot"]["state"] == "RUNNING"
    assert not fleet.child("alpha").recent_restarts and fleet.child("alpha").backoff.failures == 0


def test_a_rejected_token_is_fatal_at_once_and_never_retried_by_itself(tmp_path):
    rejected = Script(ready_after=None, exit_after=0.02, exit_code=EXIT_TOKEN_REJECTED)
    fleet = Fleet(tmp_path, bots=("alpha", "beta"), scripts={"beta": [rejected]})
    fleet.run_until(lambda: fleet.state("beta") is State.FATAL, within=5)
    fleet.run_for(10_000)
    assert len(fleet.host.of("beta")) == 1 and fleet.child("beta").restarts == 0
    assert "token rejected" in fleet.child("beta").last_error
    assert fleet.state("alpha") is State.RUNNING and len(fleet.host.of("alpha")) == 1


def test_a_bot_without_its_token_is_fatal_without_a_process_and_the_others_run(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha", "beta"), env={"ALPHA_TOKEN": TOKENS["alpha"]})
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=5)
    assert fleet.state("beta") is State.FATAL and fleet.host.of("beta") == []
    assert "environment variable BETA_TOKEN is not set" in fleet.child("beta").last_error
    replies = fleet.request(command="bot_start", name="beta")
    assert replies and replies[0]["status"] == "error" and "BETA_TOKEN is not set" in replies[0]["reason"]
    fleet.run_for(10_000)
    assert fleet.host.of("beta") == []


def test_a_bot_whose_heartbeats_stop_is_killed_after_heartbeat_timeout_and_restarted(tmp_path, caplog):
    hangs = Script(ready_after=0.01, hang_after=1.0)
    fleet = Fleet(tmp_path, scripts={"alpha": [hangs, RUNS]})
    with caplog.at_level(logging.WARNING, logger="dims.supervisor"):
        fleet.run_until(lambda: len(fleet.host.of("alpha")) == 2, within=10)
    first = fleet.host.of("alpha")[0]
    assert first.signals == [signal.SIGKILL]
    last_heartbeat = first.started + 0.01 + 0.5   # one heartbeat, then silence
    killed_at = fleet.host.of("alpha")[1].started - 0.05
    assert killed_at - last_heartbeat == pytest.approx(3.0, abs=0.01)
    assert "no heartbeat for" in caplog.text and "killing it (hung)" in caplog.text
    assert "killed by SIGKILL (no heartbeat for" in fleet.child("alpha").last_error
    assert "perhaps out of memory" not in caplog.text and "not sent by DIMS" not in caplog.text


def test_a_bot_never_ready_is_killed_after_start_timeout(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [Script(ready_after=None), RUNS]}, start_timeout=10)
    fleet.run_until(lambda: len(fleet.host.of("alpha")) == 2, within=20)
    first, second = fleet.host.of("alpha")
    assert first.signals == [signal.SIGKILL]
    assert second.started - first.started == pytest.approx(10.05, abs=0.01)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)


def test_a_start_waiting_for_the_database_is_not_hung_and_bot_start_hears_why_at_once(tmp_path):
    waits = Script(ready_after=25, waiting="waiting for the database to start: connection refused (for 1 s)")
    fleet = Fleet(tmp_path, scripts={"alpha": [RUNS, waits]}, start_timeout=10)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)
    replies = fleet.request(command="bot_restart", name="alpha", timeout=30)
    fleet.run_until(lambda: replies, within=2)   # at its first heartbeat, not at the request's deadline
    assert replies[0]["status"] == "error" and replies[0]["bot"]["state"] == "STARTING"
    assert "bot alpha is STARTING: waiting for the database to start" in replies[0]["reason"]
    assert "waiting for the database" in replies[0]["bot"]["problem"]
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=30)   # past start_timeout twice
    assert len(fleet.host.of("alpha")) == 2 and fleet.host.latest("alpha").signals == []
    assert fleet.child("alpha").restarts == 0


def test_stop_is_a_message_then_sigterm_at_70_percent_then_sigkill_at_the_deadline(tmp_path):
    stubborn = Script(obeys_stop=False, obeys_term=False)
    fleet = Fleet(tmp_path, scripts={"alpha": [stubborn]}, stop_timeout=10)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)
    asked_at = fleet.host.now
    replies = fleet.request(command="bot_stop", name="alpha")
    fleet.run_until(lambda: replies, within=20)
    process = fleet.host.latest("alpha")
    assert [m.kind.value for m in process.messages] == ["stop"]
    assert process.signals == [signal.SIGTERM, signal.SIGKILL]
    assert [round(at - asked_at, 3) for at in process.signalled_at] == [7.0, 10.0]
    assert fleet.host.now - asked_at == pytest.approx(10.0, abs=0.01)
    assert replies[0]["status"] == "ok" and replies[0]["bot"]["state"] == "STOPPED"
    assert fleet.agent.saved == [("alpha", False)]


def test_stopping_twice_is_harmless_and_a_stopped_bot_stays_stopped(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [Script(obeys_stop=False, obeys_term=False)]}, stop_timeout=10)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)
    asked_at = fleet.host.now
    first = fleet.request(command="bot_stop", name="alpha")
    fleet.run_for(3)
    second = fleet.request(command="bot_stop", name="alpha")
    fleet.run_until(lambda: first and second, within=20)
    assert [r["status"] for r in first + second] == ["ok", "ok"]
    process = fleet.host.latest("alpha")
    assert [m.kind.value for m in process.messages] == ["stop"], "the second bot_stop sends nothing more"
    assert [round(at - asked_at, 3) for at in process.signalled_at] == [7.0, 10.0], "nor moves the deadline"
    fleet.run_for(1000)
    assert fleet.state("alpha") is State.STOPPED and len(fleet.host.of("alpha")) == 1


def test_an_operator_restart_is_not_counted_as_a_restart_after_a_crash(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES, RUNS]})
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=5)
    replies = fleet.request(command="bot_restart", name="alpha")
    fleet.run_until(lambda: replies, within=10)
    row = fleet.request(command="bot_list")[0]["bots"][0]
    assert (row["restarts"], row["operator_restarts"]) == (1, 1)
    assert len(fleet.host.of("alpha")) == 3


def test_a_bot_an_operator_stopped_is_left_stopped_at_start(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha", "beta"), desired={"beta": "stopped"})
    fleet.run_for(5)
    assert fleet.state("beta") is State.STOPPED and fleet.host.of("beta") == []
    assert fleet.state("alpha") is State.RUNNING


def test_a_bot_process_is_handed_only_its_own_bot_and_token(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha", "beta"))
    fleet.run_for(1)
    target, bot_config, config, pool_max, log_level = fleet.host.latest("alpha").args
    assert target is child_main and bot_config.name == "alpha"
    assert [b.name for b in config.bots] == ["alpha"]
    assert TOKENS["beta"] not in config.secrets() and TOKENS["alpha"] in config.secrets()
    assert config.database == fleet.config.database and config.telegram == fleet.config.telegram


def test_a_request_not_satisfied_in_time_says_what_state_the_bot_is_in(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [RUNS, Script(ready_after=None)]}, start_timeout=60)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)
    replies = fleet.request(command="bot_restart", name="alpha", timeout=5)
    fleet.run_until(lambda: replies, within=10)
    assert replies[0]["status"] == "error"
    assert "bot alpha is STARTING after waiting; it did not reach RUNNING" in replies[0]["reason"]


def test_a_signal_stops_every_bot_and_then_the_loop_is_finished(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha", "beta"))
    fleet.run_until(lambda: fleet.state("beta") is State.RUNNING, within=1)
    fleet.sup.notify_signal(signal.SIGTERM)
    fleet.run_until(lambda: fleet.sup.finished, within=10)
    assert {fleet.state("alpha"), fleet.state("beta")} == {State.STOPPED}
    assert fleet.child("alpha").wanted, "a supervisor stop is not an operator's bot_stop"


def test_a_crash_is_a_warning_and_fatal_an_error_with_the_reason(tmp_path, caplog):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES]})
    with caplog.at_level(logging.INFO, logger="dims.supervisor"):
        fleet.run_until(lambda: fleet.state("alpha") is State.FATAL, within=10)
    levels = {}
    for record in caplog.records:
        for move in ("-> EXITED", "-> BACKOFF", "-> FATAL", "-> STARTING"):
            if move in record.getMessage():
                levels.setdefault(move, set()).add(record.levelname)
    assert levels == {"-> EXITED": {"WARNING"}, "-> BACKOFF": {"WARNING"}, "-> FATAL": {"ERROR"},
                      "-> STARTING": {"INFO"}}
    fatal = next(r.getMessage() for r in caplog.records if "-> FATAL" in r.getMessage())
    assert "3 restarts within 30 s" in fatal
    assert "exit status 1" in next(r.getMessage() for r in caplog.records if "-> EXITED" in r.getMessage())


@pytest.mark.parametrize("oom_killed, expected, unexpected", [
    (True, "killed by SIGKILL; perhaps out of memory?", "not sent by DIMS"),
    (False, "killed by SIGKILL (not sent by DIMS)", "out of memory"),
])
def test_a_sigkill_dims_did_not_send_names_the_oom_killer_when_it_acted(tmp_path, caplog, oom_killed, expected,
                                                                      unexpected):
    fleet = Fleet(tmp_path)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)
    if oom_killed:
        fleet.host.oom += 1
    process = fleet.host.latest("alpha")
    process.exitcode = -signal.SIGKILL   # killed from outside
    with caplog.at_level(logging.WARNING, logger="dims.supervisor"):
        fleet.run_until(lambda: fleet.state("alpha") is State.BACKOFF, within=1)
    exited = next(r for r in caplog.records if "-> EXITED" in r.getMessage())
    assert exited.levelname == "WARNING" and expected in exited.getMessage()
    assert unexpected not in exited.getMessage()
    assert expected in fleet.child("alpha").last_error


def test_reload_starts_added_bots_stops_removed_ones_and_restarts_changed_ones(tmp_path):
    tokens = {**TOKENS, "gamma": "7000003:AAFakeTokenForTestsOnly_gamma0000000"}
    fleet = Fleet(tmp_path, bots=("alpha", "beta"), env={})   # no tokens: both FATAL, no process
    write_config(fleet.config.path, ("alpha", "beta"), literal_tokens=tokens)
    assert fleet.sup.reload()["changed"] == ["alpha", "beta"]   # their tokens are in the file now: both start
    fleet.run_until(lambda: fleet.state("beta") is State.RUNNING, within=5)
    alpha_pid = fleet.child("alpha").pid
    write_config(fleet.config.path, ("alpha", "gamma"), literal_tokens=tokens, stop_timeout=5)
    answer = fleet.sup.reload()
    assert (answer["added"], answer["removed"], answer["changed"]) == (["gamma"], ["beta"], [])
    fleet.run_until(lambda: "beta" not in fleet.sup.children and fleet.state("gamma") is State.RUNNING, within=10)
    assert fleet.child("alpha").pid == alpha_pid, "an unchanged bot keeps its process"
    assert len(fleet.host.of("alpha")) == 1 and fleet.child("alpha").restarts == 0


def test_a_reload_whose_fleet_the_database_cannot_hold_is_refused_and_changes_nothing(tmp_path):
    tokens = {**TOKENS, "gamma": "7000003:AAFakeTokenForTestsOnly_gamma0000000"}
    fleet = Fleet(tmp_path, bots=("alpha", "beta"))
    fleet.run_until(lambda: fleet.state("beta") is State.RUNNING, within=1)
    write_config(fleet.config.path, ("alpha", "beta", "gamma"), literal_tokens=tokens)
    fleet.agent.refusal = "the fleet needs up to 18 database connections ..."
    answer = fleet.sup.reload()
    assert answer == {"status": "error", "reason": "configuration not reloaded: the fleet needs up to 18 "
                                                   "database connections ..."}
    assert "gamma" not in fleet.sup.children and fleet.state("alpha") is State.RUNNING
    fleet.agent.refusal = None
    assert fleet.sup.reload()["added"] == ["gamma"] and fleet.agent.fleet == 3


def test_a_process_that_cannot_be_started_is_retried_with_backoff_and_the_supervisor_carries_on(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha", "beta"))
    fleet.run_until(lambda: fleet.state("beta") is State.RUNNING, within=1)
    fleet.host.start_failures = 2
    fleet.host.latest("alpha").exitcode = 1                       # a crash, and then fork fails twice
    fleet.run_until(lambda: len(fleet.host.of("alpha")) == 2 and fleet.state("alpha") is State.RUNNING, within=10)
    failures = [message for bot, kind, message, _, _ in fleet.agent.events if kind == "start_failed"]
    assert failures == ["could not start its process: [Errno 11] Resource temporarily unavailable"] * 2
    starts = [at for at in fleet.starts("alpha")]
    assert fleet.child("alpha").restarts == 1 and starts[1] - starts[0] > 0.05 + 0.1 + 0.2, "each retry backs off"
    assert fleet.state("beta") is State.RUNNING and len(fleet.host.of("beta")) == 1


def test_a_process_that_can_never_be_started_goes_fatal_within_the_budget(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [CRASHES, RUNS]})
    fleet.host.start_failures = 1000                   # after its first crash, no process can be made
    fleet.run_until(lambda: fleet.state("alpha") is State.FATAL, within=60)
    assert "could not start its process" in fleet.child("alpha").last_error
    fleet.host.start_failures = 0
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=601)   # after the cooldown


def test_a_bot_start_while_the_supervisor_stops_is_refused_and_the_stop_finishes(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha", "beta"))
    fleet.run_until(lambda: fleet.state("beta") is State.RUNNING, within=1)
    fleet.sup.notify_signal(signal.SIGTERM)
    fleet.run_until(lambda: fleet.state("alpha") is State.STOPPED, within=10)
    refused = fleet.request(command="bot_start", name="alpha")
    assert refused[0]["status"] == "error" and "stopping" in refused[0]["reason"]
    assert fleet.sup.reload()["status"] == "error"
    fleet.run_until(lambda: fleet.sup.finished, within=10)
    assert fleet.state("alpha") is State.STOPPED and len(fleet.host.of("alpha")) == 1


def test_a_second_sigterm_kills_what_is_still_stopping(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [Script(obeys_stop=False, obeys_term=False)]}, stop_timeout=60)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=1)
    fleet.sup.notify_signal(signal.SIGTERM)
    fleet.run_for(1)
    fleet.sup.notify_signal(signal.SIGTERM)
    fleet.run_until(lambda: fleet.sup.finished, within=1)
    assert fleet.host.latest("alpha").signals == [signal.SIGKILL]


def test_a_hung_bot_that_still_answers_stats_requests_is_killed_all_the_same(tmp_path):
    hangs = Script(ready_after=0.01, hang_after=1.0)
    fleet = Fleet(tmp_path, scripts={"alpha": [hangs, RUNS]})
    for _ in range(10):                                # a monitor asking every second
        fleet.request(command="cache_stats")
        fleet.run_for(1)
    assert fleet.host.of("alpha")[0].signals == [signal.SIGKILL]
    assert len(fleet.host.of("alpha")) == 2


def test_a_removed_bot_being_stopped_cannot_be_started_again_and_leaves_no_orphan(tmp_path):
    tokens = dict(TOKENS)
    stubborn = Script(obeys_stop=False, obeys_term=True)
    fleet = Fleet(tmp_path, bots=("alpha", "beta"), scripts={"beta": [stubborn, RUNS]}, stop_timeout=10)
    fleet.run_until(lambda: fleet.state("beta") is State.RUNNING, within=1)
    write_config(fleet.config.path, ("alpha",), literal_tokens=tokens, stop_timeout=10)
    fleet.sup.reload()
    assert fleet.state("beta") is State.STOPPING
    refused = fleet.request(command="bot_restart", name="beta")
    assert refused[0]["status"] == "error" and "being removed" in refused[0]["reason"]
    write_config(fleet.config.path, ("alpha", "beta"), literal_tokens=tokens, stop_timeout=10)
    answer = fleet.sup.reload()                       # configured again while it still stops
    assert answer["status"] == "ok" and "beta" not in answer["added"]
    fleet.run_until(lambda: len(fleet.host.of("beta")) == 2 and fleet.state("beta") is State.RUNNING, within=20)
    first, second = fleet.host.of("beta")
    assert first.exitcode is not None, "the old process is gone before the new one runs"
    assert fleet.child("beta").process is second


def test_bots_that_die_with_their_forkserver_restart_at_once_without_spending_the_budget(tmp_path):
    with_forkserver = Script(ready_after=0.01, exit_after=0.5, exit_code=255)
    fleet = Fleet(tmp_path, scripts={"alpha": [with_forkserver] * 6 + [RUNS]})
    fleet.host.dead_forkservers = {fleet.host.forkserver_pid}
    fleet.run_until(lambda: len(fleet.host.of("alpha")) == 7 and fleet.state("alpha") is State.RUNNING, within=10)
    starts = fleet.starts("alpha")
    delays = [round(b - a - 0.5, 3) for a, b in zip(starts, starts[1:])]
    assert delays == [0.05] * 6, "no backoff growth for a death that was not the bot's"
    assert State.FATAL.value not in fleet.agent.moves("alpha"), "six deaths in 30 s, budget 3: not spent"
    assert "stopped with its forkserver, which died" in fleet.child("alpha").last_error


def test_a_bot_dying_with_exit_status_255_while_its_forkserver_lives_is_a_crash(tmp_path):
    fleet = Fleet(tmp_path, scripts={"alpha": [Script(ready_after=None, exit_after=0.02, exit_code=255)]})
    fleet.run_until(lambda: fleet.state("alpha") is State.FATAL, within=10)
    assert "exit status 255" in fleet.child("alpha").last_error


def test_a_stop_while_the_process_is_being_started_stops_it_once_started(tmp_path):
    fleet = Fleet(tmp_path, bots=("alpha",))
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING, within=2)
    # a start that the host finishes later: hold the next spawn
    held = []
    real_spawn = fleet.host.spawn
    fleet.host.spawn = lambda *a: held.append(a) or Pending()
    replies = fleet.request(command="bot_restart", name="alpha")
    fleet.run_until(lambda: fleet.state("alpha") is State.STARTING and held, within=5)
    assert fleet.child("alpha").pid is None
    fleet.request(command="bot_stop", name="alpha")
    assert fleet.state("alpha") is State.STOPPING
    job = real_spawn(*held[0])
    fleet.child("alpha").spawn = job   # the host finishes the start now
    fleet.run_until(lambda: fleet.state("alpha") is State.STOPPED, within=5)
    assert [m.kind.value for m in fleet.host.latest("alpha").messages] == ["stop"]
    assert replies is not None



def test_inbox_wake_reaches_the_named_running_bot_alone_and_starts_or_hurries_no_other(tmp_path):
    never_ready = Script(ready_after=None)
    fleet = Fleet(tmp_path, bots=("alpha", "beta"), scripts={"beta": [CRASHES, never_ready]}, start_timeout=60)
    fleet.run_until(lambda: fleet.state("alpha") is State.RUNNING and fleet.state("beta") is State.BACKOFF, within=5)
    (woken,) = fleet.request(command="inbox_wake", name="alpha")      # answered at once: no reply is awaited
    assert (woken["status"], woken["woken"], woken["bot"]["name"], woken["bot"]["state"]) == (
        "ok", True, "alpha", "RUNNING")
    assert [m.kind for m in fleet.host.latest("alpha").messages] == [Kind.WAKE]

    (backoff,) = fleet.request(command="inbox_wake", name="beta")     # crashed, waiting to restart
    assert (backoff["status"], backoff["woken"], backoff["bot"]["state"]) == ("ok", False, "BACKOFF")
    assert fleet.state("beta") is State.BACKOFF and len(fleet.host.of("beta")) == 1, "no restart sooner"
    fleet.run_until(lambda: fleet.state("beta") is State.STARTING, within=5)
    (starting,) = fleet.request(command="inbox_wake", name="beta")    # a pipe, but not ready: its start handles them
    assert (starting["woken"], starting["bot"]["state"]) == (False, "STARTING")
    stopped = fleet.request(command="bot_stop", name="beta")
    fleet.run_until(lambda: stopped, within=5)
    (asleep,) = fleet.request(command="inbox_wake", name="beta")
    assert (asleep["woken"], asleep["bot"]["state"]) == (False, "STOPPED")
    fleet.run_for(10)
    assert fleet.state("beta") is State.STOPPED and len(fleet.host.of("beta")) == 2, "a wake starts nothing"
    assert [m.kind for p in fleet.host.of("beta") for m in p.messages] == [Kind.STOP], "and beta was never woken"

    fleet.host.latest("alpha").conn.closed = True                     # its pipe broke: it cannot be told
    (unreachable,) = fleet.request(command="inbox_wake", name="alpha")
    assert (unreachable["status"], unreachable["woken"]) == ("ok", False)
    (unknown,) = fleet.request(command="inbox_wake", name="gamma")
    assert unknown["status"] == "error" and unknown["code"] == 2 and "'gamma' is not configured" in unknown["reason"]
    assert [m.kind for m in fleet.host.latest("alpha").messages] == [Kind.WAKE], "only the first wake got through"

class Pending:
    """A Spawn the host has not finished."""
    done = False
    forkserver_pid = None
