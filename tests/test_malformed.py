"""Malformed input (issue 18): generated tiny broken models, hand-edited configs, odd paths and signals.

Every case asserts exit code 2 with exactly one line on stderr and no traceback, and that nothing is left
behind; or, where the input is usable after all, an export that loads and validates. The CLI runs in
this process (``cli.main`` with argv); only the signal cases start a subprocess. The broken models come
from ``tests/malformed_models.py``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import malformed_models as mm
import numpy as np
import pytest

from acttail_export.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--calibration-samples", "2", "--sequence-length", "32"]
NAN, INF = float("nan"), float("inf")

TEXT = ("The river flows past the old mill, and the town grew up along its banks in the years after the war. "
        "Merchants brought grain and wool; the bridge was rebuilt in stone in 1821, and a railway arrived later. ")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """Calibration / evaluation text (a few thousand tokens: enough for 2 windows of 32 and the validation)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT * 60)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("malformed")


def _leftovers(out: Path) -> list[str]:
    parent = out.parent
    return [p.name for p in parent.iterdir() if ".acttail-" in p.name] if parent.is_dir() else []


def _export(capsys, model: Path, out: Path, text: Path, *extra: str) -> tuple[int, str]:
    capsys.readouterr()  # only the command's own output (not transformers' bars of the test's model edits)
    rc = main(["export", "--model", str(model), *FAST, "--calibration-data", str(text), *extra, str(out)])
    return rc, capsys.readouterr().err


def _one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one stderr line ``acttail-export: error: ...`` containing ``needles``, no traceback."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("acttail-export: error: "), err
    for needle in needles:  # "a|b": either wording (it differs between transformers 4 and 5)
        assert any(alternative in lines[0] for alternative in needle.split("|")), lines[0]
    return lines[0]


def _refused(capsys, model: Path, tmp_path: Path, text: Path, *extra: str, needles: tuple[str, ...] = ()) -> str:
    out = tmp_path / "out"
    line = _one_line_error(*_export(capsys, model, out, text, *extra), *needles)
    assert not out.exists() and _leftovers(out) == []
    return line


# --- 1. non-finite weights: refused at load, one line naming the tensor ---------------------------
@pytest.mark.parametrize("kind", list(mm.TENSORS))
def test_nan_in_each_kind_of_tensor(capsys, tiny_llama_dir, models, tmp_path, text, kind):
    name = mm.TENSORS[kind]
    model = mm.edit_weights(tiny_llama_dir, models / f"nan-{kind}", mm.poke(name, NAN))
    # the default acttail allocation: the spectral analysis of a NaN projection used to raise LinAlgError
    _refused(capsys, model, tmp_path, text, needles=(f"weight {name} has 1 NaN", "re-save the model"))


@pytest.mark.parametrize("kind", ["q", "down", "final_norm", "embed"])
def test_inf_in_weights_under_uniform_allocation(capsys, tiny_mistral_dir, models, tmp_path, text, kind):
    name = mm.TENSORS[kind]
    model = mm.edit_weights(tiny_mistral_dir, models / f"inf-{kind}", mm.poke(name, -INF))
    _refused(capsys, model, tmp_path, text, "--allocation", "uniform", needles=(f"weight {name} has 0 NaN and 1 Inf",))


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_nan_norm_is_refused_in_both_modes(capsys, tiny_llama_dir, models, tmp_path, text, mode):
    """Issue 18's example: exported with exit 0 (threshold) or "this is a bug" (topk) before."""
    model = models / "nan-norm-both"
    if not model.exists():
        mm.edit_weights(tiny_llama_dir, model, mm.poke(mm.TENSORS["input_norm"], NAN))
    _refused(capsys, model, tmp_path, text, "--mode", mode, needles=("model.layers.1.input_layernorm.weight",))


@pytest.mark.optimum  # an fp16 export on CPU: the optimum base
def test_fp16_overflow_names_the_dtype(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.edit_weights(tiny_llama_dir, models / "fp16-overflow", mm.poke(mm.TENSORS["up"], 1e6))
    _refused(capsys, model, tmp_path, text, "--base", "optimum", "--dtype", "fp16", "--allocation", "uniform",
             needles=(mm.TENSORS["up"], "--dtype fp32"))


def test_overflowing_activations_stop_calibration(capsys, tiny_llama_dir, models, tmp_path, text):
    """Finite fp32 weights of 1e20 in gate/up make the MLP product overflow on the calibration text (not on the
    2-token check at load, where the gate is negative): calibration names the projection."""
    model = mm.edit_weights(tiny_llama_dir, models / "huge-mlp", _huge_mlp)
    _refused(capsys, model, tmp_path, text, "--allocation", "uniform", "--mode", "threshold",
             needles=("model.layers.1.mlp.down_proj is not finite",))


def _huge_mlp(tensors):
    mm.fill(mm.TENSORS["gate"], 1e20)(tensors)
    mm.fill(mm.TENSORS["up"], 1e20)(tensors)


def test_calibration_names_the_projection_with_non_finite_inputs(tiny_llama_dir, text):
    """The calibration's own guard (behind the load check): the first projection whose captured input is not finite."""
    import torch

    from acttail_export.allocation import build_config
    from acttail_export.calibration import calibrate
    from acttail_export.errors import ActTailError
    from acttail_export.modeling import load_model

    model, tokenizer = load_model(str(tiny_llama_dir))
    tensors = {mm.TENSORS[k]: model.get_parameter(mm.TENSORS[k]).detach().clone() for k in ("gate", "up")}
    _huge_mlp(tensors)
    with torch.no_grad():
        for name, value in tensors.items():
            model.get_parameter(name).copy_(value)
    config = build_config(model, 0.5, allocation="uniform", mode="threshold")
    with pytest.raises(ActTailError, match="model.layers.1.mlp.down_proj is not finite"):
        calibrate(model, tokenizer, config, data=text, samples=2, sequence_length=32, progress=False)


CONFIG_EDITS = {
    "heads-do-not-divide": (dict(num_attention_heads=5), "config.json is inconsistent"),
    "hidden-size-string": (dict(hidden_size="64"), "config.json is inconsistent"),
    "unknown-activation": (dict(hidden_act="nope"), "config.json is inconsistent"),
    # transformers 5 rejects a null eps when it reads config.json, 4.x only when the forward pass divides by it
    "rms-norm-eps-null": (dict(rms_norm_eps=None), "config.json is inconsistent|fails a 2-token forward pass"),
    "negative-rope-theta": (dict(rope_theta=-1.0), "buffer model.rotary_emb.inv_freq"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_hand_edited_model_config(capsys, tiny_llama_dir, models, tmp_path, text, case):
    changes, needle = CONFIG_EDITS[case]
    model = mm.with_config(tiny_llama_dir, models / f"config-{case}", **changes)
    _refused(capsys, model, tmp_path, text, "--allocation", "uniform", needles=(needle,))


# --- degenerate spectra ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_model(tiny_llama_dir):
    from acttail_export.modeling import load_model

    return load_model(str(tiny_llama_dir))[0]


@pytest.fixture(scope="module")
def good_fits(good_model):
    from acttail_export.spectral import analyze_model

    return analyze_model(good_model, progress=False)


@pytest.mark.parametrize("kind", mm.PROJECTION_KINDS)
@pytest.mark.parametrize("damage", ["zero", "rank1"])
def test_degenerate_spectrum_gets_the_layer_alpha(good_model, good_fits, kind, damage):
    """All-zero or rank-1 weights have no power-law tail: the median alpha of the layer's fitted projections."""
    import copy

    import torch

    from acttail_export.spectral import analyze_model

    name = mm.TENSORS[kind]
    model = copy.deepcopy(good_model)
    with torch.no_grad():
        tensors = {name: model.get_parameter(name).detach().clone()}
        (mm.fill(name, 0.0) if damage == "zero" else mm.rank_one(name))(tensors)
        model.get_parameter(name).copy_(tensors[name])
    fits = analyze_model(model, progress=False)
    module = name.removesuffix(".weight")
    others = [fits[n].alpha for n in fits if n.startswith("model.layers.1.") and n != module]
    assert fits[module].fallback is not None and "layer 1" in fits[module].fallback
    assert fits[module].alpha == pytest.approx(float(np.median(others)))
    assert all(fits[n].alpha == good_fits[n].alpha for n in fits if n != module)  # the others are untouched


def test_degenerate_spectra_export_validates_and_records_the_fallback(capsys, tiny_llama_dir, models, tmp_path, text):
    def edit(tensors):
        mm.fill(mm.TENSORS["q"], 0.0)(tensors)
        mm.rank_one("model.layers.0.self_attn.o_proj.weight")(tensors)
    model = mm.edit_weights(tiny_llama_dir, models / "degenerate", edit)
    out = tmp_path / "out"
    rc, err = _export(capsys, model, out, text, "--mode", "threshold", "--allocation", "htsr")  # reads the alphas
    assert rc == 0, err
    config = json.loads((out / "acttail_config.json").read_text())
    fallback = {p["name"]: p["alpha_fallback"] for p in config["projections"] if p["alpha_fallback"]}
    assert set(fallback) == {"model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.o_proj"}
    assert config["perplexity"]["validation"]["forced_mask_rel_error"] <= config["perplexity"]["validation"]["tolerance"]
    card = (out / "README.md").read_text()
    assert "degenerate weight spectra" in card and "model.layers.1.self_attn.q_proj" in card


@pytest.mark.parametrize("allocation", [["--allocation", "htsr"], ["--sparsity", "0.9"]], ids=["htsr", "default-at-90"])
def test_every_spectrum_degenerate_is_refused_under_htsr(capsys, tiny_llama_dir, models, tmp_path, text, allocation):
    """The allocations that read alphas (htsr; the default at 90 %) need one usable spectrum."""
    model = mm.edit_weights(tiny_llama_dir, models / f"all-rank1-{allocation[-1]}", mm.all_projections(mm.rank_one))
    _refused(capsys, model, tmp_path, text, *allocation, needles=("degenerate", "--allocation uniform"))


# --- tokenizer, vocabulary, files, context ---------------------------------------------------------
def test_tokenizer_larger_than_the_embedding(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.small_vocab(tiny_llama_dir, models / "small-vocab")
    _refused(capsys, model, tmp_path, text, needles=("49152 tokens", "1000 rows"))


def test_missing_tokenizer_files(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.copy_model(tiny_llama_dir, models / "no-tokenizer",
                          skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"))
    _refused(capsys, model, tmp_path, text, needles=("has no tokenizer files", "save_pretrained"))


def test_corrupted_tokenizer_json(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.copy_model(tiny_llama_dir, models / "bad-tokenizer")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 7')
    _refused(capsys, model, tmp_path, text, needles=("tokenizer",))


def test_sequence_length_above_the_context(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.with_config(tiny_llama_dir, models / "short-context", max_position_embeddings=16)
    _refused(capsys, model, tmp_path, text, needles=("--sequence-length 32 exceeds the context", "16"))


def test_model_without_decoder_layers(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.with_config(tiny_llama_dir, models / "zero-layers", num_hidden_layers=0)
    _refused(capsys, model, tmp_path, text, "--allocation", "uniform", needles=("no decoder layers",))


def test_config_that_disagrees_with_the_weights(capsys, tiny_llama_dir, models, tmp_path, text):
    model = mm.with_config(tiny_llama_dir, models / "wrong-hidden", intermediate_size=96)
    _refused(capsys, model, tmp_path, text, "--allocation", "uniform", needles=("config.json is inconsistent", "mismatch"))


# --- output folder: symlinks, long names (the build itself is replaced: these test the folder logic) ---
@pytest.fixture
def fake_build(monkeypatch):
    """``exporter._build`` replaced by one that writes a marker file: the checks and the atomic folder are real."""
    from acttail_export import exporter
    from acttail_export.config import ActTailConfig

    def build(model_ref, tmp, *args, **kwargs):
        (tmp / "model.onnx").write_text("new export")
        return ActTailConfig(target_sparsity=0.5)

    monkeypatch.setattr(exporter, "_build", build)


def _export_ok(capsys, model, out, text, *extra) -> None:
    rc, err = _export(capsys, model, out, text, *extra)
    assert rc == 0 and "Traceback" not in err, err


@pytest.mark.parametrize("target", ["empty", "nonempty", "dangling"])
def test_symlinked_output_dir_lands_where_it_points(capsys, fake_build, tiny_llama_dir, tmp_path, text, target):
    real = tmp_path / "real"
    if target != "dangling":
        real.mkdir()
    if target == "nonempty":
        (real / "old.txt").write_text("earlier export")
    link = tmp_path / "link"
    link.symlink_to(real)
    _export_ok(capsys, tiny_llama_dir, link, text, *(["--overwrite"] if target == "nonempty" else []))
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir()) == ["model.onnx"]
    assert _leftovers(real) == [] and _leftovers(link) == []


def test_symlink_to_nonempty_folder_without_overwrite(capsys, fake_build, tiny_llama_dir, tmp_path, text):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("earlier export")
    (tmp_path / "link").symlink_to(real)
    _one_line_error(*_export(capsys, tiny_llama_dir, tmp_path / "link", text), "not empty", "--overwrite")
    assert [p.name for p in real.iterdir()] == ["old.txt"]


@pytest.mark.parametrize("case", ["dangling-missing-parent", "to-a-file", "loop"])
def test_unusable_symlinks_are_refused(capsys, fake_build, tiny_llama_dir, tmp_path, text, case):
    link = tmp_path / "link"
    if case == "to-a-file":
        (tmp_path / "file.txt").write_text("x")
        link.symlink_to(tmp_path / "file.txt")
    elif case == "loop":
        (tmp_path / "other").symlink_to(link)
        link.symlink_to(tmp_path / "other")
    else:
        link.symlink_to(tmp_path / "missing" / "real")
    _one_line_error(*_export(capsys, tiny_llama_dir, link, text), "symlink")
    assert link.is_symlink() and not (tmp_path / "missing").exists() and _leftovers(link) == []


def test_name_above_name_max_is_refused(capsys, fake_build, tiny_llama_dir, tmp_path, text):
    out = tmp_path / ("x" * 300)
    _one_line_error(*_export(capsys, tiny_llama_dir, out, text), "300 bytes", "shorter OUTPUT_DIR")
    assert _leftovers(out) == []


def test_long_name_that_fits_gets_a_temp_folder_that_fits(capsys, fake_build, tiny_llama_dir, tmp_path, text):
    out = tmp_path / ("y" * 250)  # fits NAME_MAX (255), but ".NAME.acttail-tmp-PID-XXXX" would not
    _export_ok(capsys, tiny_llama_dir, out, text)
    assert (out / "model.onnx").read_text() == "new export" and _leftovers(out) == []


# --- fused kernel with nothing to fuse -----------------------------------------------------------------
def test_fused_topk_at_sparsity_zero_loads(capsys, tiny_llama_dir, tmp_path, text):
    """Every projection keeps every channel, so the graph has no SparseMatMul: the runtime must still load it."""
    from acttail_export.ops import get_library_path
    from acttail_export.runtime import create_session, decoder_feeds

    try:
        get_library_path()
    except Exception:  # noqa: BLE001
        pytest.skip("op library not built (make ops)")
    out = tmp_path / "out"
    rc, err = _export(capsys, tiny_llama_dir, out, text, "--sparsity", "0", "--kernel", "fused", "--mode", "topk")
    assert rc == 0, err
    session = create_session(out)
    ids = np.arange(1, 9, dtype=np.int64)[None]
    logits = session.run(["logits"], decoder_feeds(session, ids))[0]
    assert np.isfinite(logits).all()


# --- hand-edited acttail_config.json (read back by the runtime: evaluate --backend onnxruntime) -------
@pytest.fixture(scope="module")
def export_dir(tiny_llama_dir, tmp_path_factory, text) -> Path:
    """A uniform threshold export; the spectral analysis must not run for it (uniform budgets need no alphas)."""
    from acttail_export import spectral

    def no_analysis(*args, **kwargs):
        raise AssertionError("the spectral analysis ran for --allocation uniform")

    out = tmp_path_factory.mktemp("export") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spectral, "analyze_model", no_analysis)
        rc = main(["export", "--model", str(tiny_llama_dir), *FAST, "--calibration-data", str(text), "--mode", "threshold",
                   "--allocation", "uniform", str(out)])
    assert rc == 0
    return out


def test_uniform_export_has_no_alphas_and_loads(export_dir):
    from acttail_export.runtime import check_export_dir

    config, fused = check_export_dir(export_dir)
    assert not fused and all(p.alpha is None and p.alpha_fallback is None for p in config.projections)


def _set_projection(key, value):
    def edit(data):
        data["projections"][3][key] = value
    return edit


EDITS = {
    "threshold-string": (_set_projection("threshold", "abc"), "threshold of model.layers.0.self_attn.o_proj"),
    "threshold-nan": (_set_projection("threshold", NAN), "threshold of"),
    "in-features-string": (_set_projection("in_features", "64"), "in_features of"),
    "k-float": (_set_projection("k", 3.5), "k of"),
    "layer-negative": (_set_projection("layer", -1), "layer of"),
    "sparsity-string": (_set_projection("sparsity", "half"), "sparsity of"),
    "unknown-projection-key": (_set_projection("bias", 1), "invalid acttail_config.json"),
    "effective-sparsity-string": (lambda d: d.update(effective_sparsity="high"), "effective_sparsity"),
    "calibration-samples-string": (lambda d: d["calibration"].update(samples="x"), "calibration.samples"),
    "projections-object": (lambda d: d.update(projections={}), "projections must be a list"),
    "mode-flipped": (lambda d: d.update(mode="topk"), "mode=topk but the graph masks with threshold"),
    "kernel-flipped": (lambda d: d.update(kernel="fused"), "kernel=fused"),
    "json-array": (lambda d: [d], "not an object"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_hand_edited_config_is_one_line(capsys, export_dir, tmp_path, text, case):
    edit, needle = EDITS[case]
    folder = tmp_path / "edited"
    shutil.copytree(export_dir, folder)
    mm.edit_json(folder / "acttail_config.json", edit)
    rc = main(["evaluate", "--model", str(folder), "--backend", "onnxruntime", "--data", str(text),
               "--sequence-length", "32", "--max-tokens", "64"])
    _one_line_error(rc, capsys.readouterr().err, needle)


# --- validation gates ----------------------------------------------------------------------------
def _gate_config(mode: str, effective: float | None):
    from acttail_export.config import ActTailConfig

    return ActTailConfig(target_sparsity=0.5, mode=mode, effective_sparsity=effective)


@pytest.mark.parametrize("case", ["nan-logits", "top1-below-floor", "sparsity-far-from-target"])
def test_validation_gates_fail(case):
    from acttail_export.errors import ExportValidationError
    from acttail_export.exporter import SPARSITY_TOLERANCE, _gate

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 8, 50)).astype(np.float32)
    got, forced, config = ref.copy(), ref.copy(), _gate_config("threshold", 0.5)
    _gate(got, ref, forced, config, "fp32")  # the untouched case passes
    if case == "nan-logits":
        got[1, 3, 7] = NAN
    elif case == "top1-below-floor":
        got = -ref  # argmax becomes argmin everywhere
    else:
        config = _gate_config("threshold", 0.5 + SPARSITY_TOLERANCE + 0.05)
    with pytest.raises(ExportValidationError) as info:
        _gate(got, ref, forced, config, "fp32")
    assert "\n" not in str(info.value)


# --- signals: SIGHUP (dropped ssh session) and SIGQUIT remove the temp folder like SIGTERM -------------
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["sighup", "sigquit"])
def test_hangup_and_quit_leave_nothing(tiny_llama_dir, tmp_path, text, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "acttail_export.cli", "export", "--model", str(tiny_llama_dir), *FAST,
           "--calibration-data", str(text), str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP, signal.SIGQUIT)])
    deadline = time.monotonic() + 120
    # the export's temporary folder exists: the handlers are installed (the write probe of the output check,
    # also named .acttail-*, exists before they are, so it must not count)
    while not [n for n in _leftovers(out) if ".acttail-tmp-" in n]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "slow"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "acttail-export: interrupted"
    assert not out.exists() and _leftovers(out) == []
