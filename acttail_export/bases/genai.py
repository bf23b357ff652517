"""``--base genai``: onnxruntime-genai's model-builder graph (the fast GPU decode base), then the ActTail rewrite.

The folder loads with onnxruntime-genai alone (``og.Model(folder)``: ``genai_config.json`` names the rewritten
``model.onnx`` and the op library) and, on CPU (fp32), also with :func:`acttail_export.runtime.load_model`.
The builder steps live in :mod:`acttail_export.genai_base`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import ExportBase

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ActTailConfig
    from ..options import ExportOptions

logger = logging.getLogger(__name__)

USAGE = """## Usage with onnxruntime-genai (GPU decode base)

This export was built with `--base genai`: `model.onnx` is onnxruntime-genai's model-builder graph
({provider} provider) with the ActTail rewrite, and `genai_config.json` names it{library}.

```python
import onnxruntime_genai as og
from transformers import AutoTokenizer
{where}
tok = AutoTokenizer.from_pretrained(folder); model = og.Model(folder)
params = og.GeneratorParams(model); params.set_search_options(max_length=64)
gen = og.Generator(model, params); gen.append_tokens(tok("The capital of France is").input_ids)
while not gen.is_done(): gen.generate_next_token()
print(tok.decode(gen.get_sequence(0)))
```

"""


class GenaiBase(ExportBase):
    """Builder graph (``fuse_qkv`` / ``fuse_mlp_gate_up`` when the masks allow) -> rewrite -> ``genai_config.json``."""

    name = "genai"
    supports_int4 = True  # SparseMatMulNBits / MatMulNBits in the builder graph, packed members side by side
    extra_distributions = ("onnxruntime-genai", "onnxruntime-genai-cuda")

    def check_options(self, options: ExportOptions) -> None:
        from ..genai_base import builder_settings

        builder_settings(options.dtype, options.device)  # e.g. fp16 needs --device cuda

    def check(self, options: ExportOptions) -> None:
        from ..genai_base import check_genai

        check_genai(options.dtype, options.device)  # imports the model builder (seconds the first time)

    def build(self, model: Any, tokenizer: Any, tmp: Path, config: ActTailConfig, options: ExportOptions,
              quantized: dict | None, library: str | None) -> None:
        from ..exporter import _stage
        from ..genai_base import builder_settings, export_genai

        precision, provider = builder_settings(options.dtype, options.device)
        with _stage("genai base build and graph rewrite"):
            # model.onnx: the rewritten builder graph (weights in model.onnx.data), genai_config.json naming it
            export_genai(model, tokenizer, tmp, config, mode=options.mode, kernel=options.kernel, dtype=precision,
                         execution_provider=provider, filename="model.onnx", library=library, work_dir=tmp,
                         progress=options.progress, quantized=quantized, source=config.model)

    def max_eval_length(self, folder: Path) -> int | None:
        """The builder's rotary cache ends at ``context_length`` of ``genai_config.json``."""
        from ..genai_base import GENAI_CONFIG

        return json.loads((folder / GENAI_CONFIG).read_text())["model"].get("context_length") or None

    def finalize(self, card: Path, options: ExportOptions, repo_id: str | None) -> None:
        add_usage(card, options.device, repo_id)


def add_usage(card: Path, execution_provider: str, repo_id: str | None = None) -> None:
    """Put the onnxruntime-genai snippet into the model card, before the per-projection table."""
    from ..ops import LIBRARY_NAME

    text = card.read_text()
    where = (f'from huggingface_hub import snapshot_download\nfolder = snapshot_download("{repo_id}")' if repo_id
             else 'folder = "path/to/this/folder"')
    library = f" and the op library `{LIBRARY_NAME}`" if (card.parent / LIBRARY_NAME).is_file() else ""
    note = USAGE.format(provider=execution_provider.upper(), where=where, library=library)
    marker = "## Per-projection budgets"
    card.write_text(text.replace(marker, note + marker, 1) if marker in text else text + "\n" + note)
