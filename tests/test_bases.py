"""Export bases: the registry, the interface, and a third base added in one class (here, in the test)."""

from __future__ import annotations

import json

import pytest

from acttail_export.bases import BASES, ExportBase, GenaiBase, OptimumBase, get_base
from acttail_export.config import ActTailConfig
from acttail_export.errors import ActTailError
from acttail_export.options import ExportOptions

FAST = {"calibration_samples": 2, "sequence_length": 32, "eval_tokens": 0, "progress": False}


def test_registry_has_both_bases():
    assert isinstance(BASES["optimum"], OptimumBase) and isinstance(BASES["genai"], GenaiBase)
    for name, base in BASES.items():
        assert isinstance(base, ExportBase) and base.name == name and get_base(name) is base
    assert BASES["optimum"].supports_int4 and BASES["genai"].supports_int4


def test_unknown_base_is_one_line(tiny_llama_dir, tmp_path):
    from acttail_export.exporter import export

    with pytest.raises(ActTailError, match=r"--base must be one of optimum, genai; got \[.optimum.\]"):
        ExportOptions(base=["optimum"])  # not a name: the same one-line error, not a TypeError
    for call in (lambda: ExportOptions(base="nope"), lambda: get_base("nope"),
                 lambda: export(str(tiny_llama_dir), tmp_path / "out", base="nope")):
        with pytest.raises(ActTailError) as err:
            call()
        assert str(err.value) == "--base must be one of optimum, genai; got 'nope'"
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_cli_lists_the_registered_bases(capsys):
    from acttail_export.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--model", "smollm2", "out", "--base", "nope"])
    err = capsys.readouterr().err  # argparse quotes the choices or not, depending on the Python version
    assert exit_.value.code == 2 and "invalid choice" in err and all(name in err for name in BASES)


class RecordingBase(OptimumBase):
    """A third base in one class: optimum's graph, plus a file of its own, a card section and a recorded version."""

    name = "recording"
    extra_distributions = ("pytest",)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def check(self, options):
        self.calls.append("check")

    def build(self, model, tokenizer, tmp, config, options, quantized, library):
        # the shared steps ran first: budgets and calibration are in the config
        assert config.projections and all(p.threshold is not None for p in config.projections)
        self.calls.append("build")
        super().build(model, tokenizer, tmp, config, options, quantized, library)
        (tmp / "recording.json").write_text(json.dumps({"projections": len(config.projections)}))

    def finalize(self, card, options, repo_id):
        self.calls.append("finalize")
        card.write_text(card.read_text() + "\n## Built by the recording base\n")


@pytest.mark.optimum  # the third base wraps optimum-onnx's graph
def test_a_third_base_runs_through_export(tiny_llama_dir, tmp_path, monkeypatch):
    from acttail_export.exporter import export

    base = RecordingBase()
    monkeypatch.setitem(BASES, "recording", base)
    out = export(str(tiny_llama_dir), tmp_path / "out", base="recording", sparsity=0.5, mode="threshold", **FAST)
    assert base.calls == ["check", "build", "finalize"]
    config = ActTailConfig.load(out)
    assert json.loads((out / "recording.json").read_text()) == {"projections": len(config.projections)}
    assert "## Built by the recording base" in (out / "README.md").read_text()
    assert "pytest" in config.versions and "torch" in config.versions
    # the shared validation ran on the graph this base wrote (ORT vs the PyTorch sparse reference)
    validation = config.perplexity["validation"]
    assert validation["forced_mask_rel_error"] <= validation["tolerance"]
    assert validation["forced_top1_agreement"] >= validation["forced_top1_floor"]


def test_base_value_checks_run_in_options(monkeypatch):
    with pytest.raises(ActTailError, match="needs the CUDA provider"):
        ExportOptions(base="genai", dtype="fp16")

    class FloatOnly(GenaiBase):
        name = "float-only"
        supports_int4 = False

    monkeypatch.setitem(BASES, "float-only", FloatOnly())
    with pytest.raises(ActTailError, match=r"--weights int4 needs --base optimum or --base genai \(the float-only base"):
        ExportOptions(base="float-only", weights="int4")
    assert ExportOptions(base="optimum", weights="int4").int4 is not None
    assert ExportOptions(base="genai", weights="int4").int4 is not None


def test_genai_usage_goes_before_the_budget_table(tmp_path):
    from acttail_export.bases.genai import add_usage
    from acttail_export.ops import LIBRARY_NAME

    card = tmp_path / "README.md"
    card.write_text("# model\n\n## Per-projection budgets\n| a |\n")
    add_usage(card, "cuda", "org/model")
    text = card.read_text()
    usage = text.index("## Usage with onnxruntime-genai")
    assert usage < text.index("## Per-projection budgets") and text.count("## Per-projection budgets") == 1
    assert 'snapshot_download("org/model")' in text and "CUDA provider" in text and LIBRARY_NAME not in text
    (tmp_path / LIBRARY_NAME).write_bytes(b"")
    card.write_text("# no table\n")
    add_usage(card, "cpu")
    text = card.read_text()
    assert text.startswith("# no table\n") and 'folder = "path/to/this/folder"' in text and LIBRARY_NAME in text


def test_genai_eval_length_is_the_builder_context(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 96}}))
    assert BASES["genai"].max_eval_length(tmp_path) == 96
    assert BASES["optimum"].max_eval_length(tmp_path) is None


def test_cli_accepts_a_registered_base(monkeypatch):
    from acttail_export.cli import build_parser

    monkeypatch.setitem(BASES, "recording", RecordingBase())
    args = build_parser().parse_args(["export", "--model", "smollm2", "out", "--base", "recording"])
    assert args.base == "recording"
