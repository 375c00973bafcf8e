"""Settings: ``TENANTRY_*`` environment variables, ``.env``, and clear refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from tenantry import Catalog, ConfigurationError, TenantrySettings, load_settings
from tenantry.cli import cli
from tenantry.settings import DEFAULT_CATALOG_URL


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No TENANTRY_* variable from the outside, and an empty working directory."""
    for key in list(os.environ):
        if key.startswith("TENANTRY_") and key != "TENANTRY_TEST_PG_URLS":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults() -> None:
    settings = load_settings()
    assert settings.catalog_url == DEFAULT_CATALOG_URL == "sqlite:///.tenantry/catalog.db"
    assert (settings.pool_size_shared, settings.pool_size_dedicated) == (10, 2)
    assert settings.connect_timeout == 5.0 and settings.tenant_column == "tenant_id"
    assert settings.alembic_config is None


def test_environment_variables_use_the_tenantry_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANTRY_CATALOG_URL", "postgresql://ops@db/catalog")
    monkeypatch.setenv("TENANTRY_POOL_SIZE_SHARED", "7")
    monkeypatch.setenv("TENANTRY_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("CATALOG_URL", "sqlite:///not-prefixed.db")  # ignored
    settings = load_settings()
    assert settings.catalog_url == "postgresql://ops@db/catalog"
    assert (settings.pool_size_shared, settings.connect_timeout) == (7, 2.5)
    # arguments win over the environment
    assert load_settings(pool_size_shared=3).pool_size_shared == 3


def test_move_schemas_are_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().move_schemas == ()  # every application schema
    monkeypatch.setenv("TENANTRY_MOVE_SCHEMAS", "billing, growth,,billing")
    assert load_settings().move_schemas == ("billing", "growth")
    assert load_settings(move_schemas=["ops"]).move_schemas == ("ops",)


def test_dot_env_is_honoured_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    (clean_env / ".env").write_text(
        "TENANTRY_CATALOG_URL=sqlite:///from-dotenv.db\nTENANTRY_MAX_ENGINES=9\nUNRELATED=1\n"
    )
    settings = load_settings()
    assert (settings.catalog_url, settings.max_engines) == ("sqlite:///from-dotenv.db", 9)
    monkeypatch.setenv("TENANTRY_MAX_ENGINES", "11")
    assert load_settings().max_engines == 11


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("connect_timeout", "soon", "valid number"),
        ("connect_timeout", "-1", "greater than 0"),
        ("pool_size_shared", "0", "greater than or equal to 1"),
        ("max_overflow", "many", "valid integer"),
        ("tenant_column", "Tenant ID", "should match pattern"),
        ("catalog_url", "", "at least 1 character"),
        ("statement_timeout", "-0.5", "greater than or equal to 0"),
    ],
)
def test_invalid_values_name_the_field_and_the_reason(
    monkeypatch: pytest.MonkeyPatch, field: str, value: str, reason: str
) -> None:
    monkeypatch.setenv(f"TENANTRY_{field.upper()}", value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert info.value.field == field
    assert message.startswith(f"invalid setting TENANTRY_{field.upper()}: ")
    assert reason in message and "\n" not in message
    assert info.value.__cause__ is None  # the pydantic report is not chained on
    # the same check guards arguments
    monkeypatch.delenv(f"TENANTRY_{field.upper()}")
    with pytest.raises(ConfigurationError, match=reason):
        load_settings(**{field: value})


def test_invalid_dot_env_value_is_refused(clean_env: Path) -> None:
    (clean_env / ".env").write_text("TENANTRY_POOL_TIMEOUT=0\n")
    with pytest.raises(ConfigurationError, match=r"TENANTRY_POOL_TIMEOUT: .*greater than 0"):
        load_settings()


def test_the_cli_reports_an_invalid_setting_on_one_line() -> None:
    result = CliRunner(env={"TENANTRY_CONNECT_TIMEOUT": "-1"}).invoke(cli, ["shard", "list"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == (
        "error: invalid setting TENANTRY_CONNECT_TIMEOUT: Input should be greater than 0\n"
    )


def test_the_cli_and_catalog_use_the_configured_catalog(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    # no --catalog, no setting: the default file under ./.tenantry/
    result = CliRunner().invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert (clean_env / ".tenantry" / "catalog.db").is_file()

    monkeypatch.setenv("TENANTRY_CATALOG_URL", f"sqlite:///{clean_env / 'env.db'}")
    assert CliRunner().invoke(cli, ["init"]).exit_code == 0
    assert (clean_env / "env.db").is_file()
    with Catalog() as catalog:
        assert catalog.url == f"sqlite:///{clean_env / 'env.db'}"
        assert catalog.map_version() == 1
    # --catalog wins over the setting
    assert CliRunner().invoke(cli, ["--catalog", "sqlite:///flag.db", "init"]).exit_code == 0
    assert (clean_env / "flag.db").is_file()


def test_settings_are_frozen_and_hide_the_catalog_password() -> None:
    settings = load_settings(catalog_url="postgresql://ops:S3cretPw@db/catalog")
    with pytest.raises(ValidationError):
        settings.pool_size_shared = 3  # type: ignore[misc]
    assert "S3cretPw" not in repr(settings) and "S3cretPw" not in str(settings)
    assert "postgresql://ops:***@db/catalog" in repr(settings)
    assert settings.catalog_url == "postgresql://ops:S3cretPw@db/catalog"
    assert isinstance(settings, TenantrySettings)


def test_every_field_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in TenantrySettings.model_fields:
        assert f"`TENANTRY_{name.upper()}`" in readme, name
