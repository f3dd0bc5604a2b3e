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
    redis.exceptions.ConnectionError,  # includes Sentinel's MasterNotFoundError
    redis.exceptions.TimeoutError,
    OSError,
    # A master demoted to replica answers writes with READONLY until the client reconnects.
    redis.exceptions.ReadOnlyError,
    # A Cluster while a master fails over: CLUSTERDOWN (and MASTERDOWN), TRYAGAIN, a slot
    # that no node serves for a moment.
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
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
    asyncpg.InternalClientError,  # also TargetServerAttributeNotMatched: no primary yet
    # A write reached a standby: with a multi-host DSN, a connection made while the primary
    # was away may have landed on a standby that is not promoted yet. The pool's connections
    # are dropped (resources.Db) and the next ones go to whichever host is primary then.
    asyncpg.ReadOnlySQLTransactionError,
    # Two batched writes (outcomes, receipts, intents) that lock the same recipients in
    # different orders: PostgreSQL aborts one of them, which leaves nothing behind, and the
    # same write succeeds when run again. Seen in bench/chaos.py under PostgreSQL restarts.
    asyncpg.exceptions.DeadlockDetectedError,
)


async def on_redis(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a Redis call; an outage surfaces as RedisUnavailableError."""
    try:
        return await fn(*args, **kwargs)
    except REDIS_OUTAGE_ERRORS as exc:
        raise RedisUnavailableError(describe(exc)) from exc
    except redis.exceptions.RedisClusterException as exc:
        if is_cluster_unreachable(exc):
            raise RedisUnavailableError(describe(exc)) from exc
        raise


def is_cluster_unreachable(exc: redis.exceptions.RedisClusterException) -> bool:
    """The Cluster client found no node to ask, or a slot map with holes (a failover under
    way); its other errors (a cross-slot transaction) are bugs and propagate."""
    return isinstance(exc.__cause__, REDIS_OUTAGE_ERRORS) or str(exc).startswith(
        "All slots are not covered"
    )


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
    except redis.exceptions.RedisClusterException as exc:
        if is_cluster_unreachable(exc):
            raise RedisUnavailableError(describe(exc)) from exc
        raise
    except DB_OUTAGE_ERRORS as exc:
        raise PostgresUnavailableError(describe(exc)) from exc


def describe(exc: BaseException) -> str:
    """The error's class, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
