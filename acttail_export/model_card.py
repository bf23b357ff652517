"""``README.md`` model card of an export: usage snippet, per-projection table, measured perplexity."""

from __future__ import annotations

import struct
from pathlib import Path

from .config import ActTailConfig
from .ops import LIBRARY_NAME

CARD_NAME = "README.md"
#: ELF section that nvcc puts the device code (fat binary) in: present only in a build with the CUDA kernels.
CUDA_SECTION = b".nv_fatbin"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def library_has_cuda_kernels(path: str | Path) -> bool | None:
    """Whether the op library at ``path`` holds CUDA kernels (an ELF ``.nv_fatbin`` section); None if unknown.

    The section names are read from the ELF section header table (64-bit little-endian, the only
    target ``make ops`` builds); anything else, or an unreadable file, gives None.
    """
    try:
        with open(path, "rb") as handle:
            header = handle.read(64)
            if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            shoff, = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
            if shoff == 0 or shentsize < 64 or not 0 < shnum < 65280 or shstrndx >= shnum:
                return None
            handle.seek(shoff)
            table = handle.read(shentsize * shnum)
            if len(table) < shentsize * shnum:
                return None
            sections = [struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)]
            _, _, _, _, str_offset, str_size = sections[shstrndx]
            handle.seek(str_offset)
            names = handle.read(str_size)
    except OSError:
        return None
    for name_offset, *_ in sections:
        end = names.find(b"\0", name_offset)
        if names[name_offset:end if end >= 0 else None] == CUDA_SECTION:
            return True
    return False


def _library_note(cuda_kernels: bool | None) -> str:
    if cuda_kernels is True:
        return "Linux x86-64; CPU and CUDA kernels, for the CPU and CUDA execution providers"
    if cuda_kernels is False:
        return "Linux x86-64; CPU kernels only, built without CUDA"
    return "Linux x86-64; CPU kernels, plus CUDA kernels when built with nvcc"


def _perplexity_not_measured(ppl: dict) -> str:
    """Why the export-time perplexity is missing, from what the export recorded."""
    if ppl.get("skipped"):  # the exporter's own words, when it records them
        return f"- perplexity: not measured at export time ({ppl['skipped']})"
    if "validation" in ppl:  # validated, so --no-validate was not given: the evaluation text was missing
        return ("- perplexity: not measured at export time (the evaluation text, WikiText-2 `wiki.test.raw`, was not found; "
                "measure it with `acttail-export evaluate --model THIS_FOLDER --data FILE`)")
    return "- perplexity: not measured at export time (exported with --no-validate)"


def _allocation_line(config: ActTailConfig) -> str:
    shape = "" if config.epsilon is None and config.mapping is None else f" (ε = {config.epsilon}, mapping `{config.mapping}`)"
    method = config.allocation_method
    if method == "uniform" or (method is None and config.allocation == "uniform"):
        shape = shape or " (the same budget for every projection)"
    elif method == "teal-greedy":
        shape = " (TEAL's block-wise greedy search on the calibration text)"
    elif method == "acttail-greedy":
        shape = f" (HT-SR block targets{shape}, TEAL's greedy search inside each block)"
    elif method == "waterfill-greedy":
        shape = " (block levels water-filled on the greedy search's block errors, its budgets inside each block)"
    name = f"`{config.allocation}`" + (f" = `{method}`" if method and method != config.allocation else "")
    return f"- allocation {name}{shape}, mode `{config.mode}`, kernel `{config.kernel}`"


def _weights_line(config: ActTailConfig) -> str:
    """The graph's weights: float (the export's dtype), or the 4-bit projections and the lm_head they come with."""
    if config.weights != "int4":
        return f"- weights: {config.weights or 'float'} (as exported)"
    from .lm_head import BLOCK

    head = (f"8-bit `MatMulNBits` (symmetric blocks of {BLOCK}, int8 activations on the CPU)"
            if config.lm_head == "int8" else "float")
    return (f"- weights: projections 4-bit (blocks of {config.block_size} along the input dimension, quantizer "
            f"`{config.quantizer}`), lm_head {head}")


def render_model_card(config: ActTailConfig, repo_id: str | None = None, cuda_kernels: bool | None = None,
                      swiglu_ops: int = 0) -> str:
    """Markdown model card for ``config`` (pure: no files read).

    ``cuda_kernels``: whether the included op library holds CUDA kernels (None: not known, worded neutrally).
    ``swiglu_ops``: how many down projection ops of the graph apply SwiGLU themselves (``activation="swiglu"``).
    """
    where = "path/to/this/folder"
    eff = "not measured" if config.effective_sparsity is None else f"{config.effective_sparsity:.3f}"
    lines = [
        "---",
        "library_name: onnxruntime",
        "pipeline_tag: text-generation",
        "tags: [onnx, acttail, activation-sparsity, optimum]",
        "---",
        "",
        f"# {Path(config.model or 'model').name} — ActTail activation sparsity (ONNX)",
        "",
        f"[ActTail](https://arxiv.org/abs/2603.12272) activation sparsity applied by `acttail-export` to `{config.model}` "
        f"({config.architecture or 'decoder'}), exported to ONNX with KV cache.",
        "",
        f"- target sparsity **{config.target_sparsity:.2f}**, effective sparsity **{eff}** (parameter-weighted, on validation text)",
        _allocation_line(config),
        _weights_line(config),
        f"- calibration: {config.calibration.samples} × {config.calibration.sequence_length} tokens of `{Path(config.calibration.data or '?').name}`",
    ]
    ppl = config.perplexity
    if "perplexity" in ppl:
        lines.append(f"- perplexity **{ppl['perplexity']:.3f}** on {ppl['tokens']} tokens of `{Path(ppl['data']).name}` "
                     f"(windows of {ppl['sequence_length']}, {ppl['backend']}), measured at export time")
    else:
        lines.append(_perplexity_not_measured(ppl))
    if "validation" in ppl:
        v = ppl["validation"]
        lines.append(f"- validation vs the PyTorch sparse reference: max |Δlogit| {v['max_abs_logit_diff']:.3g}, "
                     f"median relative error {v['median_rel_error']:.3g}, top-1 agreement {100 * v['top1_agreement']:.1f}%")
    fallbacks = [p for p in config.projections if getattr(p, "alpha_fallback", None)]
    if fallbacks:
        lines.append("- degenerate weight spectra (alpha not fitted): " + "; ".join(f"`{p.name}`: {p.alpha_fallback}" for p in fallbacks))
    lines += ["", "## Usage", "", "```python"]
    lines += ["from transformers import AutoTokenizer", "from acttail_export.runtime import load_model", ""]
    if repo_id:
        lines += ["from huggingface_hub import snapshot_download", "", f'folder = snapshot_download("{repo_id}")']
    else:
        lines += [f'folder = "{where}"']
    lines += [
        "model = load_model(folder)  # ORTModelForCausalLM; registers the custom op library if needed",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        'inputs = tokenizer("The capital of France is", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
    ]
    if config.kernel == "fused":
        op = "SparseMatMulNBits" if config.weights == "int4" else "SparseMatMul"
        lines += ["", f"The graph uses the custom op `com.acttail::{op}`; `{LIBRARY_NAME}` ({_library_note(cuda_kernels)}) "
                  "is included and registered by `load_model`."]
    if swiglu_ops:
        lines += ["", f"{swiglu_ops} down projection ops read the packed gate|up projection's output and apply SwiGLU "
                  "themselves (`activation=\"swiglu\"`: `silu(gate) * up` in float32, then the mask), in place of the "
                  "graph's Split / Sigmoid / Mul / Mul."]
    lines += ["", "## Per-projection budgets", "", "| projection | alpha | sparsity | threshold | k | effective |", "|---|---:|---:|---:|---:|---:|"]
    for p in config.projections:
        lines.append(f"| {p.name} | {_fmt(p.alpha, '.3f')} | {p.sparsity:.3f} | {_fmt(p.threshold, '.4g')} | {_fmt(p.k, 'd')} | "
                     f"{_fmt(p.effective_sparsity, '.3f')} |")
    versions = ", ".join(f"{k} {v}" for k, v in config.versions.items())
    if versions:
        lines += ["", f"Library versions: {versions}."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, config: ActTailConfig, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``folder`` (the op library copied there, if any, is inspected for CUDA kernels)."""
    library = Path(folder) / LIBRARY_NAME
    cuda_kernels = library_has_cuda_kernels(library) if library.is_file() else None
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(config, repo_id, cuda_kernels, _swiglu_ops(Path(folder))))
    return path


def _swiglu_ops(folder: Path) -> int:
    """Ops of ``folder/model.onnx`` with ``activation="swiglu"`` (0 for the mask kernel, or when there is no graph)."""
    graph = folder / "model.onnx"
    if not graph.is_file():
        return 0
    import onnx

    from .activation_fusion import fused_nodes

    try:
        return len(fused_nodes(onnx.load(str(graph), load_external_data=False)))
    except Exception:  # noqa: BLE001 - an unreadable graph: the card just does not mention the fold
        return 0
