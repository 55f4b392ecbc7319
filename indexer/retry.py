"""Bounded retries for the Hub calls `huggingface_hub` does not retry itself: `model_info` and our own
range reads (safetensors headers and tensor blocks).

What is retried (everything else is raised at once):
- `RateLimitedError` (429): wait the server's reset time (`RateLimit: "api";r=0;t=N` or `Retry-After: N`)
  plus 1 s, as the client itself does for listings ("+1s to avoid rounding issues"); a reset longer
  than `max_rate_wait` is not waited for: the model is recorded as failed and the next crawl retries it.
- `TransientHubError` (5xx, connection reset, truncated body): exponential backoff 1, 2, 4, 8 s.
After `attempts` tries the last error is raised; the crawl records the model as failed and goes on.
A try that reaches the CDN goes back there with the kept signed URL (no new Hub call); a CDN `403` is not
retried here: `indexer.sources` resolves the file again once, within the same try.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from errors import RateLimitedError, TransientHubError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # the client's own default (`http_backoff(max_retries=5)`)
    base_wait: float = 1.0
    max_wait: float = 8.0
    max_rate_wait: float = 300.0  # the Hub's API window is 300 s ("fixed window";q=500;w=300)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)


def rate_limit_wait(headers: Mapping[str, str]) -> float | None:
    """Seconds until the rate limit resets, from `RateLimit: "api";r=0;t=N` or else `Retry-After: N`."""
    from huggingface_hub.utils import parse_ratelimit_headers

    info = parse_ratelimit_headers(headers)
    if info is not None and info.remaining == 0:
        return float(info.reset_in_seconds)
    for key in sorted(headers):  # the HTTP-date form of Retry-After is not used by the Hub
        if key.lower() == "retry-after" and headers[key].strip().isdigit():
            return float(headers[key].strip())
    return None


def _wait_for(exc: TransientHubError, attempt: int, policy: RetryPolicy) -> float | None:
    """Seconds to sleep before the next try, or None to give up now."""
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        if exc.retry_after > policy.max_rate_wait:
            return None
        return exc.retry_after + 1.0
    return min(policy.max_wait, policy.base_wait * 2 ** (attempt - 1))


def with_retries(call: Callable[[], T], *, what: str, policy: RetryPolicy) -> T:
    """`call()`, retried on transient Hub errors per `policy` (see the module docstring)."""
    attempt = 1
    while True:
        try:
            return call()
        except TransientHubError as exc:
            wait = _wait_for(exc, attempt, policy)
            if attempt >= policy.attempts or wait is None:
                logger.info("%s: giving up after %d attempts (%s)", what, attempt, exc.reason)
                raise
            logger.warning("%s: %s; retry %d/%d in %.1f s", what, exc.reason, attempt, policy.attempts - 1, wait)
            policy.sleep(wait)
            attempt += 1
