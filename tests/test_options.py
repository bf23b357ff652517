"""``ExportOptions``: every bad value or combination is one ActTailError line naming the flag and the fix; the CLI
and the Python API build equal options; options -> export keyword arguments -> options is the identity."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import get_args

import pytest

from acttail_export import config
from acttail_export.errors import ActTailError
from acttail_export.lm_head import LM_HEADS
from acttail_export.options import Allocation, ExportOptions, Kernel, LmHead, Mode, Weights

# (keyword arguments, needle naming the flag and the fix, the same mistake as CLI flags or None when argparse
# refuses it first or the API spelling has no flag)
INVALID = [
    (dict(sparsity=1.0), "--sparsity must be in [0, 1), got 1.0", ["--sparsity", "1.0"]),
    (dict(sparsity=-0.1), "--sparsity must be in [0, 1)", ["--sparsity", "-0.1"]),
    (dict(sparsity="abc"), "--sparsity must be a number", None),
    (dict(sparsity=float("nan")), "--sparsity must be in [0, 1)", ["--sparsity", "nan"]),
    (dict(epsilon=1.5), "--epsilon must be in [0, 1)", ["--epsilon", "1.5"]),
    (dict(allocation="random"), "--allocation must be one of", None),
    (dict(mode="median"), "--mode must be one of topk, threshold; got 'median'", None),
    (dict(kernel="dense"), "--kernel must be one of mask, fused; got 'dense'", None),
    (dict(dtype="bf16"), "--dtype must be one of fp32, fp16; got 'bf16'", None),
    (dict(device="tpu"), "--device must be one of cpu, cuda; got 'tpu'", None),
    (dict(base="tensorrt"), "--base must be one of optimum, genai; got 'tensorrt'", None),
    (dict(calibration_samples=0), "--calibration-samples must be a positive integer, got 0",
     ["--calibration-samples", "0"]),
    (dict(calibration_samples=True), "--calibration-samples must be a positive integer", None),
    (dict(calibration_samples=2.5), "--calibration-samples must be a positive integer", None),
    (dict(sequence_length=1), "--sequence-length must be an integer >= 2, got 1", ["--sequence-length", "1"]),
    (dict(eval_tokens=-1), "eval_tokens must be 0 (no export-time perplexity) or an integer >= 2", None),
    (dict(eval_tokens=1), "eval_tokens must be 0 (no export-time perplexity) or an integer >= 2, got 1", None),
    (dict(mapping="no-such-mapping"), "--mapping must be one of", ["--mapping", "no-such-mapping"]),
    (dict(allocation="uniform", epsilon=0.1), "only apply to the allocations from HT-SR alphas: drop them or use "
     "--allocation htsr or acttail-greedy", ["--allocation", "uniform", "--epsilon", "0.1"]),
    (dict(allocation="uniform", mapping="group-linear-rev-abs"), "only apply to the allocations from HT-SR alphas",
     ["--allocation", "uniform", "--mapping", "group-linear-rev-abs"]),
    (dict(allocation="teal-greedy", epsilon=0.1), "only apply to the allocations from HT-SR alphas",
     ["--allocation", "teal-greedy", "--epsilon", "0.1"]),
    # the default at 50 % is TEAL's greedy search in both modes (config.DEFAULT_POLICY): the message names what it
    # resolved to, and in which mode
    (dict(epsilon=0.2), "--allocation acttail at 0.5 in threshold mode is teal-greedy (docs/allocation.md), which reads no "
     "alphas: drop them, or use --allocation htsr or acttail-greedy", ["--epsilon", "0.2"]),
    (dict(epsilon=0.2, mode="threshold", sparsity=0.6), "--allocation acttail at 0.6 in threshold mode is teal-greedy",
     ["--epsilon", "0.2", "--mode", "threshold", "--sparsity", "0.6"]),
    (dict(mapping="group-linear-rev-abs", sparsity=0.7), "--allocation acttail at 0.7 in topk mode is waterfill-greedy",
     ["--mapping", "group-linear-rev-abs", "--sparsity", "0.7"]),
    (dict(allocation="waterfill-greedy", epsilon=0.1), "only apply to the allocations from HT-SR alphas",
     ["--allocation", "waterfill-greedy", "--epsilon", "0.1"]),
    (dict(sparsity=0.995), "use --sparsity 0.99 or lower, or --allocation uniform", ["--sparsity", "0.995"]),
    (dict(private=True), "--private/--token only apply with --push-to-hub REPO_ID", ["--private"]),
    (dict(token="hf_secret"), "--private/--token only apply with --push-to-hub REPO_ID", ["--token", "hf_secret"]),
    (dict(base="genai", dtype="fp16"), "--base genai --dtype fp16 needs the CUDA provider",
     ["--base", "genai", "--dtype", "fp16"]),
    (dict(weights="int8"), "--weights must be one of fp32, fp16, int4", ["--weights", "int8"]),
    (dict(weights="fp16"), "needs --dtype fp16", ["--weights", "fp16"]),
    (dict(block_size=64), "only apply to --weights int4", ["--block-size", "64"]),
    (dict(quantizer="rtn"), "only apply to --weights int4", ["--quantizer", "rtn"]),
    (dict(weights="int4", block_size=48), "--block-size must be one of 32, 64, 128",
     ["--weights", "int4", "--block-size", "48"]),
    (dict(weights="int4", block_size=True), "--block-size must be one of 32, 64, 128", None),
    (dict(weights="int4", quantizer="awq"), "--quantizer must be one of rtn, mse, gptq, gptq-mse, gptq-act, gptq-mse-act",
     ["--weights", "int4", "--quantizer", "awq"]),
]


def _parse(argv: list[str]) -> argparse.Namespace:
    from acttail_export.commands.export import add_export_arguments

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    return parser.parse_args(["--model", "some/model", *argv, "out"])


def _cli_options(argv: list[str]) -> ExportOptions:
    from acttail_export.commands.export import export_options

    return export_options(_parse(argv))


@pytest.mark.parametrize("kwargs, needle, argv", INVALID, ids=[str(k) for k, _, _ in INVALID])
def test_invalid_value_is_one_line_naming_the_flag(kwargs, needle, argv):
    with pytest.raises(ActTailError) as api:
        ExportOptions(**kwargs)
    message = str(api.value)
    assert "\n" not in message and needle in message, message
    assert "hf_secret" not in message
    if argv is not None:  # the CLI refuses the same flags with the same line
        with pytest.raises(ActTailError) as cli:
            _cli_options(argv)
        assert str(cli.value) == message


@pytest.mark.parametrize("kwargs, needle, argv", INVALID[:3] + INVALID[-4:], ids=lambda v: str(v)[:40])
def test_invalid_override_of_valid_options_is_refused(kwargs, needle, argv):
    """``validated(options, **kwargs)`` checks the combined options again (export(model, out, options, mode=...))."""
    with pytest.raises(ActTailError, match="^[^\n]*$") as err:
        ExportOptions.validated(ExportOptions(), **kwargs)
    assert needle in str(err.value)


CLI_AND_API = [
    ([], {}),
    (["--sparsity", "0.8", "--mode", "threshold", "--kernel", "fused", "--allocation", "uniform"],
     dict(sparsity=0.8, mode="threshold", kernel="fused", allocation="uniform")),
    (["--allocation", "htsr", "--epsilon", "0.2", "--mapping", "group-max-rev-abs", "--calibration-data", "text.txt",
      "--calibration-samples", "8", "--sequence-length", "128", "--no-validate", "--overwrite"],
     dict(allocation="htsr", epsilon=0.2, mapping="group-max-rev-abs", calibration_data="text.txt", calibration_samples=8,
          sequence_length=128, validate=False, overwrite=True)),
    # the default's levels that read alphas take --epsilon / --mapping: HT-SR (90 %, top-k), the combination (70 % and
    # 90 %, threshold mode)
    (["--sparsity", "0.7", "--mode", "threshold", "--epsilon", "0.2"], dict(sparsity=0.7, mode="threshold", epsilon=0.2)),
    (["--sparsity", "0.9", "--mapping", "group-max-rev-abs"], dict(sparsity=0.9, mapping="group-max-rev-abs")),
    (["--sparsity", "0.9", "--mode", "threshold", "--epsilon", "0.2"], dict(sparsity=0.9, mode="threshold", epsilon=0.2)),
    (["--allocation", "teal-greedy", "--sparsity", "0.4"], dict(allocation="teal-greedy", sparsity=0.4)),
    (["--weights", "int4", "--block-size", "64", "--quantizer", "rtn"],
     dict(weights="int4", block_size=64, quantizer="rtn")),
    (["--weights", "int4"], dict(weights="int4")),  # block size and quantizer: the defaults (options.int4)
    (["--weights", "int4", "--kernel", "mask"], dict(weights="int4", kernel="mask")),
    (["--weights", "int4", "--lm-head", "float"], dict(weights="int4", lm_head="float")),
    (["--weights", "fp16", "--dtype", "fp16", "--device", "cuda"], dict(weights="fp16", dtype="fp16", device="cuda")),
    (["--push-to-hub", "me/tiny", "--private", "--token", "hf_x"],
     dict(push_to_hub="me/tiny", private=True, token="hf_x")),
    (["--base", "genai", "--device", "cuda", "--dtype", "fp16"], dict(base="genai", device="cuda", dtype="fp16")),
]


@pytest.mark.parametrize("argv, kwargs", CLI_AND_API, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_and_api_build_equal_options(argv, kwargs):
    # the CLI shows progress bars only on a terminal; the API default is True
    api = ExportOptions(**kwargs, progress=sys.stderr.isatty())
    assert _cli_options(argv) == api


def test_round_trip_options_to_export_kwargs():
    options = ExportOptions(sparsity="0.7", mode="threshold", kernel="fused", epsilon=0.25, calibration_data="t.txt",
                            calibration_samples=4, sequence_length=64, push_to_hub="me/x", token="hf_x", weights="int4",
                            quantizer="rtn", eval_tokens=0, progress=False)
    kwargs = options.to_kwargs()
    assert set(kwargs) == {f.name for f in dataclasses.fields(ExportOptions) if f.init}
    assert ExportOptions(**kwargs) == options
    assert ExportOptions.validated(None, **kwargs) == options and ExportOptions.validated(options) is options
    # normalized once: the number and the path as given by a caller that passed strings
    assert kwargs["sparsity"] == 0.7 and type(kwargs["sparsity"]) is float
    assert kwargs["calibration_data"].name == "t.txt"
    assert options.int4 == (32, "rtn") and ExportOptions().int4 is None
    # int4 defaults: block 32, GPTQ in act-order with mse ranges (on the export's calibration windows)
    assert ExportOptions(weights="int4").int4 == (32, "gptq-mse-act")
    assert ExportOptions(weights="int4", quantizer="mse").int4 == (32, "mse")
    assert ExportOptions.validated(options, sparsity=0.8) == dataclasses.replace(options, sparsity=0.8)
    assert "hf_x" not in repr(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.sparsity = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError, match="ExportOptions"):
        ExportOptions.validated({"sparsity": 0.5})  # type: ignore[arg-type]


def test_literal_types_match_the_config_choices():
    """The typed fields accept exactly what acttail_config.json accepts."""
    assert set(get_args(Mode)) == set(config.MODES)
    assert set(get_args(Kernel)) == set(config.KERNELS)
    assert set(get_args(Weights)) == set(config.WEIGHTS)
    assert set(get_args(Allocation)) == set(config.ALLOCATIONS)
    assert set(get_args(LmHead)) == set(LM_HEADS)


def test_export_with_options_equals_export_with_kwargs(tiny_llama_dir, wikitext_valid, tmp_path, monkeypatch):
    """``export(model, out, options)`` and ``export(model, out, **options.to_kwargs())`` run the pipeline with equal
    options (the pipeline proper is replaced: this tests the entry point)."""
    from acttail_export import exporter
    from acttail_export.config import ActTailConfig

    seen = []

    def build(model_ref, tmp, options, *args, **kwargs):
        seen.append(options)
        (tmp / "model.onnx").write_bytes(b"stub")
        return ActTailConfig(target_sparsity=options.sparsity)

    monkeypatch.setattr(exporter, "_build", build)
    options = ExportOptions(sparsity=0.6, mode="threshold", calibration_data=wikitext_valid, calibration_samples=2,
                            sequence_length=32, validate=False, progress=False)
    exporter.export(str(tiny_llama_dir), tmp_path / "a", options)
    exporter.export(str(tiny_llama_dir), tmp_path / "b", **options.to_kwargs())
    exporter.export(str(tiny_llama_dir), tmp_path / "c", ExportOptions(), **options.to_kwargs())
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2] == options
    with pytest.raises(ActTailError, match="--mode must be one of"):
        exporter.export(str(tiny_llama_dir), tmp_path / "d", options, mode="median")
    assert not (tmp_path / "d").exists() and len(seen) == 3


def test_export_logs_a_mode_chosen_by_the_target(tiny_llama_dir, wikitext_valid, tmp_path, monkeypatch, caplog):
    """A mode the target chose is named in the log (the default changed from top-k at every level); an explicit one is not."""
    import logging

    from acttail_export import exporter
    from acttail_export.config import ActTailConfig

    def build(model_ref, tmp, options, *args, **kwargs):
        (tmp / "model.onnx").write_bytes(b"stub")
        return ActTailConfig(target_sparsity=options.sparsity)

    monkeypatch.setattr(exporter, "_build", build)
    settings = dict(calibration_data=wikitext_valid, calibration_samples=2, sequence_length=32, validate=False, progress=False)
    with caplog.at_level(logging.INFO, logger="acttail_export.exporter"):
        exporter.export(str(tiny_llama_dir), tmp_path / "a", sparsity=0.5, **settings)
        exporter.export(str(tiny_llama_dir), tmp_path / "b", sparsity=0.5, mode="topk", **settings)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--mode ")]
    assert lines == ["--mode threshold: the default at sparsity 0.5 (topk at 0, threshold up to 0.65, topk above: "
                     "docs/allocation.md section 6q)"]


def test_kernel_default_follows_the_weights():
    """No --kernel: mask (standard ONNX ops) for float weights, fused for --weights int4, whose mask graph would use ONNX
    Runtime's MatMulNBits with float zero points (dequantized on every CPU call); an explicit --kernel stays."""
    assert ExportOptions().kernel == "mask" and ExportOptions(weights="fp32").kernel == "mask"
    assert ExportOptions(weights="int4").kernel == "fused"
    assert ExportOptions(weights="int4", kernel="mask").kernel == "mask"
    assert ExportOptions(kernel="fused").kernel == "fused"
    assert _cli_options(["--weights", "int4"]).kernel == "fused" and _cli_options([]).kernel == "mask"
    resolved = ExportOptions(weights="int4", progress=False)
    assert ExportOptions(**resolved.to_kwargs()) == resolved  # the resolved kernel round-trips
    # replacing the weights of validated options: a kernel that was the old weights' default follows the new ones,
    # a kernel that was asked for stays
    assert ExportOptions.validated(ExportOptions(), weights="int4").kernel == "fused"
    assert ExportOptions.validated(ExportOptions(weights="int4"), weights="fp32").kernel == "mask"
    assert ExportOptions.validated(ExportOptions(kernel="fused"), weights="int4").kernel == "fused"
    assert ExportOptions.validated(ExportOptions(weights="int4", kernel="mask"), weights="int4").kernel == "mask"
    assert ExportOptions.validated(ExportOptions(), weights="int4", kernel="mask").kernel == "mask"


def test_mode_default_follows_the_target():
    """No --mode: threshold up to 65 % (lower validation perplexity at 40-60 %, and no selection kernel on a GPU), top-k
    above it and for a dense target (config.DEFAULT_MODE_POLICY); an explicit --mode stays."""
    assert [config.default_mode(s) for s in (0.0, 0.01, 0.4, 0.5, 0.65, 0.66, 0.7, 0.9, 0.99)] == [
        "topk", "threshold", "threshold", "threshold", "threshold", "topk", "topk", "topk", "topk"]
    assert ExportOptions().mode == "threshold" and ExportOptions(sparsity=0.8).mode == "topk"
    assert ExportOptions().mode_from_target and not ExportOptions(mode="threshold").mode_from_target
    assert ExportOptions(sparsity=0.0).mode == "topk" and ExportOptions(sparsity=0.4).mode == "threshold"
    assert ExportOptions(mode="topk").mode == "topk" and ExportOptions(sparsity=0.8, mode="threshold").mode == "threshold"
    assert _cli_options([]).mode == "threshold" and _cli_options(["--sparsity", "0.8"]).mode == "topk"
    assert _cli_options(["--mode", "topk"]).mode == "topk"
    resolved = ExportOptions(sparsity=0.8, progress=False)
    assert ExportOptions(**resolved.to_kwargs()) == resolved  # the resolved mode round-trips
    # replacing the target of validated options: a mode filled in from the old target follows the new one, a mode that
    # was asked for stays (also when it equals the old target's default)
    assert ExportOptions.validated(ExportOptions(), sparsity=0.8).mode == "topk"
    assert ExportOptions.validated(ExportOptions(sparsity=0.8), sparsity=0.5).mode == "threshold"
    assert ExportOptions.validated(ExportOptions(mode="topk"), sparsity=0.6).mode == "topk"
    assert ExportOptions.validated(ExportOptions(mode="threshold"), sparsity=0.8).mode == "threshold"
    assert ExportOptions.validated(ExportOptions(), sparsity=0.8, mode="threshold").mode == "threshold"
    assert ExportOptions.validated(ExportOptions(), overwrite=True).mode == "threshold"  # same target: unchanged
    # the origin survives other replacements and the keyword round trip
    kept = ExportOptions.validated(ExportOptions(), calibration_samples=8)
    assert kept.mode_from_target and ExportOptions.validated(kept, sparsity=0.8).mode == "topk"
    again = ExportOptions(**ExportOptions().to_kwargs())
    assert again.mode_from_target and again.to_kwargs()["mode"] is None
    assert ExportOptions(mode="threshold").to_kwargs()["mode"] == "threshold"


@pytest.mark.parametrize("kwargs, warned", [
    (dict(weights="int4", kernel="mask"), "--kernel mask with --weights int4"),
    (dict(weights="int4", sparsity=0.0), "--sparsity 0 with --weights int4"),  # every projection a MatMulNBits
    (dict(weights="int4"), None),  # the fused default
    (dict(kernel="mask"), None),  # float weights: no MatMulNBits
    (dict(weights="int4", kernel="mask", device="cuda", dtype="fp16"), None),  # the warning is about ORT's CPU kernel
])
def test_matmulnbits_on_the_cpu_warns(tmp_path, caplog, kwargs, warned):
    """A CPU int4 export whose projections become MatMulNBits with float zero points (--kernel mask, or sparsity 0) is
    logged as the slow graph it is, before anything loads."""
    import logging

    from acttail_export import exporter

    caplog.set_level(logging.WARNING, logger="acttail_export")
    with pytest.raises(ActTailError):  # no such model (or no CUDA device): fails after the option checks
        exporter.export(str(tmp_path / "missing"), tmp_path / "out", calibration_data=tmp_path / "missing.txt",
                        progress=False, **kwargs)
    found = "with --weights int4: the projections become" in caplog.text
    assert found == (warned is not None) and (warned is None or warned in caplog.text)
    assert not (tmp_path / "out").exists()
