"""Where Redis is: one server, a Sentinel-watched master, or a Cluster, read from one URL.

    redis://[[user]:password@]host:port/db          one server (also rediss://, unix://)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]
    redis+cluster://[[user]:password@]host:port[,host:port...]

The password is the data servers' (master and replicas, or cluster nodes); the sentinels are
reached without one. `rediss+sentinel://` and `rediss+cluster://` use TLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

SENTINEL_PORT = 26379
REDIS_PORT = 6379
SINGLE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """The parsed URL: for a single server `url` is handed to redis-py as it is."""

    kind: Literal["single", "sentinel", "cluster"]
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_redis_url(url: str) -> RedisTarget:
    """The target named by `url`; ValueError says what is wrong with it."""
    scheme, _, rest = url.partition("://")
    if not rest:
        raise ValueError("a Redis URL looks like redis://host:6379/0")
    if scheme in SINGLE_SCHEMES:
        return RedisTarget("single", url)
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise ValueError(f"unknown Redis URL scheme {scheme!r}")
    parts = urlsplit(f"redis://{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    default_port = SENTINEL_PORT if kind == "sentinel" else REDIS_PORT
    target = RedisTarget(
        "sentinel" if kind == "sentinel" else "cluster",
        url,
        nodes=_nodes(hosts, default_port),
        username=unquote(username) or None,
        password=unquote(password) or None,
        ssl=base == "rediss",
    )
    path = [p for p in parts.path.split("/") if p]
    if target.kind == "cluster":
        if path not in ([], ["0"]):
            raise ValueError("a Redis Cluster has database 0 only: no path after the nodes")
        return target
    if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a Sentinel URL ends in /service_name or /service_name/db")
    db = int(path[1]) if len(path) == 2 else 0
    return RedisTarget(
        target.kind,
        url,
        target.nodes,
        unquote(path[0]),
        db,
        target.username,
        target.password,
        target.ssl,
    )


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = item.strip(), str(default_port)
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return tuple(nodes)
