"""One public namespace: ``tenantry.__all__`` is sorted, complete and importable."""

from __future__ import annotations

import ast
import types
from importlib.metadata import version
from pathlib import Path

import tenantry
from tenantry import errors

PACKAGE = Path(tenantry.__file__).parent

#: What users of the shard map reach for; each must be importable from ``tenantry``.
USER_FACING = {
    "Catalog",
    "MapSnapshot",
    "PlacementRing",
    "Shard",
    "ShardState",
    "Tenant",
    "TenantState",
    "Tier",
    "TenantrySettings",
    "load_settings",
    "mask_url",
    "__version__",
}


def test_all_is_sorted_unique_and_importable() -> None:
    names = list(tenantry.__all__)
    assert names == sorted(names)
    assert len(names) == len(set(names))
    for name in names:
        assert getattr(tenantry, name) is not None, name


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(tenantry).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(tenantry.__all__)
    assert set(errors.__all__) <= set(tenantry.__all__)
    assert set(tenantry.__all__) >= USER_FACING
    for name in errors.__all__:
        assert getattr(tenantry, name) is getattr(errors, name)


def test_version_is_the_installed_one() -> None:
    assert tenantry.__version__ == version("tenantry")


def test_typed_package() -> None:
    assert (PACKAGE / "py.typed").is_file()


def test_the_library_never_imports_the_cli() -> None:
    # DESIGN.md: nothing imports cli; shardmap imports neither router nor moves.
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in ("cli", "__main__.py"):  # the CLI and its `python -m` door
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            for module in imported:
                assert not module.startswith("tenantry.cli"), (path, module)
                if relative[0] == "shardmap":
                    assert not module.startswith(("tenantry.router", "tenantry.moves")), (
                        path,
                        module,
                    )
