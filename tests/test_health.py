"""The fleet's health from what the supervisor and the database report: each rule, as data."""

from __future__ import annotations

from health import bot_health, system_health

ROW = {"name": "alpha", "state": "RUNNING", "heartbeat_age_s": 1.0, "last_error": None, "problem": None,
       "wanted": "running"}
DATABASE = {"latency_ms": 0.3, "migrations": {"pending": 0, "drifted": []},
            "inbox": [{"bot": "alpha", "backlog": 0, "dead": 0, "oldest_dead_age_s": None}]}
FLEET = {"supervisor": {"pid": 1, "uptime_s": 5.0, "socket": "/x"}, "heartbeat_timeout_s": 15, "bots": [ROW]}


def test_a_running_bot_with_a_fresh_heartbeat_and_no_problem_is_ok_with_a_null_reason():
    assert bot_health(ROW, 15) == {"name": "alpha", "state": "RUNNING", "status": "ok", "reason": None}
    assert system_health(FLEET, None, DATABASE)["status"] == "ok"


def test_a_bot_reporting_a_problem_is_degraded_with_it_as_the_reason():
    report = system_health({**FLEET, "bots": [{**ROW, "problem": "database unreachable (for 3 s)"}]}, None, DATABASE)
    assert report["status"] == "degraded" and report["bots"][0]["reason"] == "database unreachable (for 3 s)"
    assert report["problems"] == ["bot alpha: database unreachable (for 3 s)"]


def test_stale_heartbeats_degrade_a_wanted_bot_not_running_is_down_a_stopped_one_is_ok():
    assert bot_health({**ROW, "heartbeat_age_s": 20.0}, 15)["status"] == "degraded"
    assert bot_health({**ROW, "state": "FATAL", "last_error": "exit status 1"}, 15) == {
        "name": "alpha", "state": "FATAL", "status": "down", "reason": "FATAL: exit status 1"}
    assert bot_health({**ROW, "state": "STOPPED", "wanted": "stopped"}, 15)["status"] == "ok"


def test_no_supervisor_or_no_database_is_down():
    assert system_health(None, "the supervisor is not running", DATABASE)["status"] == "down"
    down = system_health(FLEET, None, {"error": "cannot connect"})
    assert down["status"] == "down" and down["bots"][0]["inbox"] is None   # the database could not say


def test_dead_updates_degrade_naming_the_bot_the_count_the_age_and_the_command_until_none_is_left():
    inbox = [{"bot": "alpha", "backlog": 1, "dead": 2, "oldest_dead_age_s": 7260.0},
             {"bot": "gone", "backlog": 0, "dead": 1, "oldest_dead_age_s": 30.0}]   # no longer configured
    dead = system_health(FLEET, None, {**DATABASE, "inbox": inbox})
    assert dead["status"] == "degraded" and dead["database"]["status"] == "ok"
    assert dead["bots"][0]["status"] == "ok", "the bot's process is fine; its dead updates are a problem apart"
    assert dead["bots"][0]["inbox"] == {"pending": 1, "dead": 2, "oldest_dead_age_s": 7260.0}
    assert dead["problems"] == [
        "bot alpha: 2 dead updates in the inbox, the oldest received 2 h ago: inbox_list alpha shows them, "
        "inbox_retry or inbox_discard deals with them",
        "bot gone: 1 dead update in the inbox, the oldest received 30 s ago: inbox_list gone shows them, "
        "inbox_retry or inbox_discard deals with them"]
    pending_only = system_health(FLEET, None, {**DATABASE, "inbox": [{"bot": "alpha", "backlog": 3, "dead": 0,
                                                                      "oldest_dead_age_s": None}]})
    assert pending_only["status"] == "ok" and pending_only["bots"][0]["inbox"] == {
        "pending": 3, "dead": 0, "oldest_dead_age_s": None}
    assert system_health(FLEET, None, {**DATABASE, "inbox": []})["bots"][0]["inbox"] == {
        "pending": 0, "dead": 0, "oldest_dead_age_s": None}
