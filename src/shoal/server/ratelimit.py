"""A token bucket per API key (per client address without one): `rate` requests a minute, `burst` at once."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from shoal.errors import RateLimited

#: Buckets kept at most; the least recently used are forgotten (they come back full), so a flood of client
#: addresses cannot grow memory without bound.
MAX_KEYS = 10_000


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, max_keys: int = MAX_KEYS, clock=time.monotonic):
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, when)
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Spend one token of `key`'s bucket, or raise RateLimited with the seconds until one is back."""
        now = self.clock()
        with self._lock:
            tokens, when = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimited(f"rate limit of {self.rate * 60:g} requests a minute exceeded; retry in "
                                  f"{wait:.1f} s", retry_after=wait)
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
