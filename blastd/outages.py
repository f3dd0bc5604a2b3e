"""Which errors of the Redis and asyncpg clients mean "the server is away", translated once.

Everything else from those clients is a bug or a bad request and propagates as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import asyncpg
import redis.exceptions

from blastd.errors import PostgresUnavailableError, RedisUnavailableError, UnavailableError

P = ParamSpec("P")
T = TypeVar("T")

REDIS_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)

# What a PostgreSQL outage or restart looks like to asyncpg: wait and try again, never give up.
DB_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    # A connection cut by a server shutdown in the middle of an operation can be handed out
    # again before the pool notices; its next query fails with "cannot switch to state ...;
    # another operation is in progress" (asyncpg 0.32). Seen in tests/test_outages.py.
    asyncpg.InternalClientError,
)


async def on_redis(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a Redis call; an outage surfaces as RedisUnavailableError."""
    try:
        return await fn(*args, **kwargs)
    except REDIS_OUTAGE_ERRORS as exc:
        raise RedisUnavailableError(describe(exc)) from exc


async def on_postgres(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a ledger call; an outage surfaces as PostgresUnavailableError."""
    try:
        return await fn(*args, **kwargs)
    except DB_OUTAGE_ERRORS as exc:
        raise PostgresUnavailableError(describe(exc)) from exc


async def on_either(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run work that uses Redis and PostgreSQL both; an outage of either surfaces translated."""
    try:
        return await fn(*args, **kwargs)
    except UnavailableError:
        raise
    except REDIS_OUTAGE_ERRORS as exc:
        # OSError is in both tuples: a refused or cut socket is told apart by its client.
        if isinstance(exc, redis.exceptions.RedisError):
            raise RedisUnavailableError(describe(exc)) from exc
        raise UnavailableError(describe(exc)) from exc
    except DB_OUTAGE_ERRORS as exc:
        raise PostgresUnavailableError(describe(exc)) from exc


def describe(exc: BaseException) -> str:
    """The error's class, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
