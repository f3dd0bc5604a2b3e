"""A campaign on a three-master Redis Cluster: the queue, lease, pacer and dead letters work
when every multi-key operation has to stay within one hash slot."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster

from blastd import ledger, queues
from blastd.embedded import EmbeddedClusterNode, form_cluster
from blastd.shared_pacing import rate_ring_key, rate_state_key
from tests.failover_harness import (
    RunningDaemon,
    admin_port,
    blast,
    figures,
    paced_env,
    wait_done,
)
from tests.harness import ACCOUNT, SandboxHandle, Servers, wait_until

PREFIX = "{blastd}:"  # the hash tag keeps the queue and lease keys on one slot
KEYED_LIST = "producer:recipients:cluster-keyed"
KEYED_NUMBERS = [f"+62816{n:08d}" for n in range(30_000_000, 30_000_012)]


def keyed_blast(job_id: str) -> bytes:
    return orjson.dumps(
        {
            "type": "blast",
            "id": job_id,
            "account": ACCOUNT,
            "message": {"text": "hi"},
            "recipients_key": KEYED_LIST,
        }
    )


@pytest.mark.slow
async def test_campaign_on_a_three_master_cluster(
    servers: Servers, pool: ledger.Pool, sandbox: SandboxHandle, tmp_path: Path
) -> None:
    nodes = [EmbeddedClusterNode(tmp_path / f"node-{n}") for n in range(3)]
    for node in nodes:
        node.start()
    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in nodes])
    try:
        form_cluster(nodes)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes[:2])
        env = paced_env(
            servers, sandbox, admin_port(), BLASTD_REDIS_URL=url, BLASTD_REDIS_PREFIX=PREFIX
        )
        async with RunningDaemon(env, tmp_path / "daemon.log"):
            await client.lpush(queues.jobs_key(PREFIX), blast("cluster"), b"not a job")
            await wait_done(pool, "cluster")
            result = await figures(pool, sandbox, "cluster", None)
            # The producer's list hashes wherever its name puts it: read where it is, in pages.
            await client.rpush(KEYED_LIST, *KEYED_NUMBERS)
            await client.lpush(queues.jobs_key(PREFIX), keyed_blast("cluster-keyed"))
            await wait_done(pool, "cluster-keyed")
            keyed_list_left = await client.exists(KEYED_LIST)
            await wait_until(lambda: client.llen(queues.dead_key(PREFIX)))
            requeued = await queues.requeue_dead(client, PREFIX, 0)  # WATCH/MULTI on a slot
            pacer_slots = {
                client.keyslot(k(PREFIX, ACCOUNT)) for k in (rate_state_key, rate_ring_key)
            }
            pacer_keys = await client.exists(rate_state_key(PREFIX, ACCOUNT))
    finally:
        await client.aclose()
        for node in nodes:
            node.kill()
    print(result.report("campaign on a 3-master cluster"))
    assert (result.lost, result.unflagged_duplicates) == (0, 0)
    keyed = await pool.fetch(
        "SELECT phone, state FROM recipients WHERE campaign_id = 'cluster-keyed'"
    )
    assert sorted((r["phone"], r["state"]) for r in keyed) == [(n, "sent") for n in KEYED_NUMBERS]
    assert keyed_list_left == 0
    assert requeued is not None
    assert requeued.payload() == b"not a job"
    assert len(pacer_slots) == 1  # the pacer script's two keys share the account's slot
    assert pacer_keys == 1  # and the account was paced through the cluster
