"""Capped exponential backoff with jitter: the one retry rule of DIMS.

Every wait before trying again uses it: the supervisor's restart delays, a bot's getUpdates and
inbox retries, the database agent waiting out an outage or restarting, the roster listener
reconnecting, the embedded server's start-up lock. A delay doubles from `first` up to `cap`,
each one spread by +-`jitter` so that many waiters do not retry in step; `grew` says whether the
delay just handed out is the first at its level, so a caller logs once per doubling instead of
at every attempt.

Standard library only (no logging, no clock): callers sleep, and the clock and the random source
can be passed in, which is how the supervisor's policy is tested with fakes. Imports nothing of
DIMS; anything may import it.
"""

from __future__ import annotations

import random as _random
from typing import Callable

_MAX_DOUBLINGS = 64   # beyond this 2**n overflows a float long before any cap is reached


class Backoff:
    """`next()` is the delay before the next attempt and counts one failure; `reset()` after a
    success. The first delay is exact when `jitter_first` is false (a first restart at
    `backoff_initial`, not somewhere around it)."""

    def __init__(self, first: float, cap: float, *, jitter: float = 0.2, jitter_first: bool = True,
                 random: Callable[[], float] = _random.random):
        if first <= 0 or cap < first:
            raise ValueError(f"backoff needs 0 < first <= cap, got first={first}, cap={cap}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter is a fraction below 1, got {jitter}")
        self.first, self.cap, self.jitter = first, cap, jitter
        self.jitter_first = jitter_first
        self._random = random
        self.failures = 0          # consecutive, since the last reset
        self.grew = False          # the last next() moved to a higher level (or was the first)
        self.level = 0.0           # the base (before jitter) of the last delay handed out

    def base(self) -> float:
        """The delay before jitter that the next call to `next()` starts from."""
        return min(self.cap, self.first * 2 ** min(self.failures, _MAX_DOUBLINGS))

    def next(self) -> float:
        base = self.base()
        self.grew = base > self.level
        self.level = base
        spread = self.jitter if (self.failures or self.jitter_first) else 0.0
        self.failures += 1
        return base * (1 + spread * (2 * self._random() - 1))

    def reset(self) -> None:
        self.failures = 0
        self.grew = False
        self.level = 0.0

    @property
    def capped(self) -> bool:
        """True once the delays have reached the cap."""
        return self.level >= self.cap
