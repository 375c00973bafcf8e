"""The sqlcommenter comment read back: what routers write (``sqlcomment``) is read back
exactly; anything else is no comment, never a guess."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tenantry.observability.comments import comment_fields, sqlcomment, tenant_of


@given(
    st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=30), min_size=1),
    st.sampled_from(["", ";", " ", "\n;  "]),
)
def test_what_is_written_is_read_back(fields, tail):
    assert comment_fields(f"SELECT * FROM t WHERE a = $1 {sqlcomment(**fields)}{tail}") == fields


def test_the_tenant_of_a_routed_statement():
    assert tenant_of("SELECT 1 /*route='%2Fcharges',tenant='acme'*/") == "acme"
    assert tenant_of("UPDATE t SET a = 1 /*tenant='acme-2_b'*/;") == "acme-2_b"
    # An escaped quote inside a value does not end it.
    assert comment_fields(r"SELECT 1 /*route='it\'s',tenant='a'*/") == {
        "route": "it's",
        "tenant": "a",
    }


def test_anything_else_is_no_comment():
    for statement in (
        "SELECT 1",
        "SELECT 1 /* a comment of the application */",
        "/*tenant='acme'*/ SELECT 1",  # not at the end
        "SELECT 1 /*tenant='acme'*/ FROM t",
        "SELECT '/*tenant=''acme''*/'",
        "SELECT 1 /*tenant='acme',*/",
        "SELECT 1 /*tenant=acme*/",
        "SELECT 1 /*tenant='acme'",  # truncated by track_activity_query_size
    ):
        assert tenant_of(statement) is None, statement
    # Well formed, but not a tenant id.
    assert tenant_of("SELECT 1 /*tenant='Acme%20Inc'*/") is None
    assert comment_fields("SELECT 1 /*tenant='Acme%20Inc'*/") == {"tenant": "Acme Inc"}
