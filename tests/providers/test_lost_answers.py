"""A request that never left against an answer that was lost, through the Cloud API adapter and
the sandbox: only the first may be sent again; the second leaves the recipient in doubt. The
sandbox's own tally (what it accepted) says which of the two really happened."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from blastd.errors import ProviderError, TransientError, UncertainOutcomeError
from blastd.sandbox.cloud_api import SandboxConfig
from tests.harness import cloud_api_emulator, get_json
from tests.providers.test_cloud_api import DIGITS, provider_for, text_to


class _SlowResolver(AbstractResolver):
    """A name server that never answers in time: the connect limit runs out before a
    connection is even tried."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


class _FailingResolver(_SlowResolver):
    """A name server that knows no such host."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        raise OSError(socket.EAI_NONAME, "Name or service not known")


async def _send_error(base_url: str, http: aiohttp.ClientSession, **account: Any) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider_for(base_url, http, **account).send(text_to())
    return caught.value


async def _accepted(http: aiohttp.ClientSession, base_url: str) -> int:
    stats = await get_json(http, base_url + "/_sandbox/stats")
    accepted: int = stats["accepted"]
    return accepted


async def test_a_refused_connection_never_left_and_is_transient(
    http: aiohttp.ClientSession,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    error = await _send_error(f"http://127.0.0.1:{closed_port}", http)
    assert type(error) is TransientError
    assert error.code == "network"


@pytest.mark.parametrize(
    ("resolver", "code"),
    [(_SlowResolver, "connect_timeout"), (_FailingResolver, "network")],
    ids=["connect-timeout", "dns-failure"],
)
async def test_a_request_that_never_reached_the_sandbox_is_transient(
    resolver: type[AbstractResolver], code: str
) -> None:
    async with cloud_api_emulator() as base_url:
        named_url = base_url.replace("127.0.0.1", "sandbox.invalid")
        connector = aiohttp.TCPConnector(resolver=resolver())
        async with aiohttp.ClientSession(connector=connector) as slow_http:
            error = await _send_error(
                named_url, slow_http, connect_timeout_s=0.05, request_timeout_s=5.0
            )
        async with aiohttp.ClientSession() as http:
            assert await _accepted(http, base_url) == 0, "nothing reached the provider"
    assert type(error) is TransientError
    assert error.code == code


@pytest.mark.parametrize(
    ("mode", "code"),
    [("delay", "timeout"), ("disconnect", "answer_lost"), ("truncate", "answer_lost")],
    ids=["read-timeout", "server-disconnected", "truncated-body"],
)
async def test_an_answer_lost_after_the_sandbox_accepted_is_uncertain(
    http: aiohttp.ClientSession, mode: str, code: str
) -> None:
    config = SandboxConfig(withhold_numbers=frozenset({DIGITS}), withhold_mode=mode)
    async with cloud_api_emulator(config) as base_url:
        error = await _send_error(base_url, http, request_timeout_s=0.2)
        stats = await get_json(http, base_url + "/_sandbox/stats")
    assert type(error) is UncertainOutcomeError, repr(error)
    assert error.code == code
    assert (stats["accepted"], stats["answers_withheld"]) == (1, 1), "it did arrive"


async def test_a_late_answer_within_the_timeout_is_read(http: aiohttp.ClientSession) -> None:
    config = SandboxConfig(withhold_numbers=frozenset({DIGITS}), withhold_answer_ms=50)
    async with cloud_api_emulator(config) as base_url:
        receipt = await provider_for(base_url, http, request_timeout_s=5.0).send(text_to())
        assert await _accepted(http, base_url) == 1
    assert receipt.provider_message_id.startswith("wamid.")
