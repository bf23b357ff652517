"""Export bases: one module per way of building the decoder graph, behind :class:`~.base.ExportBase`.

``ExportOptions.base`` picks one from :data:`BASES`. A new base is one new module here with an ``ExportBase``
subclass and one line in :data:`BASES` (CONTRIBUTING.md, "Add a base").
"""

from __future__ import annotations

from ..errors import ActTailError
from .base import ExportBase, library_versions
from .genai import GenaiBase
from .optimum import OptimumBase

#: ``--base`` value -> the base that builds it
BASES: dict[str, ExportBase] = {
    "optimum": OptimumBase(),
    "genai": GenaiBase(),
}


def get_base(name: str) -> ExportBase:
    """The registered base called ``name`` (one-line ActTailError naming the registered ones otherwise)."""
    if not isinstance(name, str) or name not in BASES:
        raise ActTailError(f"--base must be one of {', '.join(BASES)}; got {name!r}")
    return BASES[name]


__all__ = ["BASES", "ExportBase", "GenaiBase", "OptimumBase", "get_base", "library_versions"]
