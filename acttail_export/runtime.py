"""Run an acttail-export output folder with ONNX Runtime: checked loading, generation, perplexity.

:func:`load_model` returns an optimum-onnx ``ORTModelForCausalLM`` (``generate()`` with KV cache);
:func:`perplexity_onnx` scores non-overlapping token windows like
:func:`acttail_export.evaluation.perplexity` does with PyTorch. Every loader problem (truncated
``model.onnx``, missing ``model.onnx_data``, a config that does not match the graph, a missing op
library) is an :class:`ActTailError` naming the fix.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import CONFIG_NAME, ActTailConfig
from .errors import ActTailError
from .onnx_export import ONNX_NAME
from .ops import LIBRARY_NAME

if TYPE_CHECKING:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

logger = logging.getLogger(__name__)

LIBRARY_FILE = LIBRARY_NAME  # the name every export carries the op library under
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")


def check_export_dir(export_dir: str | Path) -> tuple[ActTailConfig, bool]:
    """Validate an export folder without loading weights; return (config, uses the custom op).

    Checks: folder and ``model.onnx`` exist, the graph parses, every external weight file exists and
    is long enough, and ``acttail_config.json`` describes exactly the graph's projections.
    """
    import onnx
    from onnx.external_data_helper import uses_external_data

    from .graph_rewrite import CUSTOM_DOMAIN, _is_identity, check_against_config
    from .int4_rewrite import ORT_OP
    from .lm_head import logits_node

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise ActTailError(f"export folder {export_dir} does not exist: run `acttail-export export --model MODEL {export_dir}` first")
    path = export_dir / ONNX_NAME
    if not path.is_file():
        raise ActTailError(f"{path} not found: {export_dir} is not a complete export, re-run `acttail-export export`")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError: truncated or overwritten file
        raise ActTailError(f"{path} is not a valid ONNX file ({type(exc).__name__}): it is probably truncated, re-run the export") from None
    if not graph.graph.node:
        raise ActTailError(f"{path} holds no graph: it is probably truncated, re-run the export")
    for tensor in graph.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        data = export_dir / info["location"]
        if not data.is_file():
            raise ActTailError(f"{data} is missing (weights of {path.name}); copy the whole export folder or re-run the export")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if data.stat().st_size < end:
            raise ActTailError(f"{data} is truncated ({data.stat().st_size} bytes, needs {end}); re-download or re-run the export")
    config = ActTailConfig.load(export_dir / CONFIG_NAME)
    check_against_config(graph, config)
    fused = any(node.domain == CUSTOM_DOMAIN for node in graph.graph.node)
    _check_mode(graph, config)
    # a fused export whose every projection keeps all channels (e.g. --sparsity 0 in topk mode) has no op to fuse
    if fused != (config.kernel == "fused" and any(not _is_identity(p, config.mode) for p in config.projections)):
        raise ActTailError(f"{CONFIG_NAME} says kernel={config.kernel} but the graph {'uses' if fused else 'lacks'} the "
                           f"{CUSTOM_DOMAIN} op: the files come from different exports, re-run the export")
    head = logits_node(graph)
    if head is not None and (head.op_type == ORT_OP) != (config.lm_head == "int8"):
        raise ActTailError(f"{CONFIG_NAME} says lm_head={config.lm_head or 'float'} but the graph's lm_head is a "
                           f"{head.op_type}: the files come from different exports, re-run the export")
    return config, fused


def _check_mode(graph, config: ActTailConfig) -> None:
    """The config's mode must be the graph's: the fused op's ``mode`` attribute, or the mask subgraph's ops."""
    from onnx import helper

    from .graph_rewrite import CUSTOM_DOMAIN

    found = set()
    for node in graph.graph.node:
        if node.domain == CUSTOM_DOMAIN:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if "mode" in attrs:  # (an op without the attribute says nothing about the mode)
                mode = attrs["mode"]
                found.add(mode.decode() if isinstance(mode, bytes) else str(mode))
        elif node.name.startswith("/acttail/") and node.op_type in ("TopK", "Greater"):
            found.add("topk" if node.op_type == "TopK" else "threshold")
    if found - {config.mode}:
        raise ActTailError(f"{CONFIG_NAME} says mode={config.mode} but the graph masks with {', '.join(sorted(found))}: "
                           "the files come from different exports, re-run the export")


def load_session_options(export_dir: str | Path, sess_options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Session options for an export; registers the custom op library when the graph needs it.

    The library copy inside the export folder is preferred, then :func:`acttail_export.ops.get_library_path`.
    """
    import onnxruntime as ort

    _, fused = check_export_dir(export_dir)
    options = sess_options if sess_options is not None else ort.SessionOptions()
    if not fused:
        return options
    local = Path(export_dir) / LIBRARY_FILE
    if local.is_file():
        try:
            options.register_custom_ops_library(str(local))
            return options
        except Exception as exc:  # noqa: BLE001 - fall back to the package build, but say so
            logger.warning("could not load %s (%s); trying the package's op library", local, str(exc).splitlines()[0])
    from .ops import session_options

    return session_options(options)


def _check_provider(provider: str) -> str:
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        hint = "install onnxruntime-gpu (pip install acttail-export[gpu])" if provider == "CUDAExecutionProvider" else "use CPUExecutionProvider"
        raise ActTailError(f"onnxruntime has no {provider} (available: {', '.join(ort.get_available_providers())}); {hint}")
    return provider


def create_session(export_dir: str | Path, provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """A plain ``InferenceSession`` on ``model.onnx`` of a checked export folder."""
    import onnxruntime as ort

    options = load_session_options(export_dir)
    _check_provider(provider)
    return ort.InferenceSession(str(Path(export_dir) / ONNX_NAME), options, providers=[provider])


def load_model(export_dir: str | Path, provider: str = "CPUExecutionProvider") -> ORTModelForCausalLM:
    """``ORTModelForCausalLM`` for an export folder, ready for ``generate()`` with KV cache."""
    from optimum.onnxruntime import ORTModelForCausalLM

    options = load_session_options(export_dir)
    _check_provider(provider)
    return ORTModelForCausalLM.from_pretrained(str(export_dir), provider=provider, session_options=options,
                                               use_cache=True, file_name=ONNX_NAME)


def decoder_feeds(session: ort.InferenceSession, input_ids: np.ndarray,
                  attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Feeds for a full-prompt forward pass with an empty KV cache (left padding handled by the mask)."""
    from onnx import TensorProto
    from onnx.helper import tensor_dtype_to_np_dtype

    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    position_ids = np.clip(np.cumsum(attention_mask, axis=-1) - 1, 0, None).astype(np.int64)
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), "position_ids": position_ids}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            elem = TensorProto.FLOAT16 if inp.type == "tensor(float16)" else TensorProto.FLOAT
            feeds[inp.name] = np.zeros((input_ids.shape[0], inp.shape[1], 0, inp.shape[3]), dtype=tensor_dtype_to_np_dtype(elem))
    return {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}


def max_positions(export_dir: str | Path) -> int | None:
    """``max_position_embeddings`` of an export's ``config.json`` (the base model's), None when not recorded."""
    path = Path(export_dir) / "config.json"
    try:
        value = json.loads(path.read_bytes().decode("utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):  # absent, unreadable, not JSON, not an object: unknown
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token NLL of one window (positions 1..L-1) and the number of predicted tokens."""
    logits = logits.astype(np.float64)
    shifted = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(-1))
    target = shifted[np.arange(len(ids) - 1), ids[1:]]
    return float((log_z - target).sum()), len(ids) - 1


def window_nlls(session: ort.InferenceSession, windows: np.ndarray, progress: bool = False,
                desc: str = "perplexity (onnxruntime)") -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) of every window of ``windows`` ``[n, L]``, one forward pass each
    (full prompt, empty KV cache): the one per-window loop of :func:`perplexity_onnx` and the paired comparisons."""
    iterator = windows
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(windows, desc=desc, unit="window")
    return [window_nll(session.run(["logits"], decoder_feeds(session, ids[None]))[0][0], ids) for ids in iterator]


def export_windows(export_dir: str | Path, data: str | Path, sequence_length: int,
                   max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping token windows ``[n, sequence_length]`` of ``data`` with the export's own tokenizer."""
    from transformers import AutoTokenizer

    from .data import load_windows

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    return load_windows(tokenizer, data, sequence_length, max_tokens=max_tokens).numpy()


def perplexity_onnx(
    export_dir: str | Path,
    data: str | Path,
    sequence_length: int = 1024,
    max_tokens: int | None = None,
    provider: str = "CPUExecutionProvider",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of an export on ``data``: non-overlapping windows, mean NLL of next-token predictions."""
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 2:
        raise ActTailError(f"sequence length must be an integer >= 2 to predict a token (--sequence-length), got {sequence_length!r}")
    session = create_session(export_dir, provider)
    windows = export_windows(export_dir, data, sequence_length, max_tokens)
    nlls = window_nlls(session, windows, progress)
    ppl = math.exp(sum(nll for nll, _ in nlls) / sum(n for _, n in nlls))
    logger.info("onnxruntime perplexity %.3f on %d windows of %d tokens", ppl, len(windows), sequence_length)
    return {"perplexity": ppl, "tokens": int(windows.size), "windows": len(windows), "sequence_length": sequence_length,
            "data": os.path.abspath(data), "backend": f"onnxruntime/{provider}"}
