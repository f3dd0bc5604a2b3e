"""Fixtures the adapter tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.harness import serving


@pytest.fixture
async def webhook_sink() -> AsyncIterator[tuple[str, list[Any]]]:
    """A loopback URL taking webhook POSTs, and the JSON bodies it took, in arrival order."""
    bodies: list[Any] = []

    async def receive(request: web.Request) -> web.Response:
        bodies.append(orjson.loads(await request.read()))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", receive)
    async with serving(app) as base_url:
        yield base_url + "/hook", bodies
