"""Optimized decoder base for GPU decoding: onnxruntime-genai's model builder, then the ActTail rewrite.

The optimum export (:mod:`acttail_export.onnx_export`) is a straight trace of the PyTorch model: on a
GPU it is launch-bound (RMSNorm as a dozen small kernels, rotary and KV concat as separate ops, shape
arithmetic on the CPU provider). onnxruntime-genai's model builder emits the graph ONNX Runtime's
LLM runtime is tuned for:

* ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm in one kernel),
* ``GroupQueryAttention`` with the rotary embedding inside and past/present KV buffers shared in place
  (``past_present_share_buffer``), sequence lengths computed on the GPU from ``attention_mask``,
* plain ``MatMul`` nodes for the 7 projections, named ``/model/layers.{i}/attn/{q,k,v,o}_proj/MatMul`` and
  ``/model/layers.{i}/mlp/{gate,up,down}_proj/MatMul`` when built with ``fuse_qkv=false`` (q, k and v keep
  their own MatMul, and therefore their own ActTail budget), or packed: one ``attn/qkv_proj/MatMul``
  (``fuse_qkv``) and one ``mlp/gate_up_proj/MatMul`` (``fuse_mlp_gate_up``) per layer, which the rewrite
  turns into one ``SparseMatMul`` whose members keep their own threshold / k (one mask when they are identical,
  :func:`acttail_export.graph_rewrite.packable`); :func:`export_genai` packs,

and a ``genai_config.json`` for its generator (``onnxruntime_genai.Model``), which can replay decode
steps from a CUDA graph. :func:`acttail_export.graph_rewrite.rewrite` works on that graph unchanged
(mask and fused kernels); :func:`write_variant` writes a rewritten graph next to the base so that every
variant shares the base's ``model.onnx.data``. With the fused kernel on the packed base the builder's
``Split`` / ``Sigmoid`` / ``Mul`` / ``Mul`` between ``gate_up_proj`` and ``down_proj`` is folded into the down op
(``activation="swiglu"``, :mod:`acttail_export.activation_fusion`): one kernel instead of four or five per layer.

The builder of onnxruntime-genai 0.18 imports transformers >= 5 and ``onnx_ir``; it runs in this process
(:func:`build_base`), on the same transformers as the rest of the pipeline.

From the command line, ``acttail-export export --base genai`` (``--device cuda --dtype fp16`` for the GPU
builder graph) runs the whole pipeline on this base through :class:`acttail_export.bases.genai.GenaiBase`:
:func:`check_genai` first, then the usual analysis, allocation and calibration, :func:`export_genai` with
``filename="model.onnx"`` into the temporary output folder, the export validation and the atomic rename.

A finished export (:func:`export_genai`, or :func:`finalize` on a built base) names the rewritten graph and
the op library in its ``genai_config.json``, so loading and generating from Python is::

    import onnxruntime_genai as og
    model = og.Model("out/model-acttail-80")              # or og.Model(genai_config(dir, "model.fused-80.onnx", "cuda", cuda_graph=True))
    params = og.GeneratorParams(model); params.set_search_options(max_length=256)
    gen = og.Generator(model, params); gen.append_tokens(ids)
    while not gen.is_done(): gen.generate_next_token()
"""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .config import ActTailConfig
from .errors import ActTailError
from .ops import LIBRARY_NAME

if TYPE_CHECKING:
    from .graph_rewrite import RewriteSummary

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
BASE_ONNX = "model.onnx"
LIBRARY_FILE = LIBRARY_NAME  # the name every export carries the op library under
INTRA_OP_THREADS = "intra_op_num_threads"  # genai session option finalize() sets to 0 (ONNX Runtime chooses)
PRECISIONS = ("fp16", "fp32", "bf16", "int4")  # int4: the builder's own MatMulNBits model (a baseline, not rewritten)
EXECUTION_PROVIDERS = ("cpu", "cuda")


def builder_settings(dtype: str, device: str) -> tuple[str, str]:
    """(builder precision, builder execution provider) for the export command's ``--dtype`` / ``--device``.

    ``--device cpu`` -> the CPU provider, fp32 only (the builder writes an fp16 CPU graph, but
    onnxruntime-genai 0.18 fails running it); ``--device cuda`` -> the CUDA provider, fp16 or fp32.
    """
    if device not in EXECUTION_PROVIDERS:
        raise ActTailError(f"--device must be one of {', '.join(EXECUTION_PROVIDERS)} with --base genai; got {device!r}")
    if dtype not in ("fp32", "fp16"):
        raise ActTailError(f"--dtype must be fp32 or fp16 with --base genai; got {dtype!r}")
    if device == "cpu" and dtype == "fp16":
        raise ActTailError("--base genai --dtype fp16 needs the CUDA provider (onnxruntime-genai cannot run the builder's "
                           "fp16 graph on CPU): add --device cuda, or use --dtype fp32")
    return dtype, device


def builder_problem() -> str | None:
    """None when onnxruntime-genai's model builder imports here; else the import error, in one line."""
    try:
        import onnxruntime_genai.models.builder  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a transformers 4.x that the builder rejects
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def check_genai(dtype: str = "fp32", device: str = "cpu") -> tuple[str, str]:
    """Checks of ``--base genai`` before any work; returns the builder's (precision, execution provider).

    Raises :class:`ActTailError` naming the fix when onnxruntime-genai or its model builder does not import.
    """
    settings = builder_settings(dtype, device)
    if not genai_available():
        raise ActTailError("--base genai needs onnxruntime-genai: pip install onnxruntime-genai (onnxruntime-genai-cuda "
                           "for --device cuda), or use --base optimum")
    problem = builder_problem()
    if problem is not None:
        raise ActTailError(f"onnxruntime-genai's model builder does not import ({problem[:120]}): it needs transformers>=5 "
                           "and onnx-ir (pip install 'transformers>=5' onnx-ir), or use --base optimum")
    return settings


def genai_available() -> bool:
    """True when ``onnxruntime_genai`` imports in this interpreter (the runtime, not the builder)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means "not usable here"
        return False
    return True


def build_base(
    model_dir: str | Path,
    output_dir: str | Path,
    dtype: str = "fp16",
    execution_provider: str = "cuda",
    fuse_qkv: bool = False,
    fuse_gate_up: bool = False,
    extra_options: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Run onnxruntime-genai's model builder on a Hugging Face folder, in this process; returns ``output_dir``.

    ``model_dir`` must hold ``config.json``, the weights and a tokenizer (the builder copies it).
    ``fuse_qkv=True`` packs q/k/v into one MatMul (the builder's default), ``fuse_gate_up=True`` gate/up; the
    rewrite keeps each member's rule inside the packed MatMul (:func:`acttail_export.graph_rewrite.rewrite`).
    ``cache_dir`` is the builder's scratch folder (default: a hidden sibling of ``output_dir``); it is removed afterwards.
    The builder's printed lines go to this module's debug log (and into the error when it fails); its progress bar
    (stderr) too unless ``progress``.
    """
    import contextlib
    import io

    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if dtype not in PRECISIONS:
        raise ActTailError(f"dtype must be one of {', '.join(PRECISIONS)}; got {dtype!r}")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise ActTailError(f"execution provider must be one of {', '.join(EXECUTION_PROVIDERS)}; got {execution_provider!r}")
    if not (model_dir / "config.json").is_file():
        raise ActTailError(f"{model_dir} has no config.json: pass a folder written by save_pretrained")
    problem = builder_problem()
    if problem is not None:
        raise ActTailError(f"onnxruntime-genai's model builder does not import ({problem[:120]}): pip install "
                           "onnxruntime-genai 'transformers>=5' onnx-ir")
    from onnxruntime_genai.models import builder

    options = {"fuse_qkv": "true" if fuse_qkv else "false", "fuse_mlp_gate_up": "true" if fuse_gate_up else "false"}
    options.update(extra_options or {})
    cache = Path(cache_dir) if cache_dir is not None else output_dir.parent / f".{output_dir.name}.genai-cache"
    args = (None, str(model_dir), str(output_dir), dtype, execution_provider, str(cache))
    logger.info("building the genai base (onnxruntime-genai model builder, %s %s): %s -> %s", dtype, execution_provider,
                model_dir, output_dir)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), (contextlib.nullcontext() if progress else contextlib.redirect_stderr(printed)):
            parsed = builder.parse_extra_options(*args, [f"{k}={v}" for k, v in options.items()])
            builder.create_model(*args, **parsed)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the builder raises plain Exceptions: one line with its last output
        tail = " | ".join(line.strip() for line in printed.getvalue().splitlines()[-3:] if line.strip())
        raise ActTailError(f"onnxruntime-genai's model builder failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                           + (f"; its last lines: {tail[:300]}" if tail else "")) from exc
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        logger.debug("model builder output:\n%s", printed.getvalue())
    if not (output_dir / BASE_ONNX).is_file():
        raise ActTailError(f"onnxruntime-genai's model builder wrote no {BASE_ONNX} into {output_dir}")
    return output_dir


def load_graph(base_dir: str | Path, filename: str = BASE_ONNX) -> onnx.ModelProto:
    """The builder's graph without its weights (initializers keep their external-data references)."""
    path = Path(base_dir) / filename
    if not path.is_file():
        raise ActTailError(f"{path} not found: build the base with acttail_export.genai_base.build_base first")
    return onnx.load(str(path), load_external_data=False)


def pin_kv_dims(graph: onnx.ModelProto, base_dir: str | Path) -> None:
    """Set the symbolic head dimension of ``past_key_values.*`` / ``present.*`` to the builder's ``head_size``."""
    cfg = Path(base_dir) / GENAI_CONFIG
    if not cfg.is_file():
        return
    head = json.loads(cfg.read_text())["model"]["decoder"].get("head_size")
    if not head:
        return
    for value in [*graph.graph.input, *graph.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dims = value.type.tensor_type.shape.dim
            if len(dims) == 4 and not dims[3].HasField("dim_value"):
                dims[3].ClearField("dim_param")
                dims[3].dim_value = int(head)


def write_variant(base_dir: str | Path, config: ActTailConfig, filename: str, mode: str | None = None,
                  kernel: str | None = None, library: str | Path | None = None, replace_base: bool = False,
                  quantized: dict | None = None, fuse_activation: bool = True) -> Path:
    """Rewrite the base graph with ``config`` and save it as ``base_dir/filename`` (weights shared).

    The rewritten graph references the base's ``model.onnx.data``; the few new initializers
    (thresholds, constants) are stored inline. For the fused kernel the op library is copied into
    ``base_dir`` (onnxruntime-genai only loads custom-op libraries from the model folder).
    ``replace_base=True`` allows ``filename == "model.onnx"``: the dense graph is replaced by the
    rewritten one (what the CLI's ``--base genai`` writes, so that every loader sees the ActTail graph).
    The KV-cache head dimension, symbolic (``kv_cache_dim``) in the builder's graph, is pinned to the
    ``head_size`` of ``genai_config.json`` so that plain ONNX Runtime feeds can be shaped from the graph.
    ``quantized`` (``--weights int4``: projection name -> 4-bit weight) puts the 4-bit ops in
    (:func:`acttail_export.int4_rewrite.rewrite_int4`); that graph keeps only the weights it still uses, in its own
    file(s), so the float projection weights are not shipped with it.
    With the fused kernel and ``fuse_activation`` (the default) the SwiGLU between the packed gate|up projection and
    the down projection is folded into the down op (:func:`rewrite_graph`; the 4-bit ops keep the attribute).
    """
    base_dir = Path(base_dir)
    if "/" in filename or (filename == BASE_ONNX and not replace_base):
        raise ActTailError(f"variant file name must be a plain name other than {BASE_ONNX}; got {filename!r}")
    graph = load_graph(base_dir)
    summary = rewrite_graph(graph, config, mode=mode, kernel=kernel, fuse_activation=fuse_activation)
    pin_kv_dims(graph, base_dir)
    path = base_dir / filename
    if quantized is not None:
        _save_int4(graph, base_dir, filename, config, quantized)
    else:
        tmp = path.with_name(f".{filename}.{os.getpid()}.tmp")
        onnx.save_model(graph, str(tmp))
        os.replace(tmp, path)
    if summary.kernel == "fused":
        copy_library(base_dir, library)
    return path


def rewrite_graph(graph: onnx.ModelProto, config: ActTailConfig, mode: str | None = None, kernel: str | None = None,
                  fuse_activation: bool = True) -> RewriteSummary:
    """:func:`acttail_export.graph_rewrite.rewrite` of a builder graph (in place), then, for the fused kernel, the
    SwiGLU fold (:func:`acttail_export.activation_fusion.fuse_swiglu`): on the packed base every down projection op
    reads the gate|up output with ``activation="swiglu"`` (none on an unpacked base, where gate and up are separate
    MatMuls and there is no Split to fold)."""
    from .activation_fusion import fuse_swiglu
    from .graph_rewrite import rewrite

    summary = rewrite(graph, config, mode=mode, kernel=kernel)
    if summary.kernel == "fused" and fuse_activation:
        fuse_swiglu(graph)
    return summary


def _save_int4(graph: onnx.ModelProto, base_dir: Path, filename: str, config: ActTailConfig, quantized: dict) -> Path:
    """The 4-bit ops (and with ``config.lm_head == "int8"`` the 8-bit lm_head) into a rewritten builder graph, saved
    with only the weights it still uses.

    The graph is edited without its weights; then the weights it still references are read from the builder's
    ``model.onnx.data`` and the graph is saved in a staging folder (one file, or ``<name>_data`` over 2 GB) that is
    moved into ``base_dir``: the float projection weights are never loaded.
    """
    import tempfile

    from onnx.external_data_helper import load_external_data_for_model

    from .int4_rewrite import rewrite_int4
    from .onnx_export import save_onnx

    rewrite_int4(graph, config, quantized)
    load_external_data_for_model(graph, str(base_dir))
    if config.lm_head == "int8":
        from .lm_head import rewrite_lm_head

        rewrite_lm_head(graph)
    staging = Path(tempfile.mkdtemp(prefix=".int4-", dir=base_dir))
    try:
        save_onnx(graph, staging / filename)
        for file in staging.iterdir():
            os.replace(file, base_dir / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return base_dir / filename


def copy_library(base_dir: str | Path, library: str | Path | None = None) -> Path:
    """Copy ``libacttail_ops.so`` into ``base_dir`` (from ``library`` or :func:`acttail_export.ops.get_library_path`)."""
    from .ops import get_library_path

    src = Path(library) if library is not None else Path(get_library_path())
    dst = Path(base_dir) / LIBRARY_FILE
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return dst
    # never rewrite a library in place: a process that has it loaded would crash; rename a new file over it
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


def uses_custom_op(base_dir: str | Path, filename: str) -> bool:
    from .graph_rewrite import CUSTOM_DOMAIN

    return any(n.domain == CUSTOM_DOMAIN for n in load_graph(base_dir, filename).graph.node)


def genai_config(base_dir: str | Path, filename: str = BASE_ONNX, provider: str = "cpu", cuda_graph: bool = False,
                 overlay: dict | None = None):
    """``onnxruntime_genai.Config`` for one graph file of a builder folder.

    Selects ``filename`` as the decoder, registers the op library when that graph uses the custom op,
    sets the provider (``cpu`` / ``cuda``) and, for CUDA, ``enable_cuda_graph``.
    """
    import onnxruntime_genai as og

    base_dir = Path(base_dir)
    if not (base_dir / GENAI_CONFIG).is_file():
        raise ActTailError(f"{base_dir} has no {GENAI_CONFIG}: build it with acttail_export.genai_base.build_base")
    decoder: dict = {"filename": filename}
    if uses_custom_op(base_dir, filename):
        if not (base_dir / LIBRARY_FILE).is_file():
            copy_library(base_dir)
        decoder["session_options"] = {"custom_ops_library": LIBRARY_FILE}
    config = og.Config(str(base_dir))
    config.overlay(json.dumps({"model": {"decoder": decoder}}))
    if overlay:
        config.overlay(json.dumps(overlay))
    config.clear_providers()
    if provider == "cuda":
        config.append_provider("cuda")
        config.set_provider_option("cuda", "enable_cuda_graph", "1" if cuda_graph else "0")
    elif provider != "cpu":
        raise ActTailError(f"provider must be cpu or cuda; got {provider!r}")
    return config


def generate(base_dir: str | Path, input_ids, max_new_tokens: int, filename: str = BASE_ONNX, provider: str = "cpu",
             cuda_graph: bool = False) -> list[int]:
    """Greedy generation of ``max_new_tokens`` tokens with the genai runtime (one sequence)."""
    import numpy as np
    import onnxruntime_genai as og

    ids = np.asarray(input_ids, dtype=np.int32).reshape(1, -1)
    model = og.Model(genai_config(base_dir, filename, provider, cuda_graph))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out: list[int] = []
    while not gen.is_done() and len(out) < max_new_tokens:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def finalize(base_dir: str | Path, config: ActTailConfig, mode: str | None = None, kernel: str | None = None,
             filename: str = "model.acttail.onnx", library: str | Path | None = None, quantized: dict | None = None,
             fuse_activation: bool = True) -> Path:
    """Make a builder folder an ActTail export that ``onnxruntime_genai.Model(folder)`` loads as is.

    Writes the rewritten graph as ``filename`` (sharing ``model.onnx.data``; ``filename="model.onnx"``
    replaces the dense graph), points ``genai_config.json`` at it (and at the op library for the fused
    kernel), and saves ``acttail_config.json``. ``quantized``: the 4-bit weights of ``--weights int4``
    (:func:`write_variant`); replacing ``model.onnx`` then also drops the builder's float ``model.onnx.data``.
    ``fuse_activation``: fold the SwiGLU into the down op (fused kernel, :func:`rewrite_graph`).
    """
    base_dir = Path(base_dir)
    path = write_variant(base_dir, config, filename, mode=mode, kernel=kernel, library=library,
                         replace_base=filename == BASE_ONNX, quantized=quantized, fuse_activation=fuse_activation)
    if quantized is not None and filename == BASE_ONNX:
        (base_dir / f"{BASE_ONNX}.data").unlink(missing_ok=True)  # nothing refers to it any more
    cfg_path = base_dir / GENAI_CONFIG
    data = json.loads(cfg_path.read_text())
    decoder = data["model"]["decoder"]
    decoder["filename"] = filename
    options = decoder.setdefault("session_options", {})
    if (kernel or config.kernel) == "fused":  # the graph write_variant just wrote uses the custom op
        options["custom_ops_library"] = LIBRARY_FILE
    # onnxruntime-genai runs one intra-op thread when this is unset; 0 lets ONNX Runtime take one per physical core
    # (SmolLM2 int4 at 50 % on a 2-core CPU: 18.4-19.3 -> 11.8-12.2 ms per token, docs/quantization.md); a user's value stays.
    options.setdefault(INTRA_OP_THREADS, 0)
    cfg_path.write_text(json.dumps(data, indent=4) + "\n")
    config.kernel = kernel or config.kernel
    config.mode = mode or config.mode
    config.save(base_dir)
    return path


def builder_can_read(folder: str | Path) -> bool:
    """Whether the model builder may read ``folder`` in place of a copy of the model loaded from it: a local
    ``save_pretrained`` folder (config.json, safetensors weights, a tokenizer) without a quantization config (those
    checkpoints load through their own path)."""
    folder = Path(folder)
    if not (folder.is_dir() and (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()
            and any(folder.glob("*.safetensors"))):
        return False
    try:
        return "quantization_config" not in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def export_genai(model, tokenizer, output_dir: str | Path, config: ActTailConfig, mode: str | None = None,
                 kernel: str | None = None, dtype: str = "fp16", execution_provider: str = "cuda",
                 filename: str = "model.acttail.onnx", library: str | Path | None = None,
                 work_dir: str | Path | None = None, pack: bool | None = None, progress: bool = True,
                 quantized: dict | None = None, source: str | Path | None = None, fuse_activation: bool = True) -> Path:
    """ActTail export on the optimized base: builder graph + rewrite + genai config, in ``output_dir``.

    ``model`` / ``tokenizer`` are the loaded Hugging Face objects (the config's thresholds come from them).
    They are saved to a scratch folder for the builder (``acttail-hf-*``, a temporary folder inside ``work_dir`` when
    given, so that a large checkpoint stays on the output's filesystem); ``config.json`` and
    ``generation_config.json`` are copied next to the graph, and ``tokenizer`` is saved over the builder's copy.
    ``filename="model.onnx"`` replaces the dense graph by the rewritten one (``acttail-export export --base genai``
    does this). ``pack`` builds q/k/v and gate/up as packed MatMuls (one op call per input group; members with
    different budgets keep their own rules, :func:`acttail_export.graph_rewrite.rewrite`); ``None`` packs.
    ``source``: the Hugging Face folder ``model`` was loaded from; when :func:`builder_can_read` it, the builder
    reads it directly instead of a scratch copy (a 7B checkpoint: 13 GB less written and on disk). The float
    projection weights of the 4-bit path need not match: ``quantized`` replaces every one of them.
    ``fuse_activation``: with the fused kernel on the packed base, the down ops apply SwiGLU themselves
    (:func:`rewrite_graph`). Load with ``onnxruntime_genai.Model(str(output_dir))``.
    """
    import contextlib
    import tempfile

    from .graph_rewrite import packable

    output_dir = Path(output_dir)
    pack = True if pack is None else pack
    if pack and not packable(config, mode):
        logger.info("genai base: q/k/v and gate/up members have their own masks (per-member rules in the packed op)")
    logger.info("genai base: %s", "q/k/v and gate/up packed (one mask per input group)" if pack else "every projection its own MatMul")
    direct = source is not None and builder_can_read(source)
    with contextlib.nullcontext(str(source)) if direct else tempfile.TemporaryDirectory(prefix="acttail-hf-", dir=work_dir) as hf:
        if not direct:
            model.save_pretrained(hf, safe_serialization=True)
            tokenizer.save_pretrained(hf)
        logger.info("genai base: the builder reads %s", source if direct else "a scratch copy of the loaded model")
        build_base(hf, output_dir, dtype=dtype, execution_provider=execution_provider, fuse_qkv=pack, fuse_gate_up=pack,
                   cache_dir=None if work_dir is None else Path(work_dir) / ".genai-cache", progress=progress)
        for name in ("config.json", "generation_config.json"):
            if (Path(hf) / name).is_file():
                shutil.copy2(Path(hf) / name, output_dir / name)
    # the builder re-saves the tokenizer from the scratch folder; write the caller's tokenizer over it so that the
    # export encodes exactly like the model that was calibrated
    tokenizer.save_pretrained(output_dir)
    finalize(output_dir, config, mode=mode, kernel=kernel, filename=filename, library=library, quantized=quantized,
             fuse_activation=fuse_activation)
    return output_dir
