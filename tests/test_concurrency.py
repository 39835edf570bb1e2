"""anyckpt._concurrency.run_concurrently: the first error is raised as itself, with its own
cause and context."""

from __future__ import annotations

import contextvars
import errno
import os
import threading

import anyio
import anyio.to_thread
import pytest

from anyckpt._concurrency import check_cancelled, run_concurrently, run_in_worker

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


# -- run_in_worker: kept threads for small blocking calls --------------------------------


def _worker_thread(backend: str) -> threading.Thread:
    """The thread a call in a fresh event loop ran on, looked up after the loop ended."""

    async def one() -> int:
        return await run_in_worker(threading.get_ident)

    ident = anyio.run(one, backend=backend)
    assert ident != threading.get_ident()
    return next(t for t in threading.enumerate() if t.ident == ident)


def test_run_in_worker_keeps_its_threads_across_asyncio_event_loops() -> None:
    """Under asyncio the worker outlives its event loop (anyio's own threads are started
    and joined by each ``anyio.run``), so the next one-shot run starts no thread."""
    thread = _worker_thread("asyncio")
    assert thread.name.startswith("anyckpt-worker")
    assert thread.is_alive()


def test_run_in_worker_runs_off_the_loop_thread_under_trio() -> None:
    assert not _worker_thread("trio").name.startswith("anyckpt-worker")


@pytest.mark.anyio
async def test_run_in_worker_returns_and_raises_as_the_call_does() -> None:
    assert await run_in_worker(divmod, 7, 2) == (3, 1)
    with pytest.raises(ZeroDivisionError):
        await run_in_worker(divmod, 1, 0)


_REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_in_worker_runs_in_the_callers_context(backend: str) -> None:
    """Context variables set by the caller are seen by the call, as with
    ``anyio.to_thread.run_sync``; what the call sets stays in its copy."""

    def read_and_set() -> str:
        seen = _REQUEST.get()
        _REQUEST.set("set by the worker")
        return seen

    async def main() -> tuple[str, str]:
        _REQUEST.set("request-42")
        seen = await run_in_worker(read_and_set)
        return seen, _REQUEST.get()

    assert anyio.run(main, backend=backend) == ("request-42", "request-42")


@pytest.mark.anyio
async def test_a_cancelled_caller_waits_for_the_worker_to_finish() -> None:
    """As ``anyio.to_thread.run_sync`` (not abandoned): the call's effects are complete when
    the cancellation reaches the caller, and the cancellation does reach it."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)
        finished.set()

    scope = anyio.CancelScope()
    caught: list[bool] = []

    async def caller() -> None:
        with scope:
            await run_in_worker(work)
            pytest.fail("the cancellation did not reach the caller")  # pragma: no cover
        caught.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        await anyio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        await anyio.sleep(0.05)
        assert not caught  # the caller still waits: the work is not done
        assert not finished.is_set()
        release.set()
    assert caught == [True]
    assert finished.is_set()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_run_in_worker_works_in_a_forked_child() -> None:
    """The parent's kept threads do not exist in a child: it starts its own (a pool copied
    with idle threads it does not have would never run the call)."""

    async def double(x: int) -> int:
        return await run_in_worker(lambda: 2 * x)

    assert anyio.run(double, 1) == 2  # the parent's pool exists, its thread idle
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if anyio.run(double, 21) == 42 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_check_cancelled_is_a_no_op_outside_anyio_threads() -> None:
    check_cancelled()  # the main thread, no event loop
    errors: list[BaseException] = []

    def plain() -> None:
        try:
            check_cancelled()
        except BaseException as exc:  # pragma: no cover - the failure reported below
            errors.append(exc)

    thread = threading.Thread(target=plain)
    thread.start()
    thread.join()
    assert errors == []
