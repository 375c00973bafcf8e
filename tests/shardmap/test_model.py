"""The shard map's value objects: naming rule, URLs, and what their reprs show."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from tenantry import (
    InvalidShardName,
    InvalidShardUrl,
    InvalidTenantId,
    MapSnapshot,
    Shard,
    ShardState,
    Tenant,
    Tier,
    mask_url,
)
from tenantry.moves.replication import source_conninfo
from tenantry.shardmap import validate_shard_name, validate_tenant_id
from tenantry.shardmap.model import normalize_url
from tenantry.urls import libpq_conninfo

RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@given(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True))
def test_ids_following_the_rule_are_accepted(tenant_id: str) -> None:
    assert validate_tenant_id(tenant_id) == tenant_id
    assert validate_shard_name(tenant_id) == tenant_id


@given(st.text(max_size=70))
def test_ids_breaking_the_rule_are_refused(text: str) -> None:
    # DESIGN.md's rule, anchored at both ends: "acme\n" is not "acme".
    if RULE.fullmatch(text):
        assert validate_tenant_id(text) == text
    else:
        with pytest.raises(InvalidTenantId) as info:
            validate_tenant_id(text)
        assert info.value.tenant_id == text
        with pytest.raises(InvalidShardName):
            validate_shard_name(text)


@pytest.mark.parametrize("value", [None, 42, b"acme", ["acme"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidTenantId):
        validate_tenant_id(value)


def test_error_message_quotes_the_id_on_one_line() -> None:
    with pytest.raises(InvalidTenantId) as info:
        validate_tenant_id("'; drop table x; --\n")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith('invalid tenant id "\'; drop table x; --\\n": use 1 to 63')


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("postgres://u:pw@db:5432/app", "postgresql+psycopg://u:pw@db:5432/app"),
        ("postgresql://u@db/app", "postgresql+psycopg://u@db/app"),
        ("postgresql+psycopg2://u@db/app", "postgresql+psycopg://u@db/app"),
        # relative: made absolute (against the working directory) when registered
        ("sqlite:///rel/shard.db", f"sqlite:///{os.path.abspath('rel/shard.db')}"),
        ("sqlite:////abs/shard.db", "sqlite:////abs/shard.db"),
    ],
)
def test_urls_are_normalised_keeping_the_password(url: str, normal: str) -> None:
    assert normalize_url(url) == normal


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "not a database URL"),
        ("db.example.com", "not a database URL"),
        ("mysql://u:S3cretPw@db/app", "'mysql' databases are not supported"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("postgresql://u:S3cretPw@db:5432", "names no database"),
    ],
)
def test_unusable_urls_are_refused_without_the_password(url: str, reason: str) -> None:
    with pytest.raises(InvalidShardUrl, match=reason) as info:
        normalize_url(url)
    assert "S3cretPw" not in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:S3cretPw@db/app", "postgresql://u:***@db/app"),
        ("postgresql+psycopg://u@db/app", "postgresql+psycopg://u@db/app"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("weird://u:S3cretPw@@@", "weird://u:***@"),
        ("postgresql://u:Pw@Tail9@db/app", "postgresql://u:***@db/app"),
        ("no scheme S3cretPw", "***"),
        ("://S3cretPw", "://***"),
    ],
)
def test_mask_url_hides_passwords_even_in_garbage(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "S3cretPw" not in mask_url(url)


@pytest.mark.parametrize(
    ("url", "extra", "conninfo"),
    [
        (
            "postgresql+psycopg://u:p%20w'x@db:6432/app?sslmode=require",
            {"application_name": "a"},
            "host=db port=6432 user=u password='p w\\'x' dbname=app sslmode=require"
            " application_name=a",
        ),
        ("postgresql://db/app", {"connect_timeout": None}, "host=db dbname=app"),
    ],
)
def test_libpq_conninfo_keeps_every_part_libpq_needs(
    url: str, extra: dict[str, object], conninfo: str
) -> None:
    assert libpq_conninfo(url, **extra) == conninfo
    assert conninfo_to_dict(libpq_conninfo(url, **extra)).get("password") == (
        "p w'x" if "p%20w" in url else None
    )


def test_the_subscription_conninfo_leaves_the_clients_query_parameters_out() -> None:
    url = "postgresql+psycopg://u:pw@db:5433/app?sslmode=verify-full&sslrootcert=/home/op/ca.pem"
    assert conninfo_to_dict(source_conninfo(url)) == {
        "host": "db",
        "port": "5433",
        "user": "u",
        "password": "pw",
        "dbname": "app",
    }


def test_shard_repr_and_str_hide_both_passwords() -> None:
    shard = Shard(
        "s1",
        "postgresql+psycopg://app:S3cretPw@db/app",
        admin_url="postgresql+psycopg://owner:AdminPw9@db/app",
    )
    for text in (repr(shard), str(shard), f"{shard}", repr([shard]), repr({"s": shard})):
        assert "S3cretPw" not in text and "AdminPw9" not in text
    assert repr(shard) == (
        "Shard(name='s1', url='postgresql+psycopg://app:***@db/app', tier='shared', "
        "state='active', weight=1)"
    )
    # the values themselves are intact: tenantry needs them to connect
    assert "S3cretPw" in shard.url and shard.operations_url == shard.admin_url
    assert Shard("s2", "sqlite:///x.db").operations_url == "sqlite:///x.db"
    assert "AdminPw9" not in repr(MapSnapshot(1, {"s1": shard}, {}))


def test_value_objects_are_frozen_and_compare_without_timestamps() -> None:
    from datetime import UTC, datetime

    shard = Shard("s1", "sqlite:///x.db")
    tenant = Tenant("acme", "s1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        shard.weight = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        tenant.shard = "s2"  # type: ignore[misc]
    assert dataclasses.replace(tenant, created_at=datetime.now(UTC)) == tenant
    assert (tenant.tier, tenant.pinned, shard.tier, shard.state) == (
        Tier.SHARED,
        False,
        Tier.SHARED,
        ShardState.ACTIVE,
    )
    assert Tier("dedicated") is Tier.DEDICATED and str(Tier.SHARED) == "shared"
    assert shard.backend == "sqlite"
    assert Shard("p", "postgresql+psycopg://u@h/d").backend == "postgresql"
