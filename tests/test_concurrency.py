"""anyckpt._concurrency.run_concurrently: the first error is raised as itself, with its own
cause and context."""

from __future__ import annotations

import errno

import anyio
import pytest

from anyckpt._concurrency import run_concurrently

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_the_first_error_keeps_its_cause_and_context() -> None:
    """As a client library raises it (fsspec: ``raise FSTimeoutError from aiohttp_error``):
    the caller gets the same error, its cause and context unchanged, not the task group."""
    cause = ConnectionResetError(errno.ECONNRESET, "reset")
    context = KeyError("handled when the error was raised")
    raised: list[BaseException] = []

    async def fails() -> None:
        try:
            raise context
        except KeyError:
            error = TimeoutError("the upload timed out")
            raised.append(error)
            raise error from cause

    async def waits() -> None:
        await anyio.sleep(30)

    with pytest.raises(TimeoutError, match="the upload timed out") as info:
        await run_concurrently([waits, fails])
    assert info.value is raised[0]
    assert info.value.__cause__ is cause
    assert info.value.__context__ is context
    assert info.value.__suppress_context__  # (as ``raise ... from`` left it)


async def test_an_error_without_a_cause_gets_none_chained() -> None:
    async def fails() -> None:
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error") as info:
        await run_concurrently([fails])
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
