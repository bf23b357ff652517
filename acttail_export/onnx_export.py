"""Base ONNX export (decoder with KV cache) through optimum-onnx.

This is the only module that talks to the optimum exporter. The exported graph has inputs
``input_ids``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key/value`` and outputs
``logits``, ``present.{i}.key/value`` (task ``text-generation-with-past``); weights above the 2 GB
protobuf limit go to ``model.onnx_data`` next to ``model.onnx``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .errors import ActTailError
from .modeling import DTYPES  # noqa: F401  (re-exported)
from .modeling import _torch_dtype as torch_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_DATA_NAME = "model.onnx_data"
TASK = "text-generation-with-past"
#: protobuf cannot serialize a single message above 2 GiB: larger graphs keep weights outside.
PROTOBUF_LIMIT = 2**31 - 1


def proto_size(model) -> int:
    """``model.ByteSize()``, or :data:`PROTOBUF_LIMIT` when protobuf refuses to size it (the upb backend raises
    ``EncodeError`` for a message over 2 GiB, e.g. a 7B model's 4-bit weights held inside the graph)."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT


def check_device(device: str) -> str:
    """Validate an export device; CUDA needs a visible GPU in this PyTorch build."""
    import torch

    if device == "cpu":
        return device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ActTailError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu")
        return device
    raise ActTailError(f"--device must be cpu or cuda; got {device!r}")


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
    with warnings.catch_warnings(), _streamed_external_data():
        # torch.jit tracing warns about every data-dependent Python branch in transformers' code.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        onnx_export_from_model(
            model, output_dir, task=TASK, do_validation=False, device=device, no_post_process=False,
        )
    path = output_dir / ONNX_NAME
    if not path.is_file():
        raise ActTailError(f"optimum-onnx did not write {path}; re-run with -v to see the exporter log")
    consolidate_external_data(path)
    return path


@contextlib.contextmanager
def _streamed_external_data():
    """Keep optimum-onnx from merging torch's per-tensor weight files in memory.

    For graphs over 2 GB torch writes one file per weight; optimum-onnx then loads *all* of them
    (a second full copy of the weights in host memory, next to the model) to save one
    ``model.onnx_data``. With its check patched to "no external data" it leaves the files as
    they are, and :func:`consolidate_external_data` merges them one tensor at a time.
    """
    from optimum.exporters.onnx import convert

    original = getattr(convert, "check_model_uses_external_data", None)
    if original is None:  # another optimum-onnx version: keep its behaviour
        logger.debug("optimum-onnx has no check_model_uses_external_data: its own external-data merge is used")
        yield
        return
    convert.check_model_uses_external_data = lambda model: False
    try:
        yield
    finally:
        convert.check_model_uses_external_data = original


def consolidate_external_data(path: str | Path, data_name: str = ONNX_DATA_NAME, align: int = 4096) -> bool:
    """Merge the external weight files of ``path`` into one ``data_name`` file, streaming.

    Reads one tensor at a time (host memory stays at the largest tensor), appends it at an
    ``align``-byte boundary, repoints the graph at the new file and deletes the old files.
    Returns False (and does nothing) when the graph keeps its weights inside.
    """
    from onnx.external_data_helper import ExternalDataInfo

    path = Path(path)
    graph = load_onnx(path, load_external_data=False)
    tensors = _external_tensors(graph)
    if not tensors:
        return False
    folder = path.parent
    old_files = {ExternalDataInfo(t).location for t in tensors}
    if old_files == {data_name}:
        return False
    tmp = folder / (data_name + ".partial")
    with open(tmp, "wb") as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            source = folder / info.location
            with open(source, "rb") as f:
                f.seek(info.offset or 0)
                blob = f.read(info.length) if info.length else f.read()
            pad = (-out.tell()) % align
            out.write(b"\0" * pad)
            offset = out.tell()
            out.write(blob)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
    os.replace(tmp, folder / data_name)
    onnx.save_model(graph, str(path))
    for name in old_files - {data_name}:
        (folder / name).unlink(missing_ok=True)
    logger.info("merged %d external weight files into %s", len(old_files), data_name)
    return True


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an exported graph, with its external weights unless told not to (ActTailError on truncated/missing files)."""
    path = Path(path)
    if not path.is_file():
        raise ActTailError(f"{path} not found: export the model first with `acttail-export export`")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except FileNotFoundError as exc:
        raise ActTailError(f"{path}: external weight file missing ({Path(exc.filename or ONNX_DATA_NAME).name}); re-run the export") from None
    except Exception as exc:  # protobuf DecodeError and friends: the file is damaged
        raise ActTailError(f"{path} is not a valid ONNX file ({type(exc).__name__}); it is probably truncated, re-run the export") from None


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Tensors of a graph (loaded without its data) whose bytes live in external files."""
    from onnx.external_data_helper import uses_external_data

    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes may hold external tensors too
        tensors.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return [t for t in tensors if uses_external_data(t)]


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """Relative locations of the external weight files a graph (loaded without its data) refers to."""
    from onnx.external_data_helper import ExternalDataInfo

    return sorted({ExternalDataInfo(t).location for t in _external_tensors(model)})


def rewrite_onnx(source: str | Path, target: str | Path, edit) -> Path:
    """Apply ``edit(graph)`` to ``source`` and write the result to ``target`` (another folder).

    Graph rewrites only add nodes and small initializers; the weights stay as they are. When the
    source keeps its weights in external files (models over 2 GB), the graph is edited without
    loading them and the files are *moved* next to ``target``: the weights are never held in host
    memory. Smaller graphs (one self-contained file, so the load below already holds their weights)
    are edited and saved whole.
    """
    source, target = Path(source), Path(target)
    graph = load_onnx(source, load_external_data=False)
    files = external_data_files(graph)
    if not files:
        edit(graph)
        return save_onnx(graph, target)
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts or not (source.parent / name).is_file():
            raise ActTailError(f"{source}: external weight file {name!r} is missing or outside the export folder; re-run the export")
    edit(graph)
    if proto_size(graph) >= PROTOBUF_LIMIT:
        raise ActTailError(f"{source}: the rewritten graph without its weights is still over 2 GB")
    onnx.save_model(graph, str(target))
    for name in files:
        (target.parent / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source.parent / name, target.parent / name)
    logger.debug("rewrote %s -> %s, moved %d external weight file(s)", source, target, len(files))
    return target


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save a graph; weights go to ``model.onnx_data`` when the graph exceeds the protobuf limit."""
    path = Path(path)
    size = proto_size(model)
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
