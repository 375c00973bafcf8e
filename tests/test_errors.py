"""The error tree: drawn in the module docstring, and each error carries its context."""

from __future__ import annotations

import re

import pytest

from tenantry import errors
from tenantry.errors import (
    AlreadyExists,
    CatalogError,
    CatalogNotInitialized,
    CatalogUnavailable,
    ConfigurationError,
    InvalidName,
    InvalidShardName,
    InvalidShardUrl,
    InvalidTenantId,
    LookupFailed,
    NoSharedShard,
    PlacementError,
    ShardExists,
    ShardNotActive,
    ShardOccupied,
    ShardUnavailable,
    TenantExists,
    TenantryError,
    TierMismatch,
    UnknownShard,
    UnknownTenant,
)

#: One line of the drawing: "│   " or "    " per ancestor level, a branch, the class.
LINE = re.compile(r"^(?P<lead>(?:│   |    )*)(?P<branch>(?:├|└)── )?(?P<name>[A-Z]\w+)")
#: Extra standard bases, drawn after the name: "InvalidName (ValueError)".
BASES = re.compile(r"\s*\((?P<bases>[\w, ]+)\)")


def drawn_tree() -> dict[str, tuple[str | None, list[str]]]:
    """Each class in the docstring's tree -> (its parent in the drawing, extra bases)."""
    assert errors.__doc__ is not None
    lines = [line for line in errors.__doc__.splitlines() if line.startswith("    ")]
    tree: dict[str, tuple[str | None, list[str]]] = {}
    stack: list[tuple[int, str]] = []
    for line in lines:
        text = line[4:]
        match = LINE.match(text)
        assert match, line
        depth = len(match["lead"]) // 4 + (1 if match["branch"] else 0)
        extra = BASES.match(text, match.end())
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parent = stack[-1][1] if stack else None
        tree[match["name"]] = (parent, extra["bases"].split(", ") if extra else [])
        stack.append((depth, match["name"]))
    return tree


def test_the_docstring_tree_lists_exactly_the_public_errors() -> None:
    tree = drawn_tree()
    assert set(tree) == set(errors.__all__)
    assert list(errors.__all__) == sorted(errors.__all__)


def test_the_docstring_tree_matches_the_classes() -> None:
    builtins = {"ValueError": ValueError, "LookupError": LookupError}
    for name, (parent, extra) in drawn_tree().items():
        cls = getattr(errors, name)
        assert isinstance(cls, type) and issubclass(cls, Exception)
        if parent is None:
            assert cls is TenantryError
        else:
            assert getattr(errors, parent) in cls.__bases__, (name, parent)
        for base in extra:
            assert issubclass(cls, builtins[base]), (name, base)


def test_every_error_is_a_tenantry_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), TenantryError)
    # callers catch the standard meanings too
    assert issubclass(InvalidTenantId, ValueError) and issubclass(UnknownShard, LookupError)


@pytest.mark.parametrize(
    ("error", "context"),
    [
        (UnknownTenant("acme"), {"tenant_id": "acme"}),
        (UnknownShard("s1"), {"shard": "s1"}),
        (TenantExists("acme", "s1"), {"tenant_id": "acme", "shard": "s1"}),
        (ShardExists("s1"), {"shard": "s1"}),
        (InvalidTenantId("Acme"), {"tenant_id": "Acme", "value": "Acme"}),
        (InvalidShardName("S1"), {"shard": "S1", "value": "S1"}),
        (InvalidShardUrl("bad", shard="s1"), {"shard": "s1"}),
        (ShardUnavailable("down", shard="s1"), {"shard": "s1"}),
        (ConfigurationError("bad", field="pool_size_shared"), {"field": "pool_size_shared"}),
        (PlacementError("no", tenant_id="acme", shard="s1"), {"tenant_id": "acme", "shard": "s1"}),
        (TierMismatch("no", tenant_id="acme", shard="d1"), {"tenant_id": "acme", "shard": "d1"}),
        (ShardOccupied("no", tenant_id="acme", shard="d1"), {"tenant_id": "acme", "shard": "d1"}),
        (ShardNotActive("no", tenant_id="acme", shard="s1"), {"tenant_id": "acme", "shard": "s1"}),
        (NoSharedShard("no", tenant_id="acme"), {"tenant_id": "acme", "shard": None}),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else "",
)
def test_errors_carry_their_context(error: TenantryError, context: dict[str, object]) -> None:
    for attribute, value in context.items():
        assert getattr(error, attribute) == value
    message = str(error)
    assert message and "\n" not in message


def test_messages_say_what_to_do_next() -> None:
    assert "tenantry tenant add acme" in str(UnknownTenant("acme"))
    assert "tenantry shard list" in str(UnknownShard("s1"))
    assert "choose another name" in str(ShardExists("s1"))
    assert "on shard 's1'" in str(TenantExists("acme", "s1"))
    assert "1 to 63 characters" in str(InvalidTenantId("Acme"))


def test_intermediate_classes_catch_their_families() -> None:
    for error in (UnknownTenant("a"), UnknownShard("s")):
        with pytest.raises(LookupFailed):
            raise error
    for error in (TenantExists("a", "s"), ShardExists("s")):
        with pytest.raises(AlreadyExists):
            raise error
    for error in (InvalidTenantId("A"), InvalidShardName("S")):
        with pytest.raises(InvalidName):
            raise error
    for error in (CatalogUnavailable("x"), CatalogNotInitialized("x")):
        with pytest.raises(CatalogError):
            raise error
    with pytest.raises(PlacementError):
        raise ShardOccupied("x")
