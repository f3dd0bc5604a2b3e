"""The messaging provider for an account: its kind picks the adapter."""

from __future__ import annotations

import aiohttp

from blastd.config import (
    AccountSettings,
    CloudApiAccount,
    StatusGatewayAccount,
    UltraMsgAccount,
    WablasAccount,
)
from blastd.errors import ConfigError
from blastd.providers import cloud_api, status_gateway, ultramsg, wablas
from blastd.providers.base import Provider


def build_provider(name: str, account: AccountSettings, http: aiohttp.ClientSession) -> Provider:
    """Return the adapter for the account's provider kind."""
    if isinstance(account, CloudApiAccount):
        return cloud_api.CloudApiProvider(name, account, http)
    if isinstance(account, UltraMsgAccount):
        return ultramsg.UltraMsgProvider(name, account, http)
    if isinstance(account, WablasAccount):
        return wablas.WablasProvider(name, account, http)
    if isinstance(account, StatusGatewayAccount):
        return status_gateway.StatusGatewayProvider(name, account, http)
    raise ConfigError(
        f"BLASTD_ACCOUNTS__{name}__KIND: provider kind {account.kind!r} is not supported"
    )
