"""``--base optimum``: optimum-onnx's trace of the PyTorch model, then the ActTail rewrite.

Needs the ``optimum`` extra (``pip install 'acttail-export[optimum]'``): optimum-onnx 0.1.0 pins transformers 4.57,
so this base lives in an environment of its own (the default ``genai`` base needs transformers >= 5).

Loads with :func:`acttail_export.runtime.load_model` or ``ORTModelForCausalLM``; ``--weights int4`` puts the
4-bit ops in (:mod:`acttail_export.int4_rewrite`). The lower-level steps live in
:mod:`acttail_export.onnx_export`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ActTailError
from .base import ExportBase

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ActTailConfig
    from ..options import ExportOptions

logger = logging.getLogger(__name__)

#: files of the base export copied next to the rewritten graph
COPIED_FILES = ("config.json", "generation_config.json")


def check_optimum() -> None:
    """One-line ActTailError naming the fix when optimum-onnx's exporter does not import here."""
    try:
        import optimum.exporters.onnx  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - not installed, or a transformers it does not support
        raise ActTailError(f"--base optimum needs optimum-onnx ({type(exc).__name__}: {str(exc)[:100]}): pip install "
                           "'acttail-export[optimum]' in an environment of its own (it pins transformers 4.57), or use "
                           "the default --base genai") from None


class OptimumBase(ExportBase):
    """optimum-onnx base graph (``text-generation-with-past``) -> rewrite -> ``model.onnx`` + tokenizer."""

    name = "optimum"
    supports_int4 = True
    extra_distributions = ("optimum", "optimum-onnx")

    def check(self, options: ExportOptions) -> None:
        check_optimum()

    def build(self, model: Any, tokenizer: Any, tmp: Path, config: ActTailConfig, options: ExportOptions,
              quantized: dict | None, library: str | None) -> None:
        from ..exporter import _stage
        from ..onnx_export import export_base_onnx

        base_dir = tmp / ".base"
        with _stage("base ONNX export"):
            base = export_base_onnx(model, base_dir, dtype=options.dtype, device=options.device)
        with _stage("graph rewrite"):
            self.rewrite(base, tmp / "model.onnx", config, options, quantized)
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        shutil.rmtree(base_dir)
        tokenizer.save_pretrained(tmp)
        if library is not None:  # under the name the runtime looks for, whatever the source file is called
            from ..genai_base import copy_library

            copy_library(tmp, library)

    @staticmethod
    def rewrite(base: Path, target: Path, config: ActTailConfig, options: ExportOptions,
                quantized: dict | None) -> Path:
        """The ActTail rewrite of the base graph ``base`` (and the 4-bit ops when ``quantized``) into ``target``."""
        from ..graph_rewrite import rewrite
        from ..onnx_export import rewrite_onnx

        mode, kernel = options.mode, options.kernel
        if quantized is None:
            return rewrite_onnx(base, target, lambda graph: rewrite(graph, config, mode=mode, kernel=kernel))
        from ..int4_rewrite import rewrite_int4, rewrite_onnx_int4

        return rewrite_onnx_int4(base, target, lambda graph: (rewrite(graph, config, mode=mode, kernel=kernel),
                                                              rewrite_int4(graph, config, quantized)),
                                 loaded=_lm_head_edit(config))


def _lm_head_edit(config: ActTailConfig):
    """The 8-bit lm_head edit of ``config.lm_head == "int8"`` (on the graph with its weights loaded), else None."""
    if config.lm_head != "int8":
        return None
    from ..lm_head import rewrite_lm_head

    return rewrite_lm_head
