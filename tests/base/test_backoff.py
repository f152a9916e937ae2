"""backoff_seconds: grows from the minimum, stops at the maximum, jitters in the upper half."""

import random

import pytest

from fleetwatch.backoff import backoff_seconds


@pytest.mark.parametrize("retry", range(12))
def test_delay_is_within_half_and_all_of_the_ceiling(retry: int) -> None:
    ceiling_seconds = min(30.0, 0.5 * 2**retry)
    rng = random.Random(retry)
    for _ in range(200):
        assert ceiling_seconds / 2 <= backoff_seconds(retry, 0.5, 30.0, rng) <= ceiling_seconds


def test_first_retry_waits_about_the_minimum_then_the_ceiling_doubles() -> None:
    # A jitter-free rng shows the ceiling itself: uniform(a, b) is a + (b - a) * random().
    class Top(random.Random):
        def random(self) -> float:
            return 1.0

    ceilings = [backoff_seconds(retry, 1.0, 300.0, Top()) for retry in range(11)]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 300.0, 300.0]


def test_never_above_the_maximum_even_after_hours_of_retries() -> None:
    # 2**1100 does not fit a float: a naive minimum * 2**retry raises OverflowError here.
    rng = random.Random(1)
    assert 15.0 <= backoff_seconds(1100, 0.5, 30.0, rng) <= 30.0
    assert 15.0 <= backoff_seconds(10**9, 0.5, 30.0, rng) <= 30.0


def test_a_maximum_below_the_minimum_caps_every_delay() -> None:
    rng = random.Random(2)
    assert all(2.5 <= backoff_seconds(retry, 10.0, 5.0, rng) <= 5.0 for retry in range(5))


def test_jitter_spreads_delays_and_a_seeded_rng_repeats_them() -> None:
    first = [backoff_seconds(6, 0.5, 30.0, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]  # same seed, same delay
    rng = random.Random(7)
    delays = [backoff_seconds(6, 0.5, 30.0, rng) for _ in range(100)]
    assert delays[0] == first[0]
    assert len(set(delays)) == 100  # a fleet failing together does not come back in lockstep
    assert min(delays) < 17.0 and max(delays) > 29.0  # spread over the whole upper half of 30 s
