"""Retrying whole-object operations on remote stores: which failures are transient
(:func:`is_transient`) and how they are retried (:class:`RetryPolicy`, jittered exponential
backoff)."""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import CheckpointError
from .remote_errors import error_chain, is_unreachable, named_in, remote_errors_as_ours

_T = TypeVar("_T")

#: Retries are logged under the package's name, as they always were.
logger = logging.getLogger("anyckpt.storage")

#: errno values of failures that go away by themselves: throttling and unavailability (s3fs
#: maps S3's SlowDown, ServiceUnavailable and 409 conflicts to EBUSY, InternalError and 500
#: to EREMOTEIO), timeouts and dropped connections. Not a connection that could not be made
#: at all (refused, no route: :data:`UNREACHABLE_ERRNOS`).
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
#: HTTP statuses that are worth another try (request timeout, throttling, server errors).
TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: S3 error codes of the same kind, for errors that carry the code but not the status.
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "OperationAborted"}
)  # fmt: skip
#: Network failures of the clients under s3fs and gcsfs (botocore, aiohttp), by class name so
#: that neither needs importing: timeouts, refused or dropped connections, truncated bodies;
#: and requests' ProxyError, which is how gcsfs reports an HTTP 502 answer.
TRANSIENT_CLASS_NAMES = frozenset(
    {"HTTPClientError", "ReadTimeoutError", "ConnectTimeoutError", "ConnectionClosedError",
     "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError",
     "ClientPayloadError", "IncompleteRead", "ProxyError"}
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of an object store or network that may succeed if the same
    request is made again: timeouts, dropped connections, throttling (HTTP 429, S3 SlowDown)
    and server errors (HTTP 5xx). Everything else is permanent: missing or existing files,
    permissions, a full disk, I/O errors, anyckpt's own errors, and a connection that could
    not be made at all (:func:`is_unreachable`)."""
    permanent = (
        CheckpointError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )
    if isinstance(exc, permanent) or is_unreachable(exc):
        return False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    for error in error_chain(exc):  # the library's error and what it was raised from
        if named_in(error, TRANSIENT_CLASS_NAMES):
            return True
        code = getattr(error, "code", None) or getattr(error, "status", None)
        if isinstance(code, str) and code.isdigit():  # gcsfs's HttpError: the error body's code
            code = int(code)
        if isinstance(code, int) and code in TRANSIENT_HTTP_STATUSES:
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in TRANSIENT_HTTP_STATUSES:
                return True
            if response.get("Error", {}).get("Code") in TRANSIENT_S3_CODES:
                return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How a whole-object operation on a remote filesystem is retried after a transient
    failure (:func:`is_transient`): at most ``attempts`` tries in all, sleeping between them
    for a random time up to ``base_delay * 2**(try - 1)``, capped at ``max_delay`` ("full
    jitter"). Permanent failures are raised at once. Local disk is never retried."""

    attempts: int = 5
    base_delay: float = 0.1
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def run(self, op: Callable[[], _T], what: str, fs: Any = None) -> _T:
        """``op()``, retried; a store that cannot be used at all (no credentials, cannot be
        reached) raises :func:`remote_error`'s error at once. ``fs``: the filesystem, to name
        its endpoint."""
        with remote_errors_as_ours(what, fs):
            return self._run(op, what)

    def _run(self, op: Callable[[], _T], what: str) -> _T:
        attempt = 1
        while True:
            try:
                return op()
            except Exception as exc:  # noqa: PERF203 - the loop is the retry
                if attempt >= self.attempts or not is_transient(exc):
                    raise
                pause = self.delay(attempt)
                logger.warning(
                    "%s failed (%s: %s); retry %d of %d in %.3f s",
                    what,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self.attempts - 1,
                    pause,
                )
                time.sleep(pause)
                attempt += 1


#: The policy new :class:`Storage` objects get.
DEFAULT_RETRY = RetryPolicy()
