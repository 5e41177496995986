"""Per-user limits: requests per minute (the `limits` library), generations running at once and
websocket connections open at once.

Both are checked before anything is stored, so a refused request leaves no trace. The rate limit
lives in `RATE_LIMIT_STORAGE` (in-process memory by default; `async+redis://...` shares it between
replicas). The concurrency count is per process: with several replicas a user may run
MAX_CONCURRENT_GENERATIONS on each, and MAX_CONNECTIONS_PER_USER websockets.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from limits import RateLimitItemPerMinute
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from .errors import RateLimited, TooManyConnections, TooManyGenerations


class _Places:
    """At most `limit` places per user; taking one returns the function giving it back."""

    def __init__(self, limit: int, refusal: Callable[[int], Exception]):
        self.limit = limit
        self.refusal = refusal
        self.held: Counter[int] = Counter()

    def take(self, user_id: int) -> Callable[[], None]:
        if self.held[user_id] >= self.limit:
            raise self.refusal(self.limit)
        self.held[user_id] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            self.held[user_id] -= 1
            if self.held[user_id] <= 0:
                del self.held[user_id]

        return give_back


class Quotas:
    def __init__(self, per_minute: int, max_concurrent: int, storage_uri: str = "async+memory://",
                 max_connections: int = 16):
        self.per_minute = per_minute
        self.max_concurrent = max_concurrent
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = MovingWindowRateLimiter(storage_from_string(storage_uri))
        self._generations = _Places(max_concurrent, TooManyGenerations)
        self._connections = _Places(max_connections, TooManyConnections)

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
        return self._generations.take(user_id)

    def open_connection(self, user_id: int) -> Callable[[], None]:
        """Count one more websocket of the user's (`TooManyConnections` over the limit);
        returns the function to call when it closes (idempotent)."""
        return self._connections.take(user_id)

    def running(self, user_id: int) -> int:
        return self._generations.held[user_id]
