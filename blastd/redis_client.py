"""The one place a Redis client is built from the settings: daemon, CLI and checks alike.

A single server is reached by its URL; a Sentinel service through redis-py's Sentinel, whose
master client asks the sentinels again after a failover; a Cluster through RedisCluster, which
follows MOVED answers and refreshes its slot map. On a Cluster every key that one operation
touches together must share a hash slot (docs/scaling.md): the queue, lease and video keys
hang off the prefix, so the prefix must carry a hash tag, e.g. `{blastd}:`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from blastd.config import Settings
from blastd.errors import ConfigError
from blastd.redis_urls import RedisTarget, parse_redis_url

# What every service holds: commands, pipelines, scripts and pub/sub exist on both.
RedisClient = aioredis.Redis | RedisCluster


@contextlib.asynccontextmanager
async def open_redis(settings: Settings, **options: Any) -> AsyncIterator[RedisClient]:
    """A client for `settings.redis_url`, closed (with its sentinel connections) on exit;
    `options` are redis-py connection keywords, e.g. health_check_interval."""
    target = parse_redis_url(settings.redis_url)
    options = {"socket_timeout": settings.redis_socket_timeout_s, **options}
    if target.kind == "cluster":
        check_cluster_prefixes(settings)
        cluster = _cluster(target, options)
        try:
            yield cluster
        finally:
            await cluster.aclose()
        return
    if target.kind == "single":
        single = aioredis.Redis.from_url(target.url, **options)
        try:
            yield single
        finally:
            await single.aclose()
        return
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # unannotated upstream
        target.nodes, sentinel_kwargs=_sentinel_options(options)
    )
    master = sentinel.master_for(target.service, **_auth(target), db=target.db, **options)
    try:
        yield master
    finally:
        await master.aclose()
        await sentinel.aclose()


def _cluster(target: RedisTarget, options: dict[str, Any]) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        **_auth(target),
        **options,
    )


def _auth(target: RedisTarget) -> dict[str, Any]:
    return {"username": target.username, "password": target.password, "ssl": target.ssl}


def _sentinel_options(options: dict[str, Any]) -> dict[str, Any]:
    # The sentinels are asked with the same timeouts, so a dead one does not stall the search.
    return {key: value for key, value in options.items() if key.startswith("socket_")}


def check_key_layout(settings: Settings) -> None:
    """At start-up (a configuration error, exit 78): on a Cluster the prefixes need tags."""
    if parse_redis_url(settings.redis_url).kind == "cluster":
        check_cluster_prefixes(settings)


def check_cluster_prefixes(settings: Settings) -> None:
    """On a Cluster, the prefixes must hold a hash tag: a queue's BLMOVE, the lease's MULTI
    and the video scripts touch several keys under one prefix, which must share a slot."""
    prefixes = {"BLASTD_REDIS_PREFIX": settings.redis_prefix}
    if settings.video.key_prefix is not None:
        prefixes["BLASTD_VIDEO__KEY_PREFIX"] = settings.video.key_prefix
    for name, prefix in prefixes.items():
        if not has_hash_tag(prefix):
            raise ConfigError(
                f"{name}={prefix!r}: on a Redis Cluster the prefix needs a hash tag, "
                "e.g. '{blastd}:' (see docs/scaling.md)"
            )


def has_hash_tag(prefix: str) -> bool:
    """True when every key that starts with `prefix` hashes by a tag inside it: Redis takes
    the text between the first '{' and the next '}', when that is not empty."""
    opening = prefix.find("{")
    closing = prefix.find("}", opening + 1)
    return opening >= 0 and closing > opening + 1
