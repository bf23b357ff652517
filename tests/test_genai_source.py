"""The genai base's builder reads the model's own Hugging Face folder when it can (no scratch copy of the loaded
model): the folder it writes is the one the scratch copy gives, weight for weight, for float and 4-bit exports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from acttail_export import genai_base as gbase

pytestmark = pytest.mark.skipif("not (gbase.genai_available() and gbase.builder_problem() is None)",
                                reason="onnxruntime-genai's model builder does not import")

FAST = dict(calibration_samples=2, sequence_length=32, eval_tokens=0, progress=False, base="genai", sparsity=0.5,
            kernel="fused", mode="threshold", allocation="uniform")


def _initializers(folder) -> dict[str, np.ndarray]:
    graph = onnx.load(str(folder / "model.onnx")).graph  # external data from the folder
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def test_builder_can_read(tiny_llama_dir, tmp_path):
    assert gbase.builder_can_read(tiny_llama_dir)
    assert not gbase.builder_can_read(tmp_path)  # no config.json
    assert not gbase.builder_can_read(tiny_llama_dir / "config.json")  # a file
    partial = tmp_path / "no-tokenizer"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (partial / "model.safetensors").write_bytes(b"")
    assert not gbase.builder_can_read(partial)  # the builder copies the tokenizer from its input
    (partial / "tokenizer_config.json").write_text("{}")
    assert gbase.builder_can_read(partial)
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq"}}))
    assert not gbase.builder_can_read(partial)


@pytest.mark.parametrize("weights", [{}, {"weights": "int4", "block_size": 32, "quantizer": "rtn"}], ids=["float", "int4"])
def test_direct_read_writes_the_scratch_copys_folder(tiny_llama_dir, tmp_path, wikitext_valid, monkeypatch, weights,
                                                     caplog):
    from acttail_export.exporter import export

    common = dict(calibration_data=str(wikitext_valid), **FAST, **weights)
    with caplog.at_level("INFO", logger="acttail_export.genai_base"):
        direct = export(str(tiny_llama_dir), tmp_path / "direct", **common)
    assert f"the builder reads {tiny_llama_dir}" in caplog.text
    monkeypatch.setattr(gbase, "builder_can_read", lambda folder: False)
    copied = export(str(tiny_llama_dir), tmp_path / "copied", **common)
    a, b = _initializers(direct), _initializers(copied)
    assert a.keys() == b.keys() and a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for name in ("config.json", "genai_config.json", "acttail_config.json"):
        assert (direct / name).is_file(), name
    assert json.loads((direct / "acttail_config.json").read_text())["projections"] == \
        json.loads((copied / "acttail_config.json").read_text())["projections"]
