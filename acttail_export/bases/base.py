"""The interface every export base implements (:class:`ExportBase`), and what the bases share.

A base turns the loaded, calibrated model into the ONNX files of the export: it builds its decoder graph,
applies the ActTail rewrite (:func:`acttail_export.graph_rewrite.rewrite`) and writes everything the folder
needs into the temporary output folder. :func:`acttail_export.exporter.export` does every other step (checks,
load, 4-bit quantization, analysis, allocation, calibration, validation, model card, atomic rename) and calls
the base chosen by ``ExportOptions.base`` through this interface only.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ActTailConfig
    from ..options import ExportOptions

logger = logging.getLogger(__name__)

#: distributions every export records in ``acttail_config.json`` (``versions``)
COMMON_DISTRIBUTIONS = ("acttail-export", "torch", "transformers", "onnx", "onnxruntime",
                        "huggingface_hub", "numpy")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of :data:`COMMON_DISTRIBUTIONS` and ``extra`` (missing ones left out)."""
    import importlib.metadata as md

    out = {}
    for dist in (*COMMON_DISTRIBUTIONS, *extra):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


class ExportBase(ABC):
    """One way of building the decoder graph; registered by name in :data:`acttail_export.bases.BASES`."""

    #: the ``--base`` value
    name: str = ""
    #: True when ``--weights int4`` can be written on this base
    supports_int4: bool = False
    #: distributions recorded in ``acttail_config.json`` besides :data:`COMMON_DISTRIBUTIONS`
    extra_distributions: tuple[str, ...] = ()

    def check_options(self, options: ExportOptions) -> None:
        """Value checks of ``options`` that depend on the base (no imports of heavy modules, no I/O).

        Called from :class:`~acttail_export.options.ExportOptions` validation; raises a one-line ActTailError.
        """

    def check(self, options: ExportOptions) -> None:
        """Checks of this machine before anything is loaded or written (the last of the cheap checks)."""

    @abstractmethod
    def build(self, model: Any, tokenizer: Any, tmp: Path, config: ActTailConfig, options: ExportOptions,
              quantized: dict | None, library: str | None) -> None:
        """Write the rewritten graph and the files that load with it into ``tmp``.

        ``model`` / ``tokenizer`` are loaded and ``config`` is calibrated; ``quantized`` holds the 4-bit weights
        of ``--weights int4`` (None for float weights); ``library`` is the op library for the fused kernel.
        ``acttail_config.json`` is written by the caller afterwards.
        """

    def versions(self) -> dict[str, str]:
        """Versions recorded in ``acttail_config.json``."""
        return library_versions(self.extra_distributions)

    def max_eval_length(self, folder: Path) -> int | None:
        """The longest window the built graph evaluates (None: the model's context)."""
        return None

    def finalize(self, card: Path, options: ExportOptions, repo_id: str | None) -> None:
        """Last touches once the model card ``card`` is written (e.g. a usage section for this base)."""
