"""Per-user limits: requests per minute (the `limits` library) and generations running at once.

Both are checked before anything is stored, so a refused request leaves no trace. The rate limit
lives in `RATE_LIMIT_STORAGE` (in-process memory by default; `async+redis://...` shares it between
replicas). The concurrency count is per process: with several replicas a user may run
MAX_CONCURRENT_GENERATIONS on each.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from .errors import RateLimited, TooManyGenerations


class Quotas:
    def __init__(self, per_minute: int, max_concurrent: int, storage_uri: str = "async+memory://"):
        self.per_minute = per_minute
        self.max_concurrent = max_concurrent
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self._running: Counter[int] = Counter()

    async def hit(self, user_id: int) -> None:
        """Count one request against the user's minute; `RateLimited` when over."""
        key = str(user_id)
        if not await self._limiter.hit(self._item, "user", key):
            stats = await self._limiter.get_window_stats(self._item, "user", key)
            retry = max(1, math.ceil(stats.reset_time - time.time()))
            raise RateLimited(self.per_minute, retry)

    def take_slot(self, user_id: int) -> Callable[[], None]:
        """Take one of the user's generation slots now (`TooManyGenerations` when none is free);
        returns the function that gives it back (calling it again does nothing)."""
        if self._running[user_id] >= self.max_concurrent:
            raise TooManyGenerations(self.max_concurrent)
        self._running[user_id] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            self._running[user_id] -= 1
            if self._running[user_id] <= 0:
                del self._running[user_id]

        return give_back

    def running(self, user_id: int) -> int:
        return self._running[user_id]
