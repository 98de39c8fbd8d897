"""The Bot API retry rule alone (`telegram_retry.RetryingRateLimiter`), with a fake clock and
fake calls: what is retried, when it gives up, and when it says Telegram is back."""

from __future__ import annotations

import asyncio

import pytest
from telegram.error import BadRequest, NetworkError

from telegram_retry import RetryingRateLimiter, TelegramUnavailable


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def limiter_with(clock: Clock, retry_for: float = 5.0) -> tuple[RetryingRateLimiter, list[str]]:
    limiter = RetryingRateLimiter(overall_max_rate=0, retry_for=retry_for, clock=clock)
    said: list[str] = []

    async def wait(delay: float) -> bool:   # time passes at once
        clock.now += delay
        return False

    limiter.wait = wait
    limiter.failing = lambda reason, backoff: said.append(f"failing: {reason}")
    limiter.recovered = lambda: said.append("recovered")
    return limiter, said


def call(limiter: RetryingRateLimiter, outcomes: list) -> object:
    """One Bot API call whose tries end as `outcomes` says (an exception raised, or a result)."""
    async def callback(*args, **kwargs):
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    return asyncio.run(limiter.process_request(callback, (), {}, "sendMessage", {}, None))


def test_a_transient_failure_is_retried_until_the_call_succeeds_and_then_said_to_be_over():
    limiter, said = limiter_with(Clock())
    assert call(limiter, [NetworkError("Bad Gateway"), NetworkError("Bad Gateway"), {"ok": True}]) == {"ok": True}
    assert said[-1] == "recovered" and len([s for s in said if s.startswith("failing")]) == 2
    assert not limiter.unsettled


def test_the_requests_own_fault_is_not_retried():
    limiter, said = limiter_with(Clock())
    with pytest.raises(BadRequest):
        call(limiter, [BadRequest("Bad Request: message text is empty"), {"ok": True}])
    assert said == []


def test_a_call_that_gives_up_leaves_the_problem_open_until_telegram_answers_again():
    clock = Clock()
    limiter, said = limiter_with(clock, retry_for=2.0)
    with pytest.raises(TelegramUnavailable):
        call(limiter, [NetworkError("Bad Gateway")] * 50)
    assert "recovered" not in said, "a call that gave up is no sign that Telegram is back"
    assert limiter.unsettled   # the bot asks (getMe) rather than wait for its next message
    assert call(limiter, [{"ok": True}]) == {"ok": True}
    assert said[-1] == "recovered" and not limiter.unsettled
