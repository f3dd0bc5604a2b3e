"""/metrics: the counters agree with the ledger and the sandbox; the Grafana dashboard uses
only metrics blastd exports.

The registry is the process's, so counters carry what earlier tests in this session counted:
each test compares a scrape after its campaign with one taken before it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from blastd import controls, ledger, metrics
from blastd.embedded import free_port
from tests.harness import (
    ACCOUNT,
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    has_state,
    make_settings,
    numbers_from,
    running_daemon,
    wait_until,
)

JOBS = "blastd:jobs"
DASHBOARD = Path(__file__).parent.parent / "config" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def series_of(samples: Samples, name: str) -> list[Mapping[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


async def test_counters_after_a_campaign_match_the_ledger_and_the_sandbox(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """20 sent, 2 refused for good (131026), 1 failing transiently until its 3 attempts are
    spent, 2 invalid numbers skipped at intake."""
    numbers = numbers_from(41_000_000, 23)
    permanent, transient = numbers[:2], numbers[2]
    await sandbox.configure(
        fail_numbers={**{n.lstrip("+"): 131026 for n in permanent}, transient.lstrip("+"): 131000}
    )
    port = free_port()
    retry = {"retry": {"attempts": 3, "initial_s": 0.001, "max_s": 0.005, "jitter_s": 0}}
    settings = make_settings(servers, sandbox.url, admin_port=port, account=retry)
    async with running_daemon(settings):
        await wait_until(lambda: _answers(port))
        before = await scrape(port)
        await redis.lpush(JOBS, blast_job("scraped", [*numbers, "12", "not a number"]))
        await wait_until(lambda: has_state(pool, "scraped", "done"))
        await wait_until(lambda: _progress_series_gone(port, "scraped"))
        after = await scrape(port)

    counts = await ledger.count_states(pool, "scraped")
    assert counts == {"sent": 20, "failed": 3, "skipped": 2}
    for state, count in counts.items():
        assert delta(before, after, "blastd_recipients_total", account=ACCOUNT, state=state) == (
            count
        ), state
    stats = await sandbox.stats()
    requests = delta(before, after, "blastd_provider_request_seconds_count", account=ACCOUNT)
    assert requests == stats["requests"] == 20 + 2 + 3
    by_outcome = {
        outcome: delta(before, after, "blastd_requests_total", account=ACCOUNT, outcome=outcome)
        for outcome in ("ok", "permanent", "transient")
    }
    assert by_outcome == {"ok": 20, "permanent": 2, "transient": 3}
    retries = delta(before, after, "blastd_retries_total", account=ACCOUNT, error_class="transient")
    assert retries == 2
    waits = delta(before, after, "blastd_limiter_wait_seconds_count", account=ACCOUNT)
    assert waits == requests, "every request waits for its turn once"
    assert value(after, "blastd_requests_in_flight", account=ACCOUNT) == 0
    assert delta(before, after, "blastd_jobs_taken_total") == 1
    assert value(after, "process_resident_memory_bytes") > 0


async def _answers(port: int) -> bool:
    try:
        await scrape(port)
    except aiohttp.ClientError:
        return False
    return True


async def _progress_series_gone(port: int, campaign_id: str) -> bool:
    samples = await scrape(port)
    campaigns = [labels["campaign"] for labels in series_of(samples, "blastd_campaign_recipients")]
    return campaign_id not in campaigns


async def test_throttling_counts_an_episode_and_a_retry_per_refused_request(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """Every request answers 429 until three were refused; then the sandbox accepts again."""
    await sandbox.configure(throttled_p=1.0, retry_after_s=0.05)
    port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=port, account={"concurrency": 3})
    async with running_daemon(settings):
        await wait_until(lambda: _answers(port))
        before = await scrape(port)
        await redis.lpush(JOBS, blast_job("throttled-metrics", numbers_from(41_000_100, 3)))
        await wait_until(lambda: _refused(sandbox, 3))
        await sandbox.configure(throttled_p=0.0)
        await wait_until(lambda: has_state(pool, "throttled-metrics", "done"))
        after = await scrape(port)
    refused = (await sandbox.stats())["rejected_by_code"]["130429"]
    throttled = {"account": ACCOUNT, "outcome": "throttled"}
    assert delta(before, after, "blastd_requests_total", **throttled) == refused
    retries = delta(before, after, "blastd_retries_total", account=ACCOUNT, error_class="throttled")
    assert retries == refused
    assert delta(before, after, "blastd_throttle_episodes_total", account=ACCOUNT) >= 1
    assert delta(before, after, "blastd_recipients_total", account=ACCOUNT, state="sent") == 3


async def _refused(sandbox: SandboxHandle, minimum: int) -> bool:
    return bool((await sandbox.stats())["rejected_by_code"].get("130429", 0) >= minimum)


async def test_queue_depths_are_read_from_redis_at_each_scrape(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    port = free_port()
    async with running_daemon(make_settings(servers, sandbox.url, admin_port=port)):
        await wait_until(lambda: _answers(port))
        before = await scrape(port)
        await redis.lpush(JOBS, b"{not json")
        await wait_until(lambda: _dead_letters(redis, 1))
        after = await scrape(port)
    assert delta(before, after, "blastd_jobs_dead_lettered_total") == 1
    assert value(after, "blastd_queue_depth", queue="dead") == 1
    assert value(after, "blastd_queue_depth", queue="jobs") == 0
    assert value(after, "blastd_queue_depth", queue="processing") == 0


async def _dead_letters(redis: aioredis.Redis, count: int) -> bool:
    return bool(await redis.llen("blastd:dead") == count)


async def test_progress_gauges_exist_only_while_the_campaign_runs(
    servers: Servers, redis: aioredis.Redis, pool: ledger.Pool, sandbox: SandboxHandle
) -> None:
    """A campaign held by not_before runs (waits) in the daemon: its gauges are there; an
    operator's pause ends the run, and the series with it."""
    port = free_port()
    settings = make_settings(servers, sandbox.url, admin_port=port, progress_interval_s=0.05)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    job = blast_job("held", [*numbers_from(41_000_200, 4), "12"], options={"not_before": later})
    async with running_daemon(settings):
        await wait_until(lambda: _answers(port))
        await redis.lpush(JOBS, job)
        samples = await wait_until(lambda: _with_progress(port, "held"))
        assert value(samples, "blastd_campaign_recipients", campaign="held") == 5
        assert value(samples, "blastd_campaign_done_recipients", campaign="held") == 1  # skipped
        await controls.apply_control(pool, "held", "pause")
        await wait_until(lambda: _progress_series_gone(port, "held"))
        assert await campaign_state(pool, "held") == "paused"


async def _with_progress(port: int, campaign_id: str) -> Samples | None:
    samples = await scrape(port)
    campaigns = [labels["campaign"] for labels in series_of(samples, "blastd_campaign_recipients")]
    return samples if campaign_id in campaigns else None


# --- the Grafana dashboard -------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every sample name the registry can export (labelled metrics with no series included)."""
    return {
        family.name + suffix
        for family in metrics.REGISTRY.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


def dashboard_expressions() -> list[str]:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    expressions += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if "definition" in variable
    ]
    return expressions


def test_dashboard_references_only_metrics_blastd_exports() -> None:
    referenced = {
        name for expr in dashboard_expressions() for name in re.findall(r"\bblastd_\w+", expr)
    }
    assert referenced
    assert referenced <= exported_names(), referenced - exported_names()


def test_dashboard_has_a_panel_for_each_operator_question() -> None:
    dashboard: dict[str, Any] = orjson.loads(DASHBOARD.read_bytes())
    assert dashboard["uid"] == "blastd"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 30
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    text = "\n".join(dashboard_expressions())
    for needed in (
        "sum by (outcome) (rate(blastd_requests_total",
        "histogram_quantile(0.5, sum by (le, account) (rate(blastd_provider_request_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, account) (rate(blastd_provider_request_seconds_buck",
        "histogram_quantile(0.99, sum by (le, account) (rate(blastd_provider_request_seconds_buck",
        "blastd_limiter_wait_seconds_bucket",
        "blastd_requests_in_flight",
        "blastd_queue_depth",
        "blastd_campaign_done_recipients",
    ):
        assert needed in text, needed
