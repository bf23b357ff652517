"""ActTailConfig: validators, JSON round trip, and clear errors for bad files."""

from __future__ import annotations

import json
import math

import pytest

from acttail_export.config import CONFIG_NAME, ActTailConfig, ProjectionConfig, check_epsilon, check_sparsity, topk_keep
from acttail_export.errors import ActTailError


def _config() -> ActTailConfig:
    projections = [
        ProjectionConfig(name="model.layers.0.self_attn.q_proj", layer=0, kind="q_proj", in_features=8, out_features=8,
                         sparsity=0.25, alpha=3.5, threshold=0.125, k=6, effective_sparsity=0.25),
        ProjectionConfig(name="model.layers.0.mlp.down_proj", layer=0, kind="down_proj", in_features=16, out_features=8,
                         sparsity=0.625, alpha=5.25, threshold=0.5, k=6),
    ]
    return ActTailConfig(target_sparsity=0.5, allocation="acttail", mode="threshold", kernel="fused", epsilon=0.1,
                         mapping="linear", projections=projections, calibration={"data": "v.raw", "samples": 4,
                         "sequence_length": 32, "tokens": 128}, versions={"torch": "2.13.0"})


def test_round_trip_through_json(tmp_path):
    config = _config()
    path = config.save(tmp_path)
    assert path.name == CONFIG_NAME
    loaded = ActTailConfig.load(tmp_path)
    assert loaded == config and loaded.to_dict() == json.loads(path.read_text())
    # parameter-weighted mean of the budgets: (0.25*64 + 0.625*128) / 192
    assert math.isclose(loaded.weighted_sparsity(), (0.25 * 64 + 0.625 * 128) / 192)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "abc", None])
def test_sparsity_and_epsilon_outside_unit_interval_are_rejected(value):
    with pytest.raises(ActTailError, match=r"\[0, 1\)"):
        check_sparsity(value)
    with pytest.raises(ActTailError, match=r"epsilon"):
        check_epsilon(value)
    assert check_sparsity("0.5") == 0.5 and check_epsilon(0) == 0.0


@pytest.mark.parametrize("change, message", [
    ({"allocation": "random"}, "allocation must be one of"),
    ({"mode": "median"}, "mode must be one of"),
    ({"kernel": "dense"}, "kernel must be one of"),
    ({"s_max": 1.0}, "s_max"),
    ({"target_sparsity": 1.0}, "target sparsity"),
])
def test_invalid_fields_are_rejected(change, message):
    data = _config().to_dict() | change
    with pytest.raises(ActTailError, match=message):
        ActTailConfig.from_dict(data)


def test_invalid_projection_and_files(tmp_path):
    bad = _config().to_dict()
    bad["projections"][0]["k"] = 9  # more than in_features
    with pytest.raises(ActTailError, match="k of model.layers.0.self_attn.q_proj"):
        ActTailConfig.from_dict(bad)
    with pytest.raises(ActTailError, match="unknown keys"):
        ActTailConfig.from_dict(_config().to_dict() | {"surprise": 1})
    partial = {k: v for k, v in _config().to_dict().items() if k != "target_sparsity"}
    with pytest.raises(ActTailError, match=r"^invalid acttail_config.json: missing target_sparsity; re-run"):
        ActTailConfig.from_dict(partial)  # the fields' names, not the dataclass constructor's TypeError
    with pytest.raises(ActTailError, match="not found"):
        ActTailConfig.load(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ActTailError, match="not valid JSON"):
        ActTailConfig.load(tmp_path)


@pytest.mark.parametrize("sparsity, d, expected", [(0.0, 10, 10), (0.5, 10, 5), (0.55, 10, 5), (0.8, 576, 116), (0.99, 100, 1)])
def test_topk_keep_is_ceil_of_kept_fraction(sparsity, d, expected):
    assert topk_keep(sparsity, d) == expected == math.ceil(round((1 - sparsity) * d, 9))


# --- files that are not a JSON object -----------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"[]", "holds a JSON list, not an object"),
    (b'"acttail"', "holds a JSON str, not an object"),
    (b"null", "holds a JSON NoneType, not an object"),
    (b'{"target_sparsity": 0.5, "model": "caf\xe9"}', "is not UTF-8 text"),
])
def test_config_file_that_is_not_a_utf8_json_object(tmp_path, content, message):
    (tmp_path / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ActTailError, match=message) as info:
        ActTailConfig.load(tmp_path)
    assert "\n" not in str(info.value) and CONFIG_NAME in str(info.value)


@pytest.mark.parametrize("data", [[], [["target_sparsity", 0.5]], "x", 3, None])
def test_from_dict_requires_a_mapping(data):
    with pytest.raises(ActTailError, match="expected a JSON object"):
        ActTailConfig.from_dict(data)


# --- recorded paths -----------------------------------------------------------------------------
def test_save_records_local_paths_absolute(tmp_path, monkeypatch):
    """``evaluate --model EXPORT`` reads the file from any working directory: relative paths would name nothing there."""
    from pathlib import Path

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "calib.txt").write_text("text")
    monkeypatch.chdir(tmp_path)
    config = _config()
    config.model = "models/tiny"
    config.calibration.data = "calib.txt"
    config.save(tmp_path / "models")
    saved = json.loads((tmp_path / "models" / CONFIG_NAME).read_text())
    for recorded, path in ((saved["model"], tmp_path / "models" / "tiny"), (saved["calibration"]["data"], tmp_path / "calib.txt")):
        assert Path(recorded).is_absolute() and Path(recorded).resolve() == path.resolve()
    monkeypatch.chdir("/")
    loaded = ActTailConfig.load(tmp_path / "models" / CONFIG_NAME)
    assert loaded.model == saved["model"] and loaded == config
    # Hub ids, placeholders and absolute paths are kept as given
    for ref in ("HuggingFaceTB/SmolLM2-135M", "<token windows>", str(tmp_path / "gone"), None):
        config.model = config.calibration.data = ref
        config.save(tmp_path)
        assert ActTailConfig.load(tmp_path).model == ref and ActTailConfig.load(tmp_path).calibration.data == ref


# --- uniform allocation: no epsilon / mapping ---------------------------------------------------
def test_uniform_config_records_no_epsilon_or_mapping(tmp_path):
    config = ActTailConfig(target_sparsity=0.5, allocation="uniform", epsilon=None, mapping=None)
    config.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["epsilon"] is None and saved["mapping"] is None
    assert ActTailConfig.load(tmp_path) == config
    with pytest.raises(ActTailError, match="mapping must be a string or null"):
        ActTailConfig.from_dict(config.to_dict() | {"mapping": 3})
    with pytest.raises(ActTailError, match="epsilon"):
        ActTailConfig.from_dict(config.to_dict() | {"epsilon": 2.0})


# --- the model card's account of the config -----------------------------------------------------
def test_model_card_uniform_allocation_shows_no_epsilon_or_mapping():
    from acttail_export.model_card import render_model_card

    card = render_model_card(ActTailConfig(target_sparsity=0.5, allocation="uniform", epsilon=None, mapping=None, model="m"))
    (line,) = [line for line in card.splitlines() if line.startswith("- allocation")]
    assert line == "- allocation `uniform` (the same budget for every projection), mode `topk`, kernel `mask`"
    assert "ε" not in card and "None" not in card
    card = render_model_card(_config())
    assert "allocation `acttail` (ε = 0.1, mapping `linear`)" in card


def test_default_method_per_mode_round_trips_and_shows_in_the_card(tmp_path):
    """At 90 % ``acttail`` is HT-SR in top-k mode and the combination in threshold mode (config.DEFAULT_POLICY): the
    config records the mode's method, keeps it through JSON, and the model card names it."""
    from acttail_export.config import resolve_allocation
    from acttail_export.model_card import render_model_card

    for mode, method in (("topk", "htsr"), ("threshold", "acttail-greedy")):
        config = ActTailConfig(target_sparsity=0.9, allocation="acttail", mode=mode, epsilon=0.1, mapping="block-abs",
                               allocation_method=resolve_allocation("acttail", 0.9, mode), model="m")
        assert config.allocation_method == method
        (tmp_path / mode).mkdir()
        loaded = ActTailConfig.load(config.save(tmp_path / mode))
        assert loaded == config and json.loads((tmp_path / mode / CONFIG_NAME).read_text())["allocation_method"] == method
        (line,) = [line for line in render_model_card(loaded).splitlines() if line.startswith("- allocation")]
        assert line.startswith(f"- allocation `acttail` = `{method}`") and f"mode `{mode}`" in line
    # at 80 % in top-k mode: the water-filled block levels (docs/allocation.md section 6d), no alphas recorded
    config = ActTailConfig(target_sparsity=0.8, allocation="acttail", mode="topk",
                           allocation_method=resolve_allocation("acttail", 0.8, "topk"), model="m")
    assert ActTailConfig.load(config.save(tmp_path)).allocation_method == "waterfill-greedy"
    (line,) = [line for line in render_model_card(config).splitlines() if line.startswith("- allocation")]
    assert line == ("- allocation `acttail` = `waterfill-greedy` (block levels water-filled on the greedy search's block "
                    "errors, its budgets inside each block), mode `topk`, kernel `mask`")


def test_model_card_says_why_the_perplexity_is_missing():
    from acttail_export.model_card import render_model_card

    config = _config()
    assert "(exported with --no-validate)" in render_model_card(config)  # neither validation nor perplexity
    config.perplexity = {"validation": {"max_abs_logit_diff": 1e-5, "median_rel_error": 1e-6, "top1_agreement": 1.0}}
    card = render_model_card(config)  # validated, so the evaluation text was what was missing
    assert "--no-validate" not in card and "`wiki.test.raw`, was not found" in card
    config.perplexity["skipped"] = "export-time perplexity disabled (eval_tokens=0)"
    assert "not measured at export time (export-time perplexity disabled (eval_tokens=0))" in render_model_card(config)


def _elf(path, section_names: list[bytes]) -> str:
    """A minimal ELF64 little-endian file whose section header table names ``section_names``."""
    import struct

    names = b"\0" + b"".join(name + b"\0" for name in [b".shstrtab", *section_names])
    offsets, at = [], 1
    for name in [b".shstrtab", *section_names]:
        offsets.append(at)
        at += len(name) + 1
    strtab_off = 64
    shoff = strtab_off + len(names)
    shnum = 2 + len(section_names)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, shnum, 1)
    sections = bytes(64)  # SHN_UNDEF
    sections += struct.pack("<IIQQQQIIQQ", offsets[0], 3, 0, 0, strtab_off, len(names), 0, 0, 1, 0)
    for offset in offsets[1:]:
        sections += struct.pack("<IIQQQQIIQQ", offset, 1, 2, 0, 0, 0, 0, 0, 8, 0)
    path.write_bytes(header + names + sections)
    return str(path)


def test_model_card_reports_the_kernels_the_library_holds(tmp_path):
    from acttail_export.model_card import library_has_cuda_kernels, render_model_card, write_model_card

    assert library_has_cuda_kernels(_elf(tmp_path / "cuda.so", [b".text", b".nv_fatbin", b".data"])) is True
    assert library_has_cuda_kernels(_elf(tmp_path / "cpu.so", [b".text", b".data", b".nv_fatbin_not"])) is False
    (tmp_path / "junk.so").write_bytes(b"not an ELF file at all")
    assert library_has_cuda_kernels(tmp_path / "junk.so") is None
    assert library_has_cuda_kernels(tmp_path / "missing.so") is None

    config = _config()  # kernel="fused": the card describes the included op library
    assert "CPU and CUDA kernels" in render_model_card(config, cuda_kernels=True)
    assert "CPU kernels only" in render_model_card(config, cuda_kernels=False)
    assert "CPU kernels, plus CUDA kernels when built with nvcc" in render_model_card(config)
    for build, expected in (("cuda.so", "CPU and CUDA kernels"), ("cpu.so", "CPU kernels only")):
        folder = tmp_path / build.replace(".so", "")
        folder.mkdir()
        (folder / "libacttail_ops.so").write_bytes((tmp_path / build).read_bytes())
        text = write_model_card(folder, config).read_text()
        assert expected in text and "(Linux x86-64, CPU)" not in text


def test_library_detection_on_the_built_op_library():
    from acttail_export.model_card import library_has_cuda_kernels
    from acttail_export.ops import get_library_path

    try:
        path = get_library_path()
    except ActTailError:
        pytest.skip("op library not built (make ops)")
    assert library_has_cuda_kernels(path) in (True, False)  # a real ELF: always a definite answer


@pytest.mark.parametrize(("fields", "want"), [
    (dict(), "- weights: float (as exported)"),
    (dict(weights="fp16"), "- weights: fp16 (as exported)"),
    (dict(weights="int4", block_size=64, quantizer="rtn", lm_head="float"),
     "- weights: projections 4-bit (blocks of 64 along the input dimension, quantizer `rtn`), lm_head float"),
    (dict(weights="int4", block_size=32, quantizer="gptq-mse-act", lm_head="int8"),
     "- weights: projections 4-bit (blocks of 32 along the input dimension, quantizer `gptq-mse-act`), lm_head 8-bit "
     "`MatMulNBits` (symmetric blocks of 32, int8 activations on the CPU)"),
])
def test_model_card_names_the_weights(fields, want):
    from acttail_export.model_card import render_model_card

    card = render_model_card(ActTailConfig(target_sparsity=0.5, kernel="fused", model="m", **fields))
    assert [line for line in card.splitlines() if line.startswith("- weights")] == [want]
    op = "SparseMatMulNBits" if fields.get("weights") == "int4" else "SparseMatMul"
    assert f"custom op `com.acttail::{op}`;" in card
