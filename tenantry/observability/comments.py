"""Statements that say whose they are: sqlcommenter comments on routed statements.

With the ``statement_comments`` setting on, every statement a routed transaction
sends gets a trailing comment in the sqlcommenter format — keys sorted, each value
URL-quoted and then put in single quotes::

    SELECT ... FROM chargers WHERE ... /*route='%2Fcharges',tenant='acme'*/

so that ``pg_stat_activity``, the server log and slow-query logs attribute load to
tenants. ``tenant`` is the tenant the transaction's fence signed (the connection's,
never a value the application passes); ``route`` is what the application set with
:func:`statement_route` (say, in a web framework's dependency or middleware).

Nothing a value holds can end the comment or the statement: URL-quoting leaves only
``A-Z a-z 0-9 _ . - ~`` and ``%XX`` escapes (no quote, ``*``, ``/`` or backslash).
Statements that carry parameters for psycopg (``%s`` placeholders) get the ``%`` of
the escapes doubled, as psycopg reads them back. Limits: PostgreSQL keeps only the
first ``track_activity_query_size`` bytes (1024 by default) of a statement in
``pg_stat_activity``, so a long statement's trailing comment is cut off there; the
fence (the transaction's first statement) is sent without one (it names the tenant
already); and each tenant's statements are different texts to psycopg's prepared
statements (prepared after 5 runs of one text, 100 kept per connection).

Read back (``tenantry top`` reads the tenant from ``pg_stat_activity``) by
:func:`comment_fields` and :func:`tenant_of`, strict in what they accept: only the last
comment, at the very end of the text (a trailing ``;`` and white space allowed), and
only when every pair in it is well formed (a quote or backslash in a value escaped with
a backslash, as the specification allows); anything else reads as no comment, never as
a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import Engine, event

from tenantry.shardmap.model import NAME_PATTERN

__all__ = [
    "comment_fields",
    "current_route",
    "install_comments",
    "sqlcomment",
    "statement_route",
    "tenant_of",
]

# A ContextVar: the route follows the request's code (threads, asyncio tasks).
_route: ContextVar[str | None] = ContextVar("tenantry_statement_route", default=None)

#: The longest route kept (characters, before quoting): the comment stays short.
MAX_ROUTE = 200


@contextmanager
def statement_route(route: str | None) -> Iterator[None]:
    """Name the application's route (``/charges``) in the comments of the statements
    routed inside the block: ``with statement_route("/charges"): ...``."""
    token = _route.set(route[:MAX_ROUTE] if route is not None else None)
    try:
        yield
    finally:
        _route.reset(token)


def current_route() -> str | None:
    """The route :func:`statement_route` set for the code running now, if any."""
    return _route.get()


def sqlcomment(**values: str | None) -> str:
    """``/*key='value',...*/`` in the sqlcommenter format: keys sorted, keys and values
    URL-quoted (nothing left that could end the comment), values in single quotes;
    None values left out; empty string for no values."""
    items = [
        f"{quote(key, safe='')}='{quote(value, safe='')}'"
        for key, value in sorted(values.items())
        if value is not None
    ]
    return f"/*{','.join(items)}*/" if items else ""


def install_comments(engine: Engine, tenant_key: str) -> None:
    """Comment every statement *engine* sends in a routed transaction: one whose
    connection's ``info[tenant_key]`` holds the tenant the fence signed."""
    percent = engine.dialect.paramstyle in ("format", "pyformat")

    def comment(
        conn: Any, _cursor: Any, statement: str, parameters: Any, context: Any, _many: bool
    ) -> tuple[str, Any]:
        tenant = conn.info.get(tenant_key)
        if tenant is None:
            return statement, parameters
        text = sqlcomment(route=_route.get(), tenant=tenant)
        if percent and parameters is not None and not getattr(context, "no_parameters", False):
            text = text.replace("%", "%%")  # psycopg reads "%%" back as "%"
        return with_comment(statement, text), parameters

    event.listen(engine, "before_cursor_execute", comment, retval=True)


def with_comment(statement: str, comment: str) -> str:
    """*statement* with *comment* at its end (before a final semicolon; on a line of its
    own after a ``--`` comment, which would swallow it). A statement that ends with a
    comment already (sqlcommenter's own rule) is left as it is."""
    body = statement.rstrip()
    if body.endswith("*/"):
        return statement
    end = ""
    if body.endswith(";"):
        body, end = body[:-1].rstrip(), ";"
    separator = "\n" if "--" in body.rpartition("\n")[2] else " "
    return f"{body}{separator}{comment}{end}"


#: The final comment of a statement: ``/* ... */`` then only white space or ``;``.
_TRAILING = re.compile(r"/\*((?:(?!\*/).)*)\*/[\s;]*\Z", re.DOTALL)
#: One ``key='value'`` pair, the value's quotes and backslashes escaped.
_PAIR = re.compile(r"\s*([^\s=',]+)='((?:[^'\\]|\\.)*)'\s*(?:,|\Z)", re.DOTALL)
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
    return tenant if tenant is not None and NAME_PATTERN.fullmatch(tenant) else None
