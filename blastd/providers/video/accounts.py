"""A configured video account: its adapter, chosen by kind, its bound on requests and its pacer."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp

from blastd.config import AccountSettings, DidAccount, VideoAccountSettings, VideoApiAccount
from blastd.errors import ConfigError
from blastd.pacing import Pacer
from blastd.providers.video import did, video_api
from blastd.providers.video.base import VideoProvider

RENDER_SAMPLES = 200  # recent render times kept per account for the adaptive schedule


def build_video_provider(
    name: str, account: AccountSettings, http: aiohttp.ClientSession
) -> VideoProvider:
    """Return the adapter for a video account's kind."""
    if isinstance(account, DidAccount):
        return did.DidProvider(name, account, http)
    if isinstance(account, VideoApiAccount):
        return video_api.VideoApiProvider(name, account, http)
    raise ConfigError(f"BLASTD_ACCOUNTS__{name}__kind: {account.kind!r} is not a video provider")


@dataclass(slots=True)
class VideoAccount:
    """A configured video account as the pipeline uses it: its adapter, the bound on its
    requests in flight (`concurrency`, 10), and its pacer when it has a rate."""

    name: str
    settings: VideoAccountSettings
    provider: VideoProvider
    slots: asyncio.Semaphore
    pacer: Pacer | None
    # Seconds from submission to a detected completion, of the latest renders: the adaptive
    # schedule's first poll waits until the quickest of them would be done.
    render_times: deque[float] = field(default_factory=lambda: deque(maxlen=RENDER_SAMPLES))

    @property
    def has_webhook(self) -> bool:
        return self.settings.webhook_url is not None

    @property
    def webhook_url(self) -> str | None:
        """The URL given to the provider with each render: the secret rides in its query."""
        url, secret = self.settings.webhook_url, self.settings.webhook_secret
        if url is None or secret is None:
            return url
        separator = "&" if "?" in url else "?"
        return f"{url}{separator}{urlencode({'token': secret.get_secret_value()})}"


def open_video_account(
    name: str, account: VideoAccountSettings, http: aiohttp.ClientSession
) -> VideoAccount:
    pacer = Pacer(account.rate_per_s) if account.rate_per_s else None
    provider = build_video_provider(name, account, http)
    return VideoAccount(name, account, provider, asyncio.Semaphore(account.concurrency), pacer)
