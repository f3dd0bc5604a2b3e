"""The knobs of the Wablas emulator (blastd/sandbox/wablas.py), validated as one model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from blastd.sandbox.emulator import ByNumber, EmulatorConfig, NumberSet, Probability

FaultKind = Literal["transient", "throttled", "token", "device", "quota"]


class WablasSandboxConfig(EmulatorConfig):
    """Every knob of the Wablas emulator; POST /_sandbox/config replaces any subset."""

    secret_key: str = "sandbox-secret"
    auth: Literal["token", "token_secret", "either"] = "either"  # Authorization forms accepted
    auth_failure: Literal["status_false", "http_401"] = "status_false"
    max_batch: int = Field(100, ge=1)  # items per v2 request; more are refused (not confirmed)
    quota: int = Field(1_000_000_000, ge=0)  # messages left; each accepted item takes one
    device_connected: bool = True
    item_array: Literal["messages", "message"] = "messages"  # community DTOs disagree
    reverse_items: bool = False  # answer the items in reverse order
    omit_numbers: NumberSet = frozenset()  # accepted, but left out of the answer
    # digits -> item status ("failed", "rejected", "cancel")
    fail_numbers: ByNumber[str] = Field(default_factory=dict)
    # digits -> HTTP status for the whole request
    fail_numbers_http: ByNumber[int] = Field(default_factory=dict)
    media_bytes: dict[str, int] = Field(default_factory=dict)  # video URL -> size; else small
    unreachable_media: frozenset[str] = frozenset()  # video URLs that cannot be downloaded
    token_error_p: Probability = 0.0
    device_error_p: Probability = 0.0
    quota_error_p: Probability = 0.0
    # webhook_url is the device's tracking URL; incoming_webhook_url its URL for the messages
    # people send it (the tracking URL when unset)
    incoming_webhook_url: str | None = None
    webhook_secret: str | None = "sandbox-webhook-secret"  # added as ?secret=
    webhook_statuses: tuple[Literal["pending", "process", "sent", "delivered", "read"], ...] = (
        "sent",
        "delivered",
        "read",
    )
    # digits -> final tracking status ("failed", ...)
    async_fail_numbers: ByNumber[str] = Field(default_factory=dict)
    webhook_form: bool = False  # form posts instead of JSON
    webhook_batch_max: int = Field(1, ge=1)  # above 1: JSON arrays of up to this many

    def fault_slices(self) -> list[tuple[float, FaultKind]]:
        """Each fault class with its probability; one draw per request picks at most one."""
        return [
            (self.transient_p, "transient"),
            (self.throttled_p, "throttled"),
            (self.token_error_p, "token"),
            (self.device_error_p, "device"),
            (self.quota_error_p, "quota"),
        ]
