"""Remote stores that cannot be used at all, as anyckpt's errors: missing credentials
(:class:`~anyckpt.errors.StorageAccessError`) and stores that cannot be reached
(:class:`~anyckpt.errors.RemoteUnavailableError`), found in a client library's exception
chain; and the patches that make s3fs and gcsfs give up at once on a connection that cannot
be made, instead of retrying it for seconds to minutes."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import CheckpointError, RemoteUnavailableError, StorageAccessError

#: errno values of a connection that could not be made at all: nothing listens there, or the
#: network has no route to it. Permanent (see :func:`is_unreachable`).
UNREACHABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ECONNREFUSED", "ENETDOWN", "ENETUNREACH", "EHOSTUNREACH", "EHOSTDOWN")
    if hasattr(errno, name)
)
#: The same failures as the clients raise them: botocore (refused, unknown host, no route),
#: aiohttp (gcsfs: refused, DNS failure, TLS handshake refused).
UNREACHABLE_CLASS_NAMES = frozenset(
    {"EndpointConnectionError", "ClientConnectorError", "ProxyConnectionError",
     "ConnectionRefusedError", "gaierror", "RemoteUnavailableError"}
)  # fmt: skip
#: Missing or unusable credentials, as botocore and google-auth raise them.
NO_CREDENTIALS_CLASS_NAMES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
     "NoAuthTokenError", "DefaultCredentialsError", "RefreshError", "TransportError"}
)  # fmt: skip


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during (botocore's or aiohttp's error under the
    filesystem's), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        todo.extend(e for e in (error.__cause__, error.__context__) if e is not None)


def named_in(error: BaseException, names: frozenset[str]) -> bool:
    return any(k.__name__ in names for k in type(error).__mro__)


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a connection that could not be made at
    all: refused, an unknown host, no route to it. Trying again does not help, so it is not
    transient: a store that cannot be reached fails at once (:class:`RemoteUnavailableError`)
    rather than after minutes of retries."""
    for error in error_chain(exc):
        if isinstance(error, RemoteUnavailableError) or named_in(error, UNREACHABLE_CLASS_NAMES):
            return True
        if isinstance(error, OSError) and error.errno in UNREACHABLE_ERRNOS:
            return True
    return False


def _no_credentials(exc: BaseException) -> BaseException | None:
    return next((e for e in error_chain(exc) if named_in(e, NO_CREDENTIALS_CLASS_NAMES)), None)


def endpoint_of(fs: Any) -> str | None:
    """The endpoint a remote filesystem sends its requests to, when it was given one."""
    for value in (
        getattr(fs, "endpoint_url", None),  # s3fs, if given
        (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url"),
        getattr(fs, "_endpoint", None),  # gcsfs
    ):
        if isinstance(value, str) and value:
            return value
    return None


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def remote_error(exc: BaseException, what: str, fs: Any = None) -> CheckpointError | None:
    """The anyckpt error for a remote store that cannot be used at all, or None for other
    failures: no credentials (:class:`~anyckpt.errors.StorageAccessError`), a store that cannot
    be reached (:class:`~anyckpt.errors.RemoteUnavailableError`). ``what`` is the operation
    ("listing s3://bucket/x"); the message is one line: the operation, the cause and a hint."""
    google = any(f"{p}://" in what for p in ("gs", "gcs")) or (
        fs is not None and type(fs).__module__.split(".")[0] == "gcsfs"
    )
    missing = _no_credentials(exc)
    if missing is not None:
        if google:
            hint = (
                "no usable Google credentials: set GOOGLE_APPLICATION_CREDENTIALS or pass "
                "-o token=PATH; for a public bucket, -o token=anon"
            )
        else:
            hint = (
                "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                "AWS_PROFILE, or pass -o key=... -o secret=...; for a public bucket, -o anon=true"
            )
        return StorageAccessError(f"{what}: {first_line(missing)}", hint=hint)
    if is_unreachable(exc):
        cause = next(
            (e for e in error_chain(exc) if not isinstance(e, RemoteUnavailableError)), exc
        )
        endpoint = endpoint_of(fs) if fs is not None else None
        where = f"the endpoint {endpoint}" if endpoint else "the store"
        hint = f"cannot connect to {where}: check the network and -o endpoint_url=..."
        return RemoteUnavailableError(f"{what}: {first_line(cause)}", hint=hint)
    return None


class Unreached(RemoteUnavailableError):
    """Raised inside a client library (gcsfs) for a connection that could not be made, so that
    it is not retried there; :func:`remote_errors_as_ours` rephrases it for the operation."""


@contextmanager
def remote_errors_as_ours(what: str, fs: Any = None) -> Iterator[None]:
    """Raise a remote store's "cannot be used at all" failures as anyckpt's errors
    (:func:`remote_error`); other failures pass unchanged."""
    try:
        yield
    except CheckpointError as exc:
        if not isinstance(exc, Unreached):
            raise
        raise remote_error(exc, what, fs) or exc from exc.__cause__
    except Exception as exc:
        ours = remote_error(exc, what, fs)
        if ours is None:
            raise
        raise ours from exc


def gcsfs_fails_fast(fs: Any) -> None:
    """Make a gcsfs filesystem give up at once on a connection that cannot be made.

    gcsfs retries every aiohttp error six times over about 30 s, a refused connection or an
    unknown host too. This instance's requests go through gcsfs's own retry wrapper as before,
    but a connection that could not be made comes out of it as :class:`Unreached`, which
    gcsfs does not retry (nor log a traceback for); everything else is retried as gcsfs does."""
    if getattr(fs, "_anyckpt_fails_fast", False):
        return
    plain = getattr(type(fs)._request, "__wrapped__", None)
    try:
        from aiohttp import ClientConnectorError
        from gcsfs.retry import retry_request
    except ImportError:  # pragma: no cover - gcsfs without aiohttp
        return
    if plain is None:  # pragma: no cover - a gcsfs without the decorator
        return

    async def request(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await plain(self, *args, **kwargs)
        except ClientConnectorError as exc:
            raise Unreached(first_line(exc)) from exc

    fs._request = retry_request(retries=fs.retries)(request).__get__(fs)
    fs._anyckpt_fails_fast = True
    # gcsfs's default class for gs:// first asks the bucket's layout over gRPC, retrying a
    # connection that fails for 60 s: not this one.
    control_retry = getattr(fs, "_get_retry_config", None)
    if callable(control_retry):

        def retry_config(**kwargs: Any) -> Any:
            policy = control_retry(**kwargs)
            transient = policy._predicate
            return policy.with_predicate(lambda exc: transient(exc) and not _grpc_unreachable(exc))

        fs._get_retry_config = retry_config


def s3fs_fails_fast(fs: Any) -> None:
    """Make an s3fs filesystem give up at once on a connection that cannot be made.

    botocore retries a refused connection or an unknown host up to five times with growing
    pauses (15 s at worst). A handler of its ``needs-retry`` event, on this filesystem's
    session (for clients made later) and client, re-raises such a failure, which ends the
    request there; every other failure is retried as botocore's configuration says."""
    if getattr(fs, "_anyckpt_fails_fast", False):
        return
    try:
        fs.connect()  # makes the session and client; sends nothing
        emitters = [fs.session, fs.s3.meta.events]
    except Exception:  # an asynchronous or unusual instance: leave it as is
        return
    for emitter in emitters:
        emitter.register("needs-retry.s3", _raise_unreachable, unique_id="anyckpt-unreachable")
    fs._anyckpt_fails_fast = True


def _raise_unreachable(caught_exception: BaseException | None = None, **_: Any) -> None:
    """botocore ``needs-retry`` handler: no retry for a connection that could not be made."""
    if caught_exception is not None and is_unreachable(caught_exception):
        raise caught_exception


def _grpc_unreachable(exc: BaseException) -> bool:
    """A gRPC call that failed because no connection could be made (UNAVAILABLE: "failed to
    connect to all addresses", "DNS resolution failed")."""
    text = str(exc).lower()
    return "failed to connect" in text or "dns resolution failed" in text
