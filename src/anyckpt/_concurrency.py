"""Structured concurrency helpers shared by the formats and the manager."""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import anyio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def run_concurrently(calls: Iterable[Callable[[], Coroutine[Any, Any, object]]]) -> None:
    """Run the calls as tasks of one task group and wait for all of them.

    If any fails, the others are cancelled and the first error is raised as itself, not
    wrapped in an exception group, so callers can ``except OSError`` as usual."""
    try:
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
