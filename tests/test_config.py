"""Settings: the shipped example is complete and valid; bad values name the setting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from blastd.config import (
    AdminSettings,
    CloudApiAccount,
    Settings,
    VideoSettings,
    load_settings,
)
from blastd.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "blastd.env.example"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("BLASTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    return monkeypatch


def test_example_env_file_documents_every_setting() -> None:
    documented = set(re.findall(r"^#?(BLASTD_[A-Z0-9_]+)=", EXAMPLE.read_text(), re.MULTILINE))
    sections = {"BLASTD_ADMIN", "BLASTD_VIDEO"}
    top_level = {f"BLASTD_{name.upper()}" for name in Settings.model_fields} - sections
    admin = {f"BLASTD_ADMIN__{name.upper()}" for name in AdminSettings.model_fields}
    video = {f"BLASTD_VIDEO__{name.upper()}" for name in VideoSettings.model_fields}
    assert top_level | admin | video <= documented
    example_account = re.search(r"BLASTD_ACCOUNTS='(.*)'", EXAMPLE.read_text())
    assert example_account is not None
    keys = set(re.findall(r'"(\w+)":', example_account.group(1)))
    assert set(CloudApiAccount.model_fields) - {"token", "app_secret", "verify_token"} <= keys


def test_example_env_file_loads_with_secrets_from_credential_files(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "cloud-main.token").write_text("token-from-file\n")
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = load_settings(EXAMPLE)
    token = settings.accounts["cloud-main"].token
    assert token is not None
    assert token.get_secret_value() == "token-from-file"
    assert "token-from-file" in settings.secret_values()


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("BLASTD_CLAIM_PAGE_SIZE", "0", "BLASTD_CLAIM_PAGE_SIZE"),
        ("BLASTD_UNCERTAIN_POLICY", "maybe", "BLASTD_UNCERTAIN_POLICY"),
        ("BLASTD_ADMIN__PORT", "70000", "BLASTD_ADMIN__PORT"),
        ("BLASTD_ACCOUNTS", '{"x": {"kind": "cloud_api"}}', "BLASTD_ACCOUNTS__x__phone_number_id"),
        ("BLASTD_ACCOUNTS", '{"x": {"kind": "smoke_signals"}}', "BLASTD_ACCOUNTS__x"),
        ("BLASTD_ACCOUNTS", '{"x": {"kind": "cloud_api", "phone_number_id": "1"}}',
         "BLASTD_ACCOUNTS__x__token"),
    ],
)  # fmt: skip
def test_bad_setting_stops_start_up_naming_it(
    clean_env: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_settings()


def test_secret_values_never_echo_into_the_error(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(
        "BLASTD_ACCOUNTS", '{"x": {"kind": "cloud_api", "token": "canary-7f3a", "rate_per_s": -1}}'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "canary-7f3a" not in str(caught.value)


def test_misspelt_account_key_is_refused_not_ignored(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(
        "BLASTD_ACCOUNTS",
        '{"x": {"kind": "cloud_api", "phone_number_id": "1", "token": "t", "rate_per_sec": 5}}',
    )
    with pytest.raises(ConfigError, match="BLASTD_ACCOUNTS__x__rate_per_sec"):
        load_settings()


@pytest.mark.parametrize(
    "variable",
    [
        "BLASTD_CLAIM_PAGE_SIZ",
        "BLASTD_ADMIN__PORTT",
        "BLASTD_VIDEO__POLL_INTERVAL",
        "BLASTD_ACCOUNTS__main__rate_per_sec",
        "BLASTD_ACCOUNTS__main__retry__attempt",
    ],
)
def test_unknown_variable_in_the_environment_is_refused_naming_it(
    clean_env: pytest.MonkeyPatch, variable: str
) -> None:
    clean_env.setenv(variable, "5")
    with pytest.raises(ConfigError, match=f"^{variable}: not a blastd setting"):
        load_settings()


@pytest.mark.parametrize(
    "variable",
    [
        "BLASTD_CLAIM_PAGE_SIZE",
        "BLASTD_ADMIN__PORT",
        "BLASTD_VIDEO__POLL_INTERVAL_S",
        "BLASTD_ACCOUNTS__main__rate_per_s",
        "BLASTD_ACCOUNTS__main__retry__attempts",
        "BLASTD_ACCOUNTS__main__batch_sizes__small",
    ],
)
def test_documented_variables_are_not_taken_for_typos(
    clean_env: pytest.MonkeyPatch, variable: str
) -> None:
    clean_env.setenv(variable, "5")
    try:
        load_settings()
        problem = ""
    except ConfigError as exc:  # an account set by parts may be incomplete: not a typo though
        problem = str(exc)
    assert "not a blastd setting" not in problem


def test_missing_env_file_is_an_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.env"
    with pytest.raises(ConfigError, match=f"--env-file {re.escape(str(missing))}: no such file"):
        load_settings(missing)


def test_unknown_region_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BLASTD_DEFAULT_REGION", "XX")
    with pytest.raises(ConfigError, match=r"BLASTD_DEFAULT_REGION: .*'XX' is not a region"):
        load_settings()


def test_region_is_taken_in_either_case(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BLASTD_DEFAULT_REGION", "us")
    assert load_settings().default_region == "US"


def test_redis_url_without_a_redis_scheme_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BLASTD_REDIS_URL", "localhost:6379")
    with pytest.raises(ConfigError, match=r"BLASTD_REDIS_URL: .*redis://"):
        load_settings()


def test_missing_token_names_the_credential_file_looked_for(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    clean_env.setenv("BLASTD_ACCOUNTS", '{"x": {"kind": "cloud_api", "phone_number_id": "1"}}')
    with pytest.raises(ConfigError, match=re.escape(f"nor the file {tmp_path / 'x.token'}")):
        load_settings()


def test_database_password_comes_from_a_credential_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "database.password").write_text("p@ss/word\n")
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    clean_env.setenv("BLASTD_DATABASE_URL", "postgresql://blastd@db.internal:5432/blastd")
    settings = load_settings()
    assert settings.database_url == "postgresql://blastd:p%40ss%2Fword@db.internal:5432/blastd"
    assert "p@ss/word" in settings.secret_values()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BLASTD_REDIS_URL", "redis://127.0.0.1:abc/0"),
        ("BLASTD_DATABASE_URL", "postgresql://blastd@127.0.0.1:xx/blastd"),
        ("BLASTD_DATABASE_URL", "mysql://blastd@127.0.0.1/blastd"),
    ],
)
def test_unusable_server_urls_are_refused_naming_the_setting(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}: "):
        load_settings()
