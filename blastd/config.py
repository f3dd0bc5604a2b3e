"""Settings (pydantic-settings): nested sections, one entry per account, secrets from files."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import phonenumbers
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from blastd.errors import ConfigError
from blastd.redis_urls import parse_redis_url

SECRET_FIELDS = ("token", "app_secret", "verify_token", "secret_key", "webhook_secret")
ENV_PREFIX = "BLASTD_"
# The test suite's own variables (tests/conftest.py): they point it at running servers.
TEST_SUITE_PREFIX = "BLASTD_TEST_"
DATABASE_SCHEMES = ("postgresql", "postgres")
DATABASE_PASSWORD_FILE = "database.password"  # in the credentials directory
# pydantic-settings names the field it could not decode only in its message text.
_UNDECODABLE_FIELD = re.compile(r'field "(\w+)"')


class RetrySettings(BaseModel):
    """Retries of transient provider answers; by default two retries, 5 s then 10 s, as in the
    systems blastd replaces (docs/errors.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must not fall back silently

    attempts: int = Field(3, ge=1, le=20)
    initial_s: float = Field(5.0, ge=0)
    max_s: float = Field(10.0, ge=0)
    jitter_s: float = Field(1.0, ge=0)


class AccountSettings(BaseModel):
    """A named provider login with its own rate, concurrency and connection pool.

    `rate_per_s` counts requests: one message each for most providers, one batch of up to
    `batch_size` messages for a bulk API such as Wablas v2. The defaults of concurrency and
    timeouts are those of the systems blastd replaces (docs/providers.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must not fall back silently

    kind: str
    base_url: str
    token: SecretStr | None = None
    rate_per_s: float = Field(80.0, ge=0)  # 0 means no limit
    # The rate holds for every daemon on this Redis prefix together (shared_pacing). False
    # paces this daemon alone, with no Redis round trip: only where one daemon sends for it.
    shared_rate: bool = True
    concurrency: int = Field(10, ge=1, le=2000)  # requests in flight at once
    connect_timeout_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)  # the whole request, answer read
    retry: RetrySettings = RetrySettings()

    @property
    def batch_limit(self) -> int:
        """Messages one request may carry."""
        return 1


class CloudApiAccount(AccountSettings):
    """One WhatsApp Cloud API phone number."""

    kind: Literal["cloud_api"]
    base_url: str = "https://graph.facebook.com"
    api_version: str = "v23.0"
    phone_number_id: str
    app_secret: SecretStr | None = None  # checks X-Hub-Signature-256 on status webhooks
    verify_token: SecretStr | None = None  # answers Meta's GET verification handshake
    rate_per_s: float = Field(80.0, ge=0)  # the default throughput tier of a number
    # Meta's messaging limit: unique people messaged in a rolling window (24 h); 0: no limit.
    # Accounts with the same `portfolio` (a business portfolio) share one budget.
    messaging_limit_per_24h: int = Field(0, ge=0)
    portfolio: str | None = None
    # Marketing templates go through the Marketing Messages API (its own endpoint) instead.
    marketing_messages_api: bool = False


class WablasAccount(AccountSettings):
    """One Wablas device. Bulk sends carry up to `batch_size` messages per request."""

    kind: Literal["wablas"]
    base_url: str  # the account's region server, e.g. https://solo.wablas.com
    secret_key: SecretStr | None = None  # newer accounts send "token.secret_key"
    batch_size: int = Field(100, ge=1, le=1000)  # messages per v2 request (not confirmed)
    rate_per_s: float = Field(2.0, ge=0)  # requests: 500 ms between batches
    webhook_secret: SecretStr | None = None  # must appear in the tracking URL's query
    # Wablas refuses with HTTP 200 and {"status": false, "message": ...} and documents none of
    # its texts (docs/errors.md, Wablas): the adapter classifies a refusal by the first
    # list holding a lower-case fragment of it, in this order; an unmatched one pauses.
    credential_keywords: tuple[str, ...] = ("token", "unauthori", "secret", "forbidden")
    billing_keywords: tuple[str, ...] = ("quota", "expired", "package", "balance", "subscri")
    device_keywords: tuple[str, ...] = ("disconnect", "not connected", "scan", "qr", "offline")
    media_keywords: tuple[str, ...] = ("too large", "file size", "download", "media", "url")
    batch_limit_keywords: tuple[str, ...] = ("maximum", "too many", "exceed", "batch")
    number_keywords: tuple[str, ...] = ("number", "phone", "not registered", "not on whatsapp")
    # Extra fields for every v2 item, e.g. {"retry": false, "priority": true}. What Wablas does
    # with them is undocumented, and some integrations put them next to "data" instead.
    request_flags: dict[str, bool] = {}
    flags_at_top_level: bool = False
    # Tracking-webhook status -> ledger receipt; others (pending, process) are in progress.
    # Integrations disagree on sent vs delivered ticks; "read" is the one certain state.
    tracking_states: dict[str, Literal["sent", "delivered", "read", "failed"]] = {
        "sent": "sent",
        "delivered": "delivered",
        "received": "delivered",
        "read": "read",
        **dict.fromkeys(("cancel", "canceled", "cancelled", "reject", "rejected"), "failed"),
        "failed": "failed",
    }

    @property
    def batch_limit(self) -> int:
        return self.batch_size


class UltraMsgAccount(AccountSettings):
    """One UltraMsg instance.

    UltraMsg's answers carry no error codes, only texts; the keyword lists say which texts
    mean what (docs/errors.md, UltraMsg, lists the texts seen so far)."""

    kind: Literal["ultramsg"]
    base_url: str = "https://api.ultramsg.com"
    instance_id: str
    rate_per_s: float = Field(10.0, ge=0)  # messages a second; UltraMsg names no limit
    webhook_secret: SecretStr | None = None  # must appear in the webhook URL's query
    # The wrong-token error asks for a GET parameter: the query string is the safest place.
    token_placement: Literal["query", "body"] = "query"
    body_format: Literal["form", "json"] = "form"  # the official Node SDK posts forms
    priority: int = Field(10, ge=0)  # the instance's queue order, lower first; 10 = promotional
    fatal_error_keywords: tuple[str, ...] = (
        "wrong token",
        "instance not found",
        "not authenticated",
        "not authorized",
        "payment",
        "subscription",
        "stopped",
        "qr code",
    )
    invalid_number_keywords: tuple[str, ...] = (
        "invalid number",
        "invalid phone",
        "not a valid",
        "not registered",
        "not on whatsapp",
        "does not exist",
    )


class StatusBatchSizes(BaseModel):
    """The adaptive batch sizes, by the number of contacts a status goes to (docs/status.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must not fall back silently

    small: int = Field(100, ge=1)  # below 500 contacts
    medium: int = Field(500, ge=1)  # below 2,000
    large: int = Field(1_000, ge=1)  # below 5,000
    xlarge: int = Field(2_000, ge=1)  # below 10,000
    xxlarge: int = Field(5_000, ge=1)  # below 20,000
    enterprise: int = Field(10_000, ge=1)  # 20,000 and more


class StatusGatewayAccount(AccountSettings):
    """One WhatsApp session of a Baileys-based gateway that posts statuses (stories).

    `flavour` picks the request shape: 'evolution' is Evolution API's
    POST /message/sendStatus/{instance}; 'story' is a producer's own gateway's
    POST /story/{text|image|video}, with the session in the body. Whether a gateway honours a
    message id passed back for a resend is not confirmed for every gateway (docs/status.md):
    the field's name is a setting, and a resend answered with another id is logged."""

    kind: Literal["status_gateway"]
    base_url: str
    flavour: Literal["evolution", "story"] = "evolution"
    auth_style: Literal["apikey", "x_api_key", "bearer"] = "apikey"
    instance: str  # Evolution's instance name, or the story API's sessionId
    message_id_field: str = "messageId"  # the request field that carries the anchor's id
    message_id_path: str | None = None  # dotted path of the id in the answer; None: by flavour
    own_jid: str | None = None  # added to the anchor's list, so the account sees its own status
    rate_per_s: float = Field(0.0, ge=0)  # requests a second; 0: only batch_delay_ms spaces them
    batch_sizes: StatusBatchSizes = StatusBatchSizes()
    max_batch_size: int | None = Field(None, ge=1)  # a gateway's known limit, if any
    batch_delay_ms: float = Field(0.0, ge=0)  # pause between batches
    max_concurrent_batches: int = Field(1, ge=1, le=100)  # 1: one batch after the other
    # Texts of a refusal that mean "this list is too long" (WAHA users see "Frame Too Large").
    too_large_keywords: tuple[str, ...] = ("too large", "too long", "too many", "payload")
    # Texts that mean the session is gone: nothing can be posted until an operator acts.
    session_keywords: tuple[str, ...] = ("not connected", "disconnected", "qr", "logged out")


class VideoAccountSettings(AccountSettings):
    """A video-generation login: `concurrency` bounds the renders being submitted at once
    and the status polls in flight; `rate_per_s` paces its requests. The defaults are those of
    the systems blastd replaces (docs/video.md)."""

    concurrency: int = Field(10, ge=1, le=2000)  # renders submitted or polled at once
    rate_per_s: float = Field(0.0, ge=0)  # D-ID publishes no rate; 0 means no limit
    request_timeout_s: float = Field(60.0, gt=0)
    retry: RetrySettings = RetrySettings(initial_s=2.0, max_s=6.0)  # 2 s, then up to 6 s
    # The public URL (https, reachable by the provider) of this daemon's webhook for the
    # account, e.g. https://hooks.example.com/webhooks/video/did-main. None: polling only.
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None  # added to webhook_url as ?token=...


class DidAccount(VideoAccountSettings):
    """One D-ID API key (docs/providers.md): clips from a presenter, or talks from a
    photo. The key is `token`, in its issued form `username:password`."""

    kind: Literal["did"]
    base_url: str = "https://api.d-id.com"
    # The docs put the key after "Basic " as issued; community code base64-encodes it first.
    auth_form: Literal["raw", "base64"] = "raw"
    endpoint: Literal["clips", "talks"] = "clips"
    presenter_id: str | None = None  # clips: the default presenter
    driver_id: str | None = None  # clips: older examples pass one with the presenter
    source_url: str | None = None  # talks: the default photo
    voice_provider: str = "microsoft"
    voice_id: str | None = None  # None: D-ID's default voice
    result_format: str = "mp4"
    # find() reads one page of GET /{endpoint}, newest first, of this many jobs (`?limit=`):
    # a reference submitted before the newest find_list_limit jobs is not found.
    find_list_limit: int = Field(100, ge=1, le=1000)


class VideoApiAccount(VideoAccountSettings):
    """A generic async video-job API (docs/providers.md): every path and
    field name is a setting, because none of them is documented."""

    kind: Literal["video_api"]
    base_url: str
    auth_header: str = "X-API-Key"
    auth_template: str = "{api_key}"  # e.g. "Bearer {api_key}"
    submit_path: str = "/job"
    # The submit body; string values are templates over script, reference and callback_url
    # (and the job's video options); an empty result drops the field.
    submit_body: dict[str, str] = {
        "script": "{script}",
        "reference": "{reference}",
        "callbackUrl": "{callback_url}",
    }
    job_id_path: str = "jobId"  # dotted path into the submit answer
    status_path: str = "/job/{job_id}"
    status_field_path: str = "status"
    video_url_path: str = "videoUrl"
    error_path: str = "error"
    # Provider status (compared stripped and lower-cased) -> our state; others: unknown_status.
    status_map: dict[str, Literal["running", "succeeded", "failed", "not_found"]] = {
        "processing": "running",
        "queued": "running",
        "pending": "running",
        "completed": "succeeded",
        "failed": "failed",
        "not_found": "not_found",
    }
    unknown_status: Literal["running", "failed"] = "running"
    http_404_means_not_found: bool = True
    # Right after a submit, some job stores do not know the job yet: not_found within this
    # many seconds of the submit is read as running.
    not_found_grace_s: float = Field(30.0, ge=0)


Account = Annotated[
    CloudApiAccount
    | WablasAccount
    | UltraMsgAccount
    | StatusGatewayAccount
    | DidAccount
    | VideoApiAccount,
    Field(discriminator="kind"),
]
ACCOUNT_MODELS: tuple[type[BaseModel], ...] = (
    CloudApiAccount,
    WablasAccount,
    UltraMsgAccount,
    StatusGatewayAccount,
    DidAccount,
    VideoApiAccount,
)
ACCOUNT_KINDS = ("cloud_api", "wablas", "ultramsg", "status_gateway", "did", "video_api")
VIDEO_KINDS = ("did", "video_api")


class RedisHashResolver(BaseModel):
    """A conversation's chat from a Redis hash: HGET key {conversation_id} holds JSON
    {"to": number, "account": messaging account}."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["redis_hash"]
    key: str = Field(min_length=1)


class HttpResolver(BaseModel):
    """A conversation's chat from an HTTP service: GET url (with {conversation_id} filled in,
    URL-quoted) answers JSON {"to": number, "account": messaging account}."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["http"]
    url: str = Field(min_length=1, pattern=r"^https?://.*\{conversation_id\}")
    timeout_s: float = Field(5.0, gt=0)


ConversationResolver = Annotated[RedisHashResolver | HttpResolver, Field(discriminator="kind")]


class VideoSettings(BaseModel):
    """The video pipeline: submission progress, the polling schedule and the Redis TTLs, with
    the defaults of the systems blastd replaces (docs/video.md)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must not fall back silently

    # Redis key prefix of the video:* keys; None: the daemon's redis_prefix. "" gives the bare
    # names, so a producer written for the earlier polling worker works unchanged.
    key_prefix: str | None = None
    progress_batch: int = Field(50, ge=1, le=10_000)  # renders submitted per progress save
    first_poll_s: float = Field(5.0, gt=0)  # from submission to the first poll
    # Wait longer before the first poll once the account's recent renders show none finish
    # that soon (their 5th percentile): fewer polls, the same delay for 95 % of renders.
    adaptive_first_poll: bool = True
    poll_interval_s: float = Field(10.0, gt=0)  # between polls of a running render
    # With a webhook configured the webhook ends the wait; polls only guard against a lost one.
    webhook_poll_interval_s: float = Field(60.0, gt=0)
    timeout_s: float = Field(300.0, gt=0)  # give up this long after submission...
    max_attempts: int = Field(30, ge=1)  # ...or after this many polls
    backoff_initial_s: float = Field(5.0, gt=0)  # after failed polls: 5 s x 2^(failures - 1)
    backoff_max_s: float = Field(60.0, gt=0)  # at most 1 minute
    poll_timeout_s: float = Field(15.0, gt=0)  # one poll's HTTP timeout
    job_ttl_s: int = Field(600, ge=1)  # video:job:{id}
    lock_ttl_s: int = Field(60, ge=1)  # video:lock:{id}
    attempts_ttl_s: int = Field(600, ge=1)  # video:attempts:{id}
    completed_ttl_s: int = Field(7200, ge=1)  # video:completed:{id}
    recovery_interval_s: float = Field(15.0, gt=0)  # how often orphaned jobs are looked for
    rerender_unknown_errors: int = Field(1, ge=0, le=5)  # D-ID: re-create an UnknownError job
    # An external record that names a conversation, not a chat, is resolved through this.
    conversation_resolver: ConversationResolver | None = None
    # The video account of an external record that names none; None: the only one configured.
    external_account: str | None = None


class AdminSettings(BaseModel):
    """The loopback HTTP server: health, readiness, metrics, campaign status and webhooks."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key must not fall back silently

    host: str = "127.0.0.1"
    port: int = Field(8787, ge=0, le=65535)  # 0 picks a free port (tests)
    # Bearer token for /metrics and /v1/* (None: open, as on loopback); the credential file
    # admin.token is read like an account's secrets.
    token: SecretStr | None = None
    sse_heartbeat_s: float = Field(15.0, gt=0)  # comment lines keep idle event streams open


class Settings(BaseSettings):
    """Everything blastd reads from BLASTD_* variables, an env file and the credentials dir."""

    model_config = SettingsConfigDict(
        env_prefix="BLASTD_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "blastd:"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/blastd"
    instance_id: str = Field(default_factory=socket.gethostname)
    credentials_dir: Path | None = Field(
        default_factory=lambda: Path(d) if (d := os.environ.get("CREDENTIALS_DIRECTORY")) else None
    )
    accounts: dict[str, Account] = {}
    admin: AdminSettings = AdminSettings()
    video: VideoSettings = VideoSettings()

    default_region: str = "ID"  # region for numbers written without a country code
    max_job_bytes: int = Field(1_048_576, ge=1024)
    max_inline_recipients: int = Field(10_000, ge=1)
    max_recipients: int = Field(2_000_000, ge=1)
    recipients_page_size: int = Field(5_000, ge=1)  # rows per COPY page at intake
    claim_page_size: int = Field(500, ge=1)  # recipients claimed from the ledger at once
    outcome_flush_rows: int = Field(500, ge=1)
    outcome_flush_interval_s: float = Field(0.05, gt=0)
    campaign_poll_interval_s: float = Field(1.0, gt=0)
    # How often a daemon frees recipients it claimed and lost track of (a commit whose answer
    # was lost): they wait at most this long, plus one outcome flush, to be claimed again.
    orphan_sweep_interval_s: float = Field(10.0, gt=0)
    progress_interval_s: float = Field(2.0, gt=0)  # a running campaign's progress events
    intake_block_s: float = Field(1.0, gt=0)  # BLMOVE timeout: how soon shutdown is noticed
    redis_socket_timeout_s: float = Field(5.0, gt=0)
    db_command_timeout_s: float = Field(10.0, gt=0)
    dependency_retry_s: float = Field(1.0, gt=0)  # wait between reconnect attempts
    health_check_interval_s: float = Field(2.0, gt=0)  # probes behind /readyz and STATUS=
    drain_timeout_s: float = Field(20.0, gt=0)
    instance_ttl_s: float = Field(5.0, gt=0)  # a restart after a crash waits at most this long
    heartbeat_interval_s: float = Field(1.0, gt=0)
    # What becomes of a recipient in doubt (its answer lost, or the daemon died while it was
    # in flight) once its reconcile window has passed without a receipt. resend: once, flagged
    # possible_duplicate; a second doubt is held. hold: it stays 'uncertain' for an operator
    # (`blastd retry --class uncertain`). The default serves a marketing sender: after the
    # window, no word from the provider means it very likely never took the message, and a
    # customer who misses an offer costs more than a rare, flagged, second copy of it.
    uncertain_policy: Literal["hold", "resend"] = "resend"
    # Cloud API status webhooks normally arrive within seconds of acceptance, and Meta retries a
    # failed delivery of one with backoff: fifteen minutes covers those and a few retry rounds
    # after a short outage of our webhook endpoint before the policy is applied.
    reconcile_window_s: float = Field(900.0, ge=0)
    reconcile_interval_s: float = Field(30.0, gt=0)  # how often the window is checked
    max_job_deliveries: int = Field(3, ge=1)  # a job that crashed the daemon this often is dead
    # Opt-outs: the categories whose sends skip numbers on the opt-out list, and the inbound
    # messages (whole text, trimmed, any case) that put their sender on it.
    optout_applies_to: list[Literal["marketing", "utility", "authentication"]] = ["marketing"]
    # The messaging limit's rolling window: 24 h as Meta counts it (shorter only in tests).
    messaging_limit_window_s: float = Field(86_400.0, gt=0)
    optout_keywords: list[str] = ["STOP", "BERHENTI", "UNSUBSCRIBE", "STOP PROMO"]

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    mask_phones: bool = True

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region code phonenumbers knows (e.g. ID, US)")
        return value.upper()

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str) -> str:
        parse_redis_url(url)  # one server, a Sentinel service or a Cluster (redis_urls.py)
        if "," not in urlsplit(url).netloc:
            _ = urlsplit(url).port  # raises ValueError for a port that is not a number
        return url

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in DATABASE_SCHEMES:
            raise ValueError("must start with postgresql:// or postgres://")
        if "," not in parts.netloc:  # several hosts (a standby) are asyncpg's to read
            _ = parts.port  # raises ValueError for a port that is not a number
        return value

    @model_validator(mode="after")
    def _read_secret_files(self) -> Settings:
        """Fill missing secrets from `{credentials_dir}/{account}.{field}` files, the admin
        token from `{credentials_dir}/admin.token`, and the database password from
        `{credentials_dir}/database.password`."""
        if self.credentials_dir is None:
            return self
        password = self.credentials_dir / DATABASE_PASSWORD_FILE
        if password.is_file() and not urlsplit(self.database_url).password:
            self.database_url = _with_password(self.database_url, password.read_text().strip())
        for name, account in self.accounts.items():
            for field in _secret_fields(account):
                path = self.credentials_dir / f"{name}.{field}"
                if getattr(account, field) is None and path.is_file():
                    setattr(account, field, SecretStr(path.read_text().strip()))
        admin_token = self.credentials_dir / "admin.token"
        if self.admin.token is None and admin_token.is_file():
            self.admin.token = SecretStr(admin_token.read_text().strip())
        return self

    def messaging_limit_of(self, account: str) -> tuple[int, list[str]] | None:
        """The account's messaging limit and the accounts that share it (one business
        portfolio); None without a limit."""
        own = self.accounts.get(account)
        if not isinstance(own, CloudApiAccount) or not own.messaging_limit_per_24h:
            return None
        names = [
            name
            for name, other in self.accounts.items()
            if name == account
            or (
                own.portfolio is not None
                and isinstance(other, CloudApiAccount)
                and other.portfolio == own.portfolio
            )
        ]
        return own.messaging_limit_per_24h, names

    def secret_values(self) -> list[str]:
        """Every configured secret, so the log pipeline can scrub them from any output."""
        secrets = [
            getattr(account, field)
            for account in self.accounts.values()
            for field in _secret_fields(account)
        ]
        secrets.append(self.admin.token)
        # A password in a URL is scrubbed as written there (quoted) and as the server reads it.
        passwords = [
            form
            for url in (self.redis_url, self.database_url)
            for form in (_url_password(url), unquote(_url_password(url)))
        ]
        values = [s.get_secret_value() for s in secrets if s is not None] + passwords
        return [v for v in values if v and len(v) >= 4]


def _secret_fields(account: AccountSettings) -> list[str]:
    return [field for field in SECRET_FIELDS if field in type(account).model_fields]


def _url_password(url: str) -> str:
    return urlsplit(url).password or ""


def _with_password(url: str, password: str) -> str:
    """The DSN with the password put in, quoted: it may hold '@' or '/'."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def load_settings(env_file: Path | None = None) -> Settings:
    """Load and validate settings once; a bad value raises ConfigError naming the setting."""
    if env_file is not None and not env_file.is_file():
        raise ConfigError(f"--env-file {env_file}: no such file")
    if unknown := sorted(name for name in os.environ if _unknown_variable(name)):
        raise ConfigError(f"{unknown[0]}: not a blastd setting (in the environment)")
    try:
        settings = Settings(_env_file=env_file)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc)) from None
    except SettingsError as exc:  # a nested section that is not valid JSON
        found = _UNDECODABLE_FIELD.search(str(exc))
        setting = f"BLASTD_{found.group(1).upper()}" if found else "a nested setting"
        raise ConfigError(f"invalid settings: {setting}: not valid JSON") from None
    for name, account in settings.accounts.items():
        if account.token is None:
            raise ConfigError(
                f"BLASTD_ACCOUNTS__{name}__token: no token for account {name!r}, "
                f"nor {_credential_file(settings.credentials_dir, f'{name}.token')}"
            )
    return settings


def _credential_file(directory: Path | None, name: str) -> str:
    if directory is None:
        return f"a credential file {name} (no credentials directory: CREDENTIALS_DIRECTORY unset)"
    return f"the file {directory / name}"


def _unknown_variable(name: str) -> bool:
    """A BLASTD_* variable that names no setting: BLASTD_X, BLASTD_SECTION__FIELD, or
    BLASTD_ACCOUNTS__{name}__FIELD[__FIELD] (any account name, a field of some account kind)."""
    upper = name.upper()
    if not upper.startswith(ENV_PREFIX) or upper.startswith(TEST_SUITE_PREFIX):
        return False
    parts = name[len(ENV_PREFIX) :].lower().split("__")
    if parts[0] == "accounts":
        return len(parts) > 1 and not _is_path(ACCOUNT_MODELS, parts[2:])
    return not _is_path((Settings,), parts)


def _is_path(models: tuple[type[BaseModel], ...], parts: list[str]) -> bool:
    """True when `parts` are fields of one of `models`, each inner one of a nested model."""
    if not parts:
        return True
    for model in models:
        field = model.model_fields.get(parts[0])
        if field is None:
            continue
        if len(parts) == 1 or _is_path(_models_in(field.annotation), parts[1:]):
            return True
    return False


def _models_in(annotation: Any) -> tuple[type[BaseModel], ...]:
    """The models a field holds, through Optional, unions and dict values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return (annotation,)
    if get_origin(annotation) is dict:
        return ()  # a free-form mapping (e.g. request_flags): its keys are data, not settings
    return tuple(model for arg in get_args(annotation) for model in _models_in(arg))


def _describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            # An unknown line of the env file: loc is the variable's own name, prefix included.
            lines.append(f"{str(error['loc'][0]).upper()}: not a blastd setting")
            continue
        lines.append(f"{_setting_name(error['loc'])}: {error['msg']}")
    return "invalid settings: " + "; ".join(lines)


def _setting_name(loc: tuple[int | str, ...]) -> str:
    """BLASTD_ACCOUNTS__main__phone_number_id for ('accounts', 'main', 'cloud_api', ...).

    pydantic puts the account's kind into the path (the union's tag); the variable has none.
    Account names and fields keep their case: that is how they are written in the JSON.
    """
    parts = [str(part) for part in loc]
    if parts[0] != "accounts":
        return "BLASTD_" + "__".join(parts).upper()
    if len(parts) > 2 and parts[2] in ACCOUNT_KINDS:
        del parts[2]
    return "__".join(["BLASTD_ACCOUNTS", *parts[1:]])
