"""Base ONNX export (decoder with KV cache) through optimum-onnx.

This is the only module that talks to the optimum exporter. The exported graph has inputs
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` and outputs
``logits``, ``present.{i}.key/value`` (task ``text-generation-with-past``); weights above the 2 GB
protobuf limit go to ``model.onnx_data`` next to ``model.onnx``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .errors import ActTailError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"
TASK = "text-generation-with-past"
DTYPES = ("fp32", "fp16")
#: protobuf cannot serialize a single message above 2 GiB: larger graphs keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1


def torch_dtype(dtype: str):
    """``"fp32"`` / ``"fp16"`` -> torch dtype (ActTailError otherwise)."""
    import torch

    if dtype not in DTYPES:
        raise ActTailError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return torch.float32 if dtype == "fp32" else torch.float16


def check_device(device: str) -> str:
    """Validate an export device; CUDA needs a visible GPU in this PyTorch build."""
    import torch

    if device == "cpu":
        return device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ActTailError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu")
        return device
    raise ActTailError(f"device must be cpu or cuda; got {device!r}")


def export_base_onnx(
    model_or_path: "PreTrainedModel | str | Path",
    output_dir: str | Path,
    dtype: str = "fp32",
    device: str = "cpu",
) -> Path:
    """Export a causal LM with KV cache to ``output_dir/model.onnx`` and return that path.

    ``model_or_path`` is an in-memory model (exported as is; its dtype must match ``dtype``) or a
    model reference understood by :func:`acttail_export.modeling.load_model` (HF folder, ``.gguf``
    file, Hub id); GGUF weights are dequantized in memory by the loader before export.
    """
    import torch

    want = torch_dtype(dtype)
    check_device(device)
    if isinstance(model_or_path, (str, Path)):
        from .modeling import load_model

        model, _ = load_model(str(model_or_path), dtype=dtype, device=device)
    else:
        model = model_or_path
    have = next(model.parameters()).dtype
    if have != want:
        raise ActTailError(f"model is {have} but dtype={dtype} was requested; load the model with dtype={dtype!r}")

    from optimum.exporters.onnx import onnx_export_from_model

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info("exporting %s (%s) to ONNX with KV cache", type(model).__name__, dtype)
    with warnings.catch_warnings():
        # torch.jit tracing warns about every data-dependent Python branch in transformers' code.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        onnx_export_from_model(
            model, output_dir, task=TASK, do_validation=False, device=device, no_post_process=False,
        )
    path = output_dir / ONNX_NAME
    if not path.is_file():
        raise ActTailError(f"optimum-onnx did not write {path}; re-run with -v to see the exporter log")
    return path


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an exported graph with its external weights (ActTailError on truncated/missing files)."""
    path = Path(path)
    if not path.is_file():
        raise ActTailError(f"{path} not found: export the model first with `acttail-export export`")
    try:
        return onnx.load(str(path), load_external_data=True)
    except FileNotFoundError as exc:
        raise ActTailError(f"{path}: external weight file missing ({Path(exc.filename or ONNX_DATA_NAME).name}); re-run the export") from None
    except Exception as exc:  # protobuf DecodeError and friends: the file is damaged
        raise ActTailError(f"{path} is not a valid ONNX file ({type(exc).__name__}); it is probably truncated, re-run the export") from None


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save a graph; weights go to ``model.onnx_data`` when the graph exceeds the protobuf limit."""
    path = Path(path)
    size = model.ByteSize()
    external = size >= PROTOBUF_LIMIT
    data = path.with_name(path.name + "_data") if path.name != ONNX_NAME else path.with_name(ONNX_DATA_NAME)
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    logger.debug("saved %s (%.1f MB, external=%s)", path, size / 1e6, external)
    return path
