"""Redis URLs for one server, a Sentinel service and a Cluster, and the Cluster's prefixes."""

from __future__ import annotations

import pytest

from blastd.config import Settings
from blastd.errors import ConfigError
from blastd.redis_client import check_cluster_prefixes, check_key_layout, has_hash_tag
from blastd.redis_urls import RedisTarget, parse_redis_url


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    target = parse_redis_url("redis+sentinel://:s3cret@a:26380,b/blastd/2")
    assert target == RedisTarget(
        "sentinel",
        "redis+sentinel://:s3cret@a:26380,b/blastd/2",
        nodes=(("a", 26380), ("b", 26379)),
        service="blastd",
        db=2,
        password="s3cret",
    )


def test_a_cluster_url_lists_startup_nodes_and_tls_by_scheme() -> None:
    target = parse_redis_url("rediss+cluster://u:p@h1:7000,h2:7001")
    assert (target.kind, target.nodes, target.username, target.ssl) == (
        "cluster",
        (("h1", 7000), ("h2", 7001)),
        "u",
        True,
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://a:26379",  # no service
        "redis+sentinel://a:26379/svc/x",  # db not a number
        "redis+cluster://a:7000/3",  # a cluster has database 0 only
        "redis+cluster://a:port",
        "memcached://a:1",
    ],
)
def test_a_bad_url_is_refused_by_the_settings(url: str) -> None:
    with pytest.raises(ValueError, match="redis_url"):
        Settings(redis_url=url)


def test_a_single_server_url_goes_to_redis_py_as_it_is() -> None:
    assert parse_redis_url("redis://h:6379/1").kind == "single"


def test_on_a_cluster_the_prefixes_need_a_hash_tag() -> None:
    assert has_hash_tag("{blastd}:")
    assert not has_hash_tag("blastd:")
    assert not has_hash_tag("{}blastd:")
    with pytest.raises(ConfigError, match="BLASTD_REDIS_PREFIX"):
        check_cluster_prefixes(Settings(redis_prefix="blastd:"))
    with pytest.raises(ConfigError, match="BLASTD_VIDEO__KEY_PREFIX"):
        check_cluster_prefixes(Settings(redis_prefix="{b}:", video={"key_prefix": ""}))
    check_cluster_prefixes(Settings(redis_prefix="{b}:", video={"key_prefix": "{v}:"}))


def test_only_a_cluster_url_asks_for_tagged_prefixes() -> None:
    check_key_layout(Settings(redis_url="redis+sentinel://s:26379/blastd"))
    with pytest.raises(ConfigError, match="hash tag"):
        check_key_layout(Settings(redis_url="redis+cluster://n:6379"))
