"""The custom ONNX Runtime op library (``libacttail_ops.so``): where it is and how to register it.

The library provides ``com.acttail::SparseMatMul`` (``Y = mask(X) @ W``) on the CPU execution
provider and, when built with CUDA, on the CUDA execution provider. Build it with ``make ops``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import ActTailError

logger = logging.getLogger(__name__)

DOMAIN = "com.acttail"
OP_TYPE = "SparseMatMul"
LIBRARY_NAME = "libacttail_ops.so"
ENV_LIBRARY = "ACTTAIL_OPS_LIBRARY"
_PACKAGE_LIB = Path(__file__).resolve().parent / "lib" / LIBRARY_NAME


def get_library_path() -> str:
    """Path of the built op library: ``acttail_export/lib/`` first, then ``$ACTTAIL_OPS_LIBRARY``."""
    if _PACKAGE_LIB.is_file():
        return str(_PACKAGE_LIB)
    env = os.environ.get(ENV_LIBRARY)
    if env:
        if Path(env).is_file():
            return str(Path(env).resolve())
        raise ActTailError(f"{ENV_LIBRARY}={env} does not exist: build the op library with `make ops` or fix the variable")
    raise ActTailError(f"the custom op library {LIBRARY_NAME} is not built: run `make ops` (or set {ENV_LIBRARY})")


def session_options(sess_options=None):
    """Return ``sess_options`` (or new ``onnxruntime.SessionOptions``) with the op library registered."""
    import onnxruntime as ort

    options = sess_options if sess_options is not None else ort.SessionOptions()
    path = get_library_path()
    try:
        options.register_custom_ops_library(path)
    except Exception as exc:  # ORT raises a generic error type for a library it cannot load
        raise ActTailError(f"onnxruntime could not load {path} ({exc}); rebuild it with `make ops`") from exc
    logger.debug("registered custom op library %s", path)
    return options


def cuda_available() -> bool:
    """True when onnxruntime has the CUDA execution provider AND a CUDA device can run a session."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    return _cuda_session_works()


_CUDA_OK: bool | None = None


def _cuda_session_works() -> bool:
    """Run a 1x1 MatMul on the CUDA EP once; cached. False when no device is usable."""
    global _CUDA_OK
    if _CUDA_OK is None:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["C"])], "probe",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 1]), helper.make_tensor_value_info("B", TensorProto.FLOAT, [1, 1])],
            [helper.make_tensor_value_info("C", TensorProto.FLOAT, [1, 1])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
            one = np.ones((1, 1), np.float32)
            _CUDA_OK = "CUDAExecutionProvider" in sess.get_providers() and float(sess.run(None, {"A": one, "B": one})[0][0, 0]) == 1.0
        except Exception as exc:  # no driver / no device: report as unavailable, with the reason logged
            logger.debug("CUDA execution provider unusable: %s", exc)
            _CUDA_OK = False
    return _CUDA_OK
