"""server/quotas.py: each user's requests per minute and answers generating at once. The
websocket and HTTP tests check the frames and statuses; these check the counting itself."""

from __future__ import annotations

import pytest

from server.errors import RateLimited, TooManyGenerations
from server.quotas import Quotas


async def test_each_user_gets_per_minute_requests_then_a_retry_after():
    quotas = Quotas(per_minute=3, max_concurrent=1)
    for _ in range(3):
        await quotas.hit(1)
    with pytest.raises(RateLimited, match="limit of 3 requests per minute") as refused:
        await quotas.hit(1)
    # The window is a minute long: the first of the three frees up within it.
    assert 1 <= refused.value.retry_after_s <= 60
    assert "RATE_LIMIT_PER_MINUTE" in refused.value.message
    await quotas.hit(2)  # another user has a minute of their own


def test_generation_slots_are_per_user_and_given_back_once():
    quotas = Quotas(per_minute=100, max_concurrent=2)
    first, second = quotas.take_slot(1), quotas.take_slot(1)
    assert quotas.running(1) == 2
    with pytest.raises(TooManyGenerations, match="2 answers being generated") as refused:
        quotas.take_slot(1)
    assert "MAX_CONCURRENT_GENERATIONS" in refused.value.message
    assert quotas.running(1) == 2  # the refusal took nothing
    other = quotas.take_slot(2)  # another user's slots are their own

    first()
    first()  # giving back twice gives back once
    assert quotas.running(1) == 1
    third = quotas.take_slot(1)
    assert quotas.running(1) == 2
    for give_back in (second, third, other):
        give_back()
    assert quotas.running(1) == quotas.running(2) == 0
