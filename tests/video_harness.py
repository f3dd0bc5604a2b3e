"""What the video pipeline's tests share: the sandbox with D-ID mounted at /did beside the Cloud
API emulator (as `python -m blastd.sandbox` serves them), settings with a D-ID account, and
video jobs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from blastd.config import (
    DidAccount,
    Settings,
    UltraMsgAccount,
    VideoApiAccount,
    VideoSettings,
)
from blastd.sandbox.cloud_api import SandboxConfig, build_app, listening
from blastd.sandbox.did import DidSandboxConfig, build_did_app
from blastd.sandbox.ultramsg import UltraMsgSandboxConfig, build_ultramsg_app
from blastd.sandbox.video_api import VideoApiSandboxConfig, build_video_api_app
from tests.conftest import Servers
from tests.harness import ACCOUNT, TOKEN, SandboxHandle, make_settings, serving, wait_until

DID_ACCOUNT = "did-main"
VIDEO_API_ACCOUNT = "video-main"
ULTRAMSG_ACCOUNT = "ultra-main"
PRESENTER = "v2_public_Amber@0zSz8kflCN"
COMPRESSION = 200.0  # a 60 s render takes 0.3 s


def default_schedule(compression: float = COMPRESSION) -> dict[str, float]:
    """The default schedule (5 s, 10 s, 5 min) under the same compression as the renders."""
    return {
        "first_poll_s": 5 / compression,
        "poll_interval_s": 10 / compression,
        "webhook_poll_interval_s": 60 / compression,
        "timeout_s": 300 / compression,
        "backoff_initial_s": 5 / compression,
        "backoff_max_s": 60 / compression,
        "recovery_interval_s": 0.2,
    }


class VideoSandbox:
    """The Cloud API emulator at the root and D-ID's at /did, on one loopback port."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http
        self.cloud = SandboxHandle(url, http)
        self.did = SandboxHandle(url + "/did", http)
        self.video_api = SandboxHandle(url + "/video", http)
        self.ultramsg = SandboxHandle(url + "/ultramsg", http)

    async def jobs(self, emulator: str = "/did") -> list[dict[str, Any]]:
        async with self.http.get(f"{self.url}{emulator}/_sandbox/jobs") as response:
            jobs: list[dict[str, Any]] = orjson.loads(await response.read())
            return jobs


@contextlib.asynccontextmanager
async def video_sandbox(**did_knobs: Any) -> AsyncIterator[VideoSandbox]:
    """The Cloud API emulator, D-ID's at /did (with `did_knobs`) and the generic video-job
    API's at /video, renders compressed by COMPRESSION."""
    cloud = build_app(SandboxConfig(seed=7))
    knobs = {"seed": 7, "time_compression": COMPRESSION, **did_knobs}
    cloud.add_subapp("/did", build_did_app(DidSandboxConfig.model_validate(knobs)))
    generic = VideoApiSandboxConfig(seed=7, time_compression=COMPRESSION)
    cloud.add_subapp("/video", build_video_api_app(generic))
    cloud.add_subapp("/ultramsg", build_ultramsg_app(UltraMsgSandboxConfig(seed=7)))
    async with listening(cloud, "127.0.0.1", 0) as url, aiohttp.ClientSession() as http:
        yield VideoSandbox(url, http)


def make_video_settings(
    servers: Servers,
    sandbox: VideoSandbox,
    did: dict[str, Any] | None = None,
    video: dict[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """A Cloud API account to deliver with and a D-ID account to render with, on the sandbox,
    with the default polling schedule compressed like the sandbox's renders."""
    settings = make_settings(servers, sandbox.url, **overrides)
    account = {
        "kind": "did",
        "base_url": sandbox.did.url,
        "token": TOKEN,
        "presenter_id": PRESENTER,
        "retry": {"attempts": 3, "initial_s": 0.01, "max_s": 0.05, "jitter_s": 0.01},
        **(did or {}),
    }
    settings.accounts[DID_ACCOUNT] = DidAccount.model_validate(account)
    settings.accounts[ULTRAMSG_ACCOUNT] = UltraMsgAccount.model_validate(
        {
            "kind": "ultramsg",
            "base_url": sandbox.ultramsg.url,
            "instance_id": "instance1150",
            "token": TOKEN,
            "rate_per_s": 0,
            "retry": account["retry"],
        }
    )
    settings.accounts[VIDEO_API_ACCOUNT] = VideoApiAccount.model_validate(
        {
            "kind": "video_api",
            "base_url": sandbox.video_api.url,
            "token": TOKEN,
            "retry": account["retry"],
        }
    )
    settings.video = VideoSettings.model_validate({**default_schedule(), **(video or {})})
    return settings


def video_blast_job(job_id: str, numbers: list[str], **fields: Any) -> bytes:
    job: dict[str, Any] = {
        "type": "video_blast",
        "id": job_id,
        "account": ACCOUNT,
        "video": {"account": DID_ACCOUNT, "script": "Halo {name}, terima kasih!"},
        "message": {"caption": "Video untuk {name}"},
        "recipients": [{"to": n, "vars": {"name": f"N{i}"}} for i, n in enumerate(numbers)],
        **fields,
    }
    return orjson.dumps(job)


# --- The video emulators' own tests --------------------------------------------------------

FAST = {"render_median_s": 3.0, "render_min_s": 1.0, "time_compression": 100.0}
# With sigma 0 every render takes exactly median / compression: 60 s on the hand-moved clock.
FIXED = {"render_sigma": 0.0}


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    async with http.get(url) as response:
        return response.status, await response.read(), response.content_type


class Receiver:
    """A webhook endpoint that records every POSTed JSON body and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(orjson.loads(await request.read()))
        return web.Response()

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        await wait_until(lambda: len(self.bodies) >= count, timeout_s=10, interval_s=0.01)
        return self.bodies


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[tuple[Receiver, str]]:
    """A receiver on a free loopback port; yields it and its URL (with a secret query)."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with serving(app) as base_url:
        yield receiver, base_url + "/hook?token=s3cret"
