"""acttail-export: ActTail activation sparsity for LLaMA / Mistral, exported to ONNX Runtime."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ActTailConfig, ProjectionConfig  # noqa: E402
from .errors import ActTailError  # noqa: E402


def get_library_path() -> str:
    """Path of the custom ONNX Runtime operator library (``libacttail_ops.so``).

    Raises ActTailError when the library was not built (see CONTRIBUTING.md).
    """
    from .ops import get_library_path as _get

    return _get()


__all__ = ["ActTailConfig", "ProjectionConfig", "ActTailError", "get_library_path", "__version__"]
