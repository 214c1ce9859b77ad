"""The retry policy: which calls may be repeated, after which errors, and how long to wait.

One home for the rules (see the API notes):

* reads (get, list) and cancel are safe to repeat: retried on 429, 5xx and transport failures;
* a create is retried on 429 only (a throttled create created nothing). A create that timed out,
  lost its connection or got a 5xx may have created a prediction: it is never repeated here and
  surfaces as `AmbiguousCreateError`;
* a download is retried on transport failures, 5xx and truncated bodies;
* 401, 402, 404 and 422 are never retried.

The wait before attempt ``n`` is exponential with full jitter, capped, and never shorter than
what the server asked for (``Retry-After`` / ``retry_after``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from kontext.errors import (
    IncompleteDownloadError,
    ServerError,
    ThrottledError,
    TransportError,
)

CallKind = Literal["create", "read", "cancel", "download"]

_RETRYABLE: dict[CallKind, tuple[type[BaseException], ...]] = {
    "create": (ThrottledError,),
    "read": (ThrottledError, ServerError, TransportError),
    "cancel": (ThrottledError, ServerError, TransportError),
    "download": (ServerError, TransportError, IncompleteDownloadError),
}


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how patiently the client repeats a failed call.

    Attributes:
        max_attempts: Attempts per call, the first included.
        max_throttled_attempts: Attempts for a create that keeps getting 429 (a low-credit account
            can be throttled to a few creates a minute; giving up early would fail whole batches).
        base_delay: First backoff step in seconds.
        max_delay: Cap on one backoff step (a server-requested wait may exceed it).
        rng: Source of jitter (seedable for tests).
    """

    max_attempts: int = 5
    max_throttled_attempts: int = 30
    base_delay: float = 0.5
    max_delay: float = 20.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def should_retry(self, kind: CallKind, exc: BaseException, attempt: int) -> bool:
        """Whether to make attempt ``attempt + 1`` after `exc` ended attempt `attempt`."""
        if not isinstance(exc, _RETRYABLE[kind]):
            return False
        limit = self.max_throttled_attempts if isinstance(exc, ThrottledError) else self.max_attempts
        return attempt < limit

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after attempt `attempt` (1-based) failed with `exc`."""
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        wait = self.rng.uniform(backoff / 2, backoff)
        if isinstance(exc, ThrottledError) and exc.retry_after is not None:
            # Honour the server's wait, plus a little jitter so a crowd does not return at once.
            wait = exc.retry_after + self.rng.uniform(0, min(1.0, self.base_delay))
        return wait


NO_RETRY = RetryPolicy(max_attempts=1, max_throttled_attempts=1)
