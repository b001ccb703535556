"""A result that may still have to wait: the one shape of every step on a request path.

A function that serves a request (a memcached command, a quorum read or write, an RPC
handler) returns its result directly when it could make it without waiting, and a
:class:`Pending` when it must wait (for a peer, a lock, room in a socket). The I/O shell that
called it awaits the :class:`Pending` in the task that owns the request. Either way the same
code decides the result, in h11's manner: the protocol state machine never does I/O, it says
what it needs, and the shell does it. A node of one answers most requests at once; a cluster
hands back a pending step; nothing in between is written twice.

A :class:`Pending` must be awaited exactly once, or closed (:meth:`Pending.close`) by whoever
drops it. It never runs anything until it is awaited, so it may be made in one task and
awaited in another.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Generic, ParamSpec, TypeAlias, TypeVar, final

T = TypeVar("T")
U = TypeVar("U")


@final
class Pending(Generic[T]):
    """A result that is not ready yet: await it (once) for the result."""

    __slots__ = ("_awaitable",)

    def __init__(self, awaitable: Awaitable[T]) -> None:
        self._awaitable = awaitable

    def __await__(self) -> Generator[Any, Any, T]:
        return self._awaitable.__await__()

    def close(self) -> None:
        """Drop a step that will never be awaited (say, its connection closed)."""
        if isinstance(self._awaitable, Coroutine):
            self._awaitable.close()

    def __repr__(self) -> str:
        return f"Pending({self._awaitable!r})"


#: What a step returns: its result, or the :class:`Pending` that will produce it.
Step: TypeAlias = T | Pending[T]


def then(step: Step[T], function: Callable[[T], U]) -> Step[U]:
    """``function`` applied to the result of ``step``: at once if ``step`` is ready, else
    once it is (the returned :class:`Pending` awaits ``step`` first)."""
    if isinstance(step, Pending):
        return Pending(_then(step, function))
    return function(step)


async def _then(pending: Pending[T], function: Callable[[T], U]) -> U:
    return function(await pending)


async def resolve(step: Step[T]) -> T:
    """The result of ``step``, awaiting it if it is pending (for code that awaits anyway)."""
    if isinstance(step, Pending):
        return await step
    return step


P = ParamSpec("P")


def waits(function: Callable[P, Awaitable[T]]) -> Callable[P, Pending[T]]:
    """An ``async def`` as a step function that always waits (for handlers that must)."""

    @functools.wraps(function)
    def step(*args: P.args, **kwargs: P.kwargs) -> Pending[T]:
        return Pending(function(*args, **kwargs))

    return step
