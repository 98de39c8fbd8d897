"""The one backoff rule: doubling to a cap, jitter within bounds, a log line per doubling."""

from __future__ import annotations

import pytest

from backoff import Backoff


def test_delays_double_up_to_the_cap_and_reset_starts_again():
    backoff = Backoff(0.1, 1.0, jitter=0.0)
    assert [round(backoff.next(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert backoff.capped and backoff.failures == 6
    backoff.reset()
    assert backoff.next() == 0.1 and not backoff.capped


def test_grew_is_true_once_per_level_so_a_caller_logs_once_per_doubling():
    backoff = Backoff(0.1, 0.4, jitter=0.0)
    grew = []
    for _ in range(8):
        backoff.next()
        grew.append(backoff.grew)
    assert grew == [True, True, True, False, False, False, False, False]


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_jitter_stays_within_its_fraction(draw):
    backoff = Backoff(1.0, 8.0, jitter=0.25, random=lambda: draw)
    for expected in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert expected * 0.75 <= backoff.next() <= expected * 1.25


def test_the_first_delay_is_exact_when_asked_and_later_ones_are_spread():
    backoff = Backoff(0.05, 30.0, jitter=0.25, jitter_first=False, random=lambda: 1.0)
    assert backoff.next() == 0.05
    assert backoff.next() == pytest.approx(0.1 * 1.25)


def test_thousands_of_failures_never_overflow():
    backoff = Backoff(0.1, 5.0, jitter=0.0)
    for _ in range(5000):
        delay = backoff.next()
    assert delay == 5.0


@pytest.mark.parametrize("first, cap, jitter", [(0, 1, 0.1), (2, 1, 0.1), (1, 2, 1.0), (1, 2, -0.1)])
def test_nonsense_settings_are_refused(first, cap, jitter):
    with pytest.raises(ValueError):
        Backoff(first, cap, jitter=jitter)
