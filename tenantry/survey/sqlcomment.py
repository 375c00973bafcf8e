"""Reading the sqlcommenter comment at the end of a statement.

tenantry can append a comment in the sqlcommenter format to routed statements, e.g.
``SELECT ... /*route='%2Fcharges',tenant='acme'*/``: keys sorted, each ``key='value'``
with the key and value URL-quoted, a quote or backslash in the value escaped with a
backslash, pairs separated by commas. ``tenantry top`` reads the tenant back from the
statements ``pg_stat_activity`` shows. The parser is strict in what it accepts: only
the last comment, at the very end of the text (a trailing ``;`` and white space
allowed), and only when every pair in it is well formed; anything else reads as no
comment, never as a guess.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["comment_fields", "tenant_of"]

#: The final comment of a statement: ``/* ... */`` then only white space or ``;``.
_TRAILING = re.compile(r"/\*((?:(?!\*/).)*)\*/[\s;]*\Z", re.DOTALL)
#: One ``key='value'`` pair, the value's quotes and backslashes escaped.
_PAIR = re.compile(r"\s*([^\s=',]+)='((?:[^'\\]|\\.)*)'\s*(?:,|\Z)", re.DOTALL)
#: What a tenant id may be (tenantry.shardmap.model's rule).
_TENANT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_ESCAPED = re.compile(r"\\(.)", re.DOTALL)


def comment_fields(statement: str) -> dict[str, str]:
    """The key-value pairs of *statement*'s trailing sqlcommenter comment, unquoted;
    empty when it has none or the comment is not in that format."""
    found = _TRAILING.search(statement)
    if found is None:
        return {}
    body = found.group(1).strip()
    if body.endswith(","):
        return {}
    fields: dict[str, str] = {}
    position = 0
    while position < len(body):
        pair = _PAIR.match(body, position)
        if pair is None:
            return {}  # not sqlcommenter: a comment of the application's own
        key = unquote(pair.group(1))
        value = unquote(_ESCAPED.sub(r"\1", pair.group(2)))
        fields[key] = value
        position = pair.end()
    return fields


def tenant_of(statement: str) -> str | None:
    """The tenant a statement's trailing comment names, when it is a valid tenant id."""
    tenant = comment_fields(statement).get("tenant")
    return tenant if tenant is not None and _TENANT_ID.fullmatch(tenant) else None
