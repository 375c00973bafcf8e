"""Packages that export names lazily (PEP 562): a name's module is imported when the
name is first used, so importing a package (and the CLI's start-up) loads only what
is asked for. Each such package lists its names under ``if TYPE_CHECKING:`` too, for
type checkers and readers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["exports", "lazy_module"]


def exports(*groups: tuple[str, Iterable[str]]) -> dict[str, str]:
    """``{name: module}`` from ``(module, names)`` pairs."""
    return {name: module for module, names in groups for name in names}


def lazy_module(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for *names* (``{name: module}``): a
    name is imported from its module on first use and kept in the package."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
