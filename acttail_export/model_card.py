"""``README.md`` model card of an export: usage snippet, per-projection table, measured perplexity."""

from __future__ import annotations

from pathlib import Path

from .config import ActTailConfig

CARD_NAME = "README.md"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render_model_card(config: ActTailConfig, repo_id: str | None = None) -> str:
    """Markdown model card for ``config`` (pure: no files read)."""
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
        f"- allocation `{config.allocation}` (ε = {config.epsilon}, mapping `{config.mapping}`), mode `{config.mode}`, kernel `{config.kernel}`",
        f"- calibration: {config.calibration.samples} × {config.calibration.sequence_length} tokens of `{Path(config.calibration.data or '?').name}`",
    ]
    ppl = config.perplexity
    if "perplexity" in ppl:
        lines.append(f"- perplexity **{ppl['perplexity']:.3f}** on {ppl['tokens']} tokens of `{Path(ppl['data']).name}` "
                     f"(windows of {ppl['sequence_length']}, {ppl['backend']}), measured at export time")
    else:
        lines.append("- perplexity: not measured at export time (exported with --no-validate)")
    if "validation" in ppl:
        v = ppl["validation"]
        lines.append(f"- validation vs the PyTorch sparse reference: max |Δlogit| {v['max_abs_logit_diff']:.3g}, "
                     f"median relative error {v['median_rel_error']:.3g}, top-1 agreement {100 * v['top1_agreement']:.1f}%")
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
        lines += ["", "The graph uses the custom op `com.acttail::SparseMatMul`; `libacttail_ops.so` (Linux x86-64, CPU) "
                  "is included and registered by `load_model`."]
    lines += ["", "## Per-projection budgets", "", "| projection | alpha | sparsity | threshold | k | effective |", "|---|---:|---:|---:|---:|---:|"]
    for p in config.projections:
        lines.append(f"| {p.name} | {_fmt(p.alpha, '.3f')} | {p.sparsity:.3f} | {_fmt(p.threshold, '.4g')} | {_fmt(p.k, 'd')} | "
                     f"{_fmt(p.effective_sparsity, '.3f')} |")
    versions = ", ".join(f"{k} {v}" for k, v in config.versions.items())
    if versions:
        lines += ["", f"Library versions: {versions}."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, config: ActTailConfig, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``folder``."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(config, repo_id))
    return path
