"""Waiting out a Telegram blip: every Bot API call a bot makes (but getUpdates) goes through
`RetryingRateLimiter`, which keeps python-telegram-bot's flood limits (`AIORateLimiter`) and
retries a call that failed for a transient cause until it succeeds or a bound is reached.

Transient: a network error (a refused or reset connection, a timeout), a 5xx (python-telegram-
bot raises those as `NetworkError`), a 429 (`RetryAfter`: the whole bot pauses for the time
Telegram asks). Not transient, raised at once: a 400 (`BadRequest`, although python-telegram-bot
derives it from `NetworkError`), 401, 403, 409, any other 4xx (`ClassifyingRequest` raises a
413 or a 414 as `BadRequest` naming its status, where python-telegram-bot would raise it as the
`NetworkError` of a 5xx) and anything else: those are the request's fault and retrying cannot
help. Only the call that failed is retried, so a handler's earlier effects
(a favourite toggled, a profile saved) are not done twice; a call whose answer was lost on the
way back may be delivered twice, which is the price of not losing it.

Delays grow from 0.2 s to a 10 s cap. A call gives up after `retry_for` seconds of failing
(`[telegram] retry_for`, 600 by default: a reply ten minutes late is still worth sending;
Telegram itself keeps updates for 24 hours) with `TelegramUnavailable`. While it waits it calls
the owner's `wait(delay)`, which lets the bot release the slot the call holds (its other chats go
on) and stop early, and reports the failure through `failing(reason, backoff)`; `recovered()`
once Telegram answers a call and no failed call is waiting any more (a call that succeeds
meanwhile does not end the problem of one that still fails, and a call that gives up does not
end it either: the next answer does). A stop asked for meanwhile ends the wait with `RetryInterrupted`.

Called by `bot.build_application` (the limiter, and `ClassifyingRequest` as its HTTP client) and
the bot's runner (`unsettled`: after a call gave up, it asks Telegram with a getMe). Imports
telegram and `backoff`; never the bot, the database layer or the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import time
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from telegram.error import BadRequest, NetworkError, RetryAfter
from telegram.ext import AIORateLimiter
from telegram.request import HTTPXRequest

from backoff import Backoff

RETRY_FIRST_S = 0.2
RETRY_CAP_S = 10.0
DEFAULT_RETRY_FOR_S = 600.0


class TelegramUnavailable(Exception):
    """A Bot API call kept failing for a transient cause for longer than the bound."""


class RetryInterrupted(Exception):
    """The bot was asked to stop while a Bot API call waited to be retried."""


def is_transient(error: BaseException) -> bool:
    """Worth retrying: a network error, a timeout, a 5xx or a 429; not a 400 or any other answer."""
    return isinstance(error, RetryAfter) or (isinstance(error, NetworkError) and not isinstance(error, BadRequest))


# 4xx answers left as python-telegram-bot raises them: 401, 403, 404, 409 and 429 have their own
# error classes; 408 (a proxy tired of a slow request) and 425 (Too Early) are blips, retried.
_LEFT_AS_THEY_ARE = frozenset({401, 403, 404, 408, 409, 425, 429})


class ClassifyingRequest(HTTPXRequest):
    """python-telegram-bot's HTTP client, but a 4xx it has no error class for (413 Request Entity
    Too Large, 414, 422, ...) is raised as `BadRequest`, the request's fault, naming the status,
    instead of as the `NetworkError` it shares with 5xx answers, which would be retried. 408 and
    425 stay `NetworkError`s: retrying is what they ask for."""

    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        code, payload = await super().do_request(*args, **kwargs)
        if 400 < code < 500 and code not in _LEFT_AS_THEY_ARE:
            return HTTPStatus.BAD_REQUEST, _described(code, payload)
        return code, payload


def _described(code: int, payload: bytes) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "HTTP error"
    try:
        description = json.loads(payload).get("description")
    except (ValueError, AttributeError):
        description = None
    text = f"{phrase} ({code})" + (f": {description}" if description and description != phrase else "")
    return json.dumps({"ok": False, "error_code": code, "description": text}).encode()


def seconds(value: Any) -> float:
    """A retry_after (an int, or a timedelta in newer python-telegram-bot) in seconds."""
    return value.totalseconds() if hasattr(value, "total_seconds") else float(value)


async def _sleep(delay: float) -> bool:
    await asyncio.sleep(delay)
    return False


class RetryingRateLimiter(AIORateLimiter):
    """`AIORateLimiter`'s limits, and transient failures waited out up to `retry_for` seconds.

    The owner may set `wait` (an async callable taking the delay, returning True when the bot
    stops), `failing(reason, backoff)` and `recovered()`; by default it just sleeps."""

    def __init__(self, overall_max_rate: float, retry_for: float = DEFAULT_RETRY_FOR_S,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(overall_max_rate=overall_max_rate, max_retries=0)   # 429s are retried here
        self.retry_for = retry_for
        self.clock = clock
        self.wait: Callable[[float], Awaitable[bool]] = _sleep
        self.failing: Callable[[str, Backoff], None] = lambda reason, backoff: None
        self.recovered: Callable[[], None] = lambda: None
        self._paused_until = 0.0    # a 429 pauses every call of this bot until then
        self._failing_calls = 0     # calls now between a transient failure and their end
        self._failed = False        # a transient failure since Telegram last answered

    @property
    def unsettled(self) -> bool:
        """A call failed (and gave up) and no call has been answered since: whether Telegram is
        back is unknown until the next call, which the owner may make (`getMe`) to find out."""
        return self._failed and self._failing_calls == 0

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        backoff = Backoff(RETRY_FIRST_S, RETRY_CAP_S)
        first_failure: float | None = None
        answered = False   # Telegram answered this call (a result, or an error of the request's own)
        try:
            while True:
                pause = self._paused_until - self.clock()
                if pause > 0 and await self.wait(pause):
                    raise RetryInterrupted(f"{endpoint}: stopped while Telegram asked to wait")
                try:
                    result = await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)
                    answered = True
                    return result
                except Exception as exc:
                    if not is_transient(exc):
                        answered = True
                        raise
                    self._failed = True
                    now = self.clock()
                    if first_failure is None:
                        first_failure = now
                        self._failing_calls += 1
                    if now - first_failure >= self.retry_for:
                        raise TelegramUnavailable(f"{endpoint} failed for {now - first_failure:.0f} s "
                                                  f"(the bound is {self.retry_for:g} s): {_describe(exc)}") from exc
                    if isinstance(exc, RetryAfter):
                        delay = seconds(exc.retry_after) + 0.1
                        self._paused_until = max(self._paused_until, now + delay)
                        backoff.next()    # counts the failure, for the doubling of the log
                    else:
                        delay = backoff.next()
                    delay = min(delay, max(0.0, first_failure + self.retry_for - now))   # a last try at the bound
                    self.failing(f"Telegram calls fail ({endpoint}: {_describe(exc)})", backoff)
                    if await self.wait(delay):
                        raise RetryInterrupted(f"{endpoint}: stopped while waiting to retry") from exc
        finally:
            if first_failure is not None:
                self._failing_calls -= 1
            if answered and self._failed and self._failing_calls == 0:
                self._failed = False
                self.recovered()   # Telegram answers, and no call is waiting on it any more


def _describe(error: BaseException) -> str:
    if isinstance(error, RetryAfter):
        return f"429, retry after {seconds(error.retry_after):g} s"
    return f"{type(error).__name__}: {error}"
