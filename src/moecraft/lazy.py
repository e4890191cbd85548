"""Names a package re-exports from its modules, imported on first use (PEP 562 module ``__getattr__``).

A package whose ``__init__`` imported its heavy modules (torch, transformers) would import them for anyone
importing one of its light modules (a config dataclass), and so for every ``moecraft --help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that resolve each name of ``modules`` (module -> names)
    from its module when first asked for; ``from package import name`` works as with an eager import."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(where[name]), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *where})

    return __getattr__, __dir__
