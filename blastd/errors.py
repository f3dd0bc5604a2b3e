"""Every exception blastd raises.

    BlastdError
    ├── ConfigError             bad settings: start-up stops with exit code 78
    ├── InvalidJobError         a job that cannot be accepted: dead-lettered with its reason
    ├── InvalidNumberError      a number that is not a valid phone number: recorded as skipped
    ├── SourceError             a recipients file for `blastd enqueue` cannot be read
    ├── DrainTimeoutError       the drain deadline cut in-flight work short: exit code 1
    ├── NotSentError            internal: a stop came before a request left; nothing was sent
    ├── UnavailableError        Redis or PostgreSQL does not answer: wait, then try again
    │   ├── RedisUnavailableError
    │   └── PostgresUnavailableError
    └── ProviderError           a provider answered something other than success
        ├── TransientError      retry with backoff and jitter, bounded attempts
        ├── ThrottledError      slow the account, honour retry_after_s, try again: not a failure
        ├── PairLimitError      resend this recipient later: not a failure
        ├── MarketingCapError   this person got enough marketing today: resend in 24 h, once
        ├── QualityError        pause the campaign and wait for an operator
        ├── PermanentError      fail this recipient, never retry
        │   ├── OptedOutError   the person stopped these messages: fail, and suppress the number
        │   └── BatchTooLargeError  a status gateway refused a batch's size: split, retry
        ├── CampaignFatalError  stop the campaign at once
        ├── ConfigurationError  the endpoint, API version or sender id is wrong: stop the campaign
        └── UncertainOutcomeError  unreadable 2xx: the provider may have accepted it

Foreign exceptions are translated where they enter: the provider adapters turn HTTP statuses,
aiohttp errors and provider codes into ProviderError classes (nothing outside
`blastd.providers` knows a provider's codes), and `blastd.outages` turns the Redis and asyncpg
errors that mean "the server is away" into UnavailableError classes.
"""

from __future__ import annotations

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; listed in the unit's RestartPreventExitStatus


class BlastdError(Exception):
    """Root of every error blastd raises on purpose."""


class ConfigError(BlastdError):
    """A setting is missing or invalid; the message names it."""


class InvalidJobError(BlastdError):
    """A job cannot be accepted; `reason` is the one line that goes to the dead-letter list."""

    def __init__(self, reason: str, job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


class InvalidNumberError(BlastdError):
    """A phone number cannot be normalised to E.164; `reason` is one line for the ledger."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourceError(BlastdError):
    """A recipients file cannot be read; the message names the file and what was expected."""


class DrainTimeoutError(BlastdError):
    """The drain deadline passed with work still running; that work was cancelled."""


class NotSentError(BlastdError):
    """Internal: the campaign or the daemon stopped before this request left; nothing was sent.
    Raised and caught inside one run, never seen outside it."""


class UnavailableError(BlastdError):
    """A server blastd depends on does not answer; `dependency` names it, the cause says why."""

    dependency = "a dependency"


class RedisUnavailableError(UnavailableError):
    dependency = "redis"


class PostgresUnavailableError(UnavailableError):
    dependency = "postgres"


class ProviderError(BlastdError):
    """A provider refused or failed a request. `code` and `text` go into the ledger."""

    error_class = "provider"

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class TransientError(ProviderError):
    error_class = "transient"


class ThrottledError(ProviderError):
    error_class = "throttled"

    def __init__(self, code: str, text: str, retry_after_s: float | None = None) -> None:
        super().__init__(code, text)
        self.retry_after_s = retry_after_s


class PairLimitError(ProviderError):
    error_class = "pair_limit"


class MarketingCapError(ProviderError):
    """The person's cap on marketing messages from all businesses is reached: the recipient
    waits 24 h, once; a second such answer fails it."""

    error_class = "marketing_cap"


class QualityError(ProviderError):
    error_class = "quality"


class PermanentError(ProviderError):
    error_class = "permanent"


class OptedOutError(PermanentError):
    """The recipient turned these messages off: the recipient fails with class 'opted_out' and
    the ledger adds the number to the opt-out list in the same write."""

    error_class = "opted_out"


class BatchTooLargeError(PermanentError):
    """A status gateway refused the contact list as too long: the status runner splits it and
    tries again; to every other caller it is a PermanentError."""


class CampaignFatalError(ProviderError):
    error_class = "campaign_fatal"


class ConfigurationError(ProviderError):
    """The provider says the request went to something that does not exist (a wrong API
    version, sender id or path): no message can succeed until the settings are fixed, and the
    recipient is not at fault."""

    error_class = "configuration"


class UncertainOutcomeError(ProviderError):
    error_class = "uncertain"
