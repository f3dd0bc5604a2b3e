"""Every exception blastd raises.

    BlastdError
    ├── ConfigError             bad settings: start-up stops with exit code 78
    ├── InvalidJobError         a job that cannot be accepted: dead-lettered with its reason
    ├── InvalidNumberError      a number that is not a valid phone number: recorded as skipped
    ├── SourceError             a recipients file for `blastd enqueue` cannot be read
    └── ProviderError           a provider answered something other than success
        ├── TransientError      retry with backoff and jitter, bounded attempts
        ├── ThrottledError      slow the account, honour retry_after_s, try again: not a failure
        ├── PairLimitError      resend this recipient later: not a failure
        ├── QualityError        pause the campaign and wait for an operator
        ├── PermanentError      fail this recipient, never retry
        ├── CampaignFatalError  stop the campaign at once
        └── UncertainOutcomeError  unreadable 2xx: the provider may have accepted it

The provider adapters translate HTTP statuses and provider codes into these classes; nothing
outside `blastd.providers` knows a provider's codes.
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


class QualityError(ProviderError):
    error_class = "quality"


class PermanentError(ProviderError):
    error_class = "permanent"


class CampaignFatalError(ProviderError):
    error_class = "campaign_fatal"


class UncertainOutcomeError(ProviderError):
    error_class = "uncertain"
