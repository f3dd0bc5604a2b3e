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
