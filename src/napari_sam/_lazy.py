"""Names of a package resolved on first use (PEP 562), so that importing the package
pulls in none of its heavy dependencies: napari imports every plugin's package to read
its manifest, and the CLI should start without loading torch for ``napari-sam models``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_names"]


def lazy_names(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package`` for ``names``.

    Parameters
    ----------
    package
        The package's ``__name__``.
    names
        Public name -> the module that defines it: absolute (``"napari_sam.core.models"``)
        or relative to the package (``"dataset"``).
    """

    def __getattr__(name: str) -> object:
        if name in names:
            module = names[name]
            return getattr(importlib.import_module(module if "." in module else f"{package}.{module}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(names) | {"__doc__", "__name__", "__path__"})

    return __getattr__, __dir__
