"""One public namespace: ``tenantry.__all__`` is sorted, complete and importable; and
the import graph of the package runs downhill only (DESIGN.md, "Layout")."""

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


# -- no import runs uphill (DESIGN.md, "Layout") ----------------------------------------------

#: The floors, from the bottom: a module may import its own floor and those below,
#: never one above. The longest matching prefix names a module's floor.
LAYERS: dict[str, int] = {
    "tenantry.errors": 0,
    "tenantry.settings": 0,
    "tenantry.urls": 0,
    "tenantry.lazy": 0,  # packages that export their names on first use
    "tenantry.shardmap": 1,  # with tenantry's own Alembic scripts and the role check
    "tenantry.router": 2,
    "tenantry.observability": 2,  # metrics, traces, comments: routers, moves, migrations use it
    "tenantry.migrations": 3,
    "tenantry.moves": 4,
    "tenantry.rebalance": 5,  # rebalancing runs moves; no move needs it
    "tenantry.survey": 5,  # status and top read the catalog, the journal, the shards
    "tenantry.demo": 5,  # the sample app uses the library, nothing uses it
    "tenantry": 5,  # the package's public face re-exports the library, never the CLI
    "tenantry.cli": 6,
    "tenantry.__main__": 6,
    "tenantry.testing": 6,  # throwaway servers for tests and benchmarks only
}

#: Uphill edges (importer, imported) still to fix. Empty: every one is fixed; a new
#: uphill import fails the test below.
UPHILL_ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int:
    prefix = module
    while prefix not in LAYERS:
        prefix, _, _ = prefix.rpartition(".")
        assert prefix, f"{module} is on no floor: add it to LAYERS"
    return LAYERS[prefix]


def _imports(module: str, tree: ast.AST, *, is_package: bool, modules: set[str]) -> set[str]:
    """Every tenantry module *module* imports, wherever the import is (module level, in
    functions, under TYPE_CHECKING), with the packages whose ``__init__`` that runs."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                if not is_package:
                    package.pop()
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    edges = set()
    for imported in found:
        if imported != "tenantry" and not imported.startswith("tenantry."):
            continue
        edges.add(imported)
        # Importing a.b.c runs a.b's __init__ first, unless the importer is inside a.b.
        # (The root package is every module's parent; what it imports is checked as its
        # own module.)
        parts = imported.split(".")
        for end in range(2, len(parts)):
            package = ".".join(parts[:end])
            if not f"{module}.".startswith(f"{package}."):
                edges.add(package)
    edges.discard(module)
    return edges


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the tenantry modules it imports, for every ``.py`` file under *root*
    (Alembic scripts and ``env.py`` files included)."""
    paths = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    return {
        module: _imports(
            module,
            ast.parse(path.read_text(), str(path)),
            is_package=path.name == "__init__.py",
            modules=set(paths),
        )
        for module, path in paths.items()
    }


def uphill_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) where the imported module is on a higher floor."""
    return {
        (module, imported)
        for module, imports in graph.items()
        for imported in imports
        if _layer(imported) > _layer(module)
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two modules or more (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_runs_uphill() -> None:
    uphill = uphill_edges(import_graph())
    assert uphill <= UPHILL_ALLOWED, sorted(uphill - UPHILL_ALLOWED)
    # Once fixed, an edge leaves the allow-list too.
    assert not UPHILL_ALLOWED - uphill, sorted(UPHILL_ALLOWED - uphill)


def test_no_import_cycle() -> None:
    assert not import_cycles(import_graph())


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_ones_private_names() -> None:
    # What another module needs is public: a private helper is its own module's business.
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if not (node.level or module == "tenantry" or module.startswith("tenantry.")):
                    continue
                names = [*module.split("."), *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [
                    part
                    for alias in node.names
                    if alias.name.startswith("tenantry.")
                    for part in alias.name.split(".")
                ]
            else:
                continue
            if any(_private(name) for name in names):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, found


def test_the_import_checks_see_every_kind_of_import() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import model\n"
        "from .keys import install_key\n"
        "if TYPE_CHECKING:\n"
        "    from tenantry.router.router import Router\n"
        "def f():\n"
        "    from tenantry.migrations.rls import install_rls\n"
        "    import tenantry.moves\n"
    )
    modules = set(import_graph())
    found = _imports(
        "tenantry.shardmap.catalog", ast.parse(source), is_package=False, modules=modules
    )
    assert found == {
        "tenantry.shardmap.model",
        "tenantry.shardmap.keys",
        "tenantry.router",
        "tenantry.router.router",
        "tenantry.migrations",
        "tenantry.migrations.rls",
        "tenantry.moves",
    }
    graph = {"tenantry.shardmap.catalog": found, "tenantry.moves": {"tenantry.shardmap.catalog"}}
    assert ("tenantry.shardmap.catalog", "tenantry.migrations.rls") in uphill_edges(graph)
    assert import_cycles(graph) == [["tenantry.moves", "tenantry.shardmap.catalog"]]
