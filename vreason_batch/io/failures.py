"""Storage's failure policy: the StorageError types callers catch, and retries of transient errors.

Transient errors (throttling, 5xx, connection resets, timeouts) are retried with exponential
backoff and jitter by `retry`; anything else (missing key, access denied) is raised at once as a
`StorageError` subclass. storage.py re-exports all of it; s3.py and localfs.py raise these types.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

import botocore.exceptions

# The storage layer's logger: retry warnings are logged (and filtered) as storage's.
log = logging.getLogger("vreason_batch.io.storage")

T = TypeVar("T")


class StorageError(OSError):
    """A storage operation that failed for a reason retrying will not fix."""


class NotFound(StorageError, FileNotFoundError):
    """The file, object or bucket does not exist."""


class AccessDenied(StorageError, PermissionError):
    """The credentials in use may not do this (HTTP 403)."""


class AlreadyExists(StorageError, FileExistsError):
    """A create-if-absent write found the file or object already there."""


# Error codes S3 (and S3-compatible stores) return for overload / server trouble.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_HTTP_STATUS = frozenset({429, 500, 502, 503, 504})
# pyarrow's S3 filesystem raises OSError("AWS Error <TYPE> during <op> operation: ...").
_PYARROW_TRANSIENT_MARKERS = (
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_LIMIT_EXCEEDED",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
    "NETWORK_CONNECTION",
    "REQUEST_TIMEOUT",
    "HTTP status 500",
    "HTTP status 503",
    "Connection reset",
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: throttling, 5xx, dropped connections and timeouts."""
    if isinstance(exc, StorageError):
        return False
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return err.get("Code") in TRANSIENT_ERROR_CODES or status in TRANSIENT_HTTP_STATUS
    if isinstance(
        exc,
        (
            botocore.exceptions.ConnectionError,  # endpoint unreachable, connect timeout
            botocore.exceptions.HTTPClientError,  # connection closed, read timeout, body stream broke
            botocore.exceptions.IncompleteReadError,
        ),
    ):
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)):  # builtins: reset, aborted, refused, broken pipe
        return True
    if isinstance(exc, OSError) and "AWS Error" in str(exc):
        return any(marker in str(exc) for marker in _PYARROW_TRANSIENT_MARKERS)
    return False


def backoff_delay_s(attempt: int, base_delay_s: float, max_delay_s: float) -> float:
    """Delay before retry number `attempt` (0-based): exponential, capped, with "equal jitter".

    Half the delay is fixed and half random, so many workers throttled at once spread out
    without any of them hammering the store again immediately.
    """
    cap = min(max_delay_s, base_delay_s * (2**attempt))
    return cap / 2 + random.uniform(0, cap / 2)


def retry(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay_s: float = 0.5,
    max_delay_s: float = 20.0,
    transient: Callable[[BaseException], bool] = is_transient,
    what: str = "",
    sleep: Callable[[float], Any] | None = None,
) -> T:
    """Call `fn()`; on a transient error wait and call again, up to `attempts` calls in total.

    A non-transient error, or the last transient one, is re-raised unchanged. `sleep` defaults
    to time.sleep (tests pass a recorder).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not transient(exc):
                raise
            delay = backoff_delay_s(attempt, base_delay_s, max_delay_s)
            log.warning(
                "transient storage error%s (attempt %d/%d), retrying in %.2fs: %s",
                f" on {what}" if what else "",
                attempt + 1,
                attempts,
                delay,
                describe(exc),
            )
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")


def retrying(**retry_kwargs: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form of `retry`: `@retrying(attempts=3)`."""

    def decorate(func: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            return retry(lambda: func(*args, **kwargs), **retry_kwargs)

        return wrapper

    return decorate


def describe(exc: BaseException) -> str:
    """A one-line description of an error: the S3 code and status, never request headers."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{err.get('Code')} (HTTP {status}): {err.get('Message', '')}".strip()
    return f"{type(exc).__name__}: {exc}"
