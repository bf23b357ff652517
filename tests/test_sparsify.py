"""sparsify.py against hand-written numpy references on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from acttail_export.config import PROJECTION_KINDS, ActTailConfig, ProjectionConfig, projection_name, topk_keep
from acttail_export.errors import ActTailError
from acttail_export.reference import Member, member_values
from acttail_export.sparsify import apply_sparsity, mask_threshold, mask_topk


def hand_config(model, sparsities: dict[str, float] | float, mode: str = "topk") -> ActTailConfig:
    """Config built by hand (independent of allocation.py): one entry per projection."""
    projections = []
    for layer in range(model.config.num_hidden_layers):
        for kind in PROJECTION_KINDS:
            name = projection_name(layer, kind)
            lin = model.get_submodule(name)
            s = sparsities if isinstance(sparsities, float) else sparsities[name]
            projections.append(ProjectionConfig(name, layer, kind, lin.in_features, lin.out_features, s))
    return ActTailConfig(target_sparsity=0.5, mode=mode, projections=projections)


def random_budgets(model, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    names = [projection_name(i, k) for i in range(model.config.num_hidden_layers) for k in PROJECTION_KINDS]
    return {n: float(rng.uniform(0.05, 0.95)) for n in names}


def np_topk_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Reference: keep the k largest |x| per row via argsort (no ties in random data)."""
    keep = np.zeros_like(x, dtype=bool)
    order = np.argsort(-np.abs(x), axis=-1, kind="stable")[..., :k]
    np.put_along_axis(keep, order, True, axis=-1)
    return keep


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))


class Recorder:
    """Captures each projection's raw input (before the sparsity hook), masked input and output."""

    def __init__(self, model, names):
        self.raw, self.masked, self.out, self.handles = {}, {}, {}, []
        for name in names:
            mod = model.get_submodule(name)
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, name):
        def hook(module, args):
            self.raw[name] = args[0].detach().clone()
        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.masked[name] = args[0].detach().clone()
            self.out[name] = output.detach().clone()
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("k", [0, 1, 7, 31, 32, 33, 50, 63, 64])
def test_mask_topk_matches_numpy(k):
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(k))
    ref = x.numpy() * np_topk_mask(x.numpy(), k)
    got = mask_topk(x, k)
    np.testing.assert_array_equal(got.numpy(), ref)
    assert ((got != 0).sum(-1) == k).all()


def test_mask_threshold_matches_numpy():
    x = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    for t in (0.0, 0.3, 1.0, 10.0):
        np.testing.assert_array_equal(mask_threshold(x, t).numpy(), np.where(np.abs(x.numpy()) > t, x.numpy(), 0.0))


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_hooked_projections_match_reference(tiny, ids, mode):
    budgets = random_budgets(tiny)
    config = hand_config(tiny, budgets, mode)
    rng = np.random.default_rng(2)
    for p in config.projections:
        p.threshold = float(rng.uniform(0.0, 0.05)) if mode == "threshold" else None
    rec = Recorder(tiny, budgets)  # registered first, so it sees the raw input
    try:
        with torch.inference_mode(), apply_sparsity(tiny, config) as hooks:
            tiny(ids)
            eff = hooks.effective_sparsity()
    finally:
        rec.remove()
    zeroed_total = {}
    for p in config.projections:
        raw = rec.raw[p.name].numpy()
        keep = np_topk_mask(raw, topk_keep(p.sparsity, p.in_features)) if mode == "topk" else np.abs(raw) > p.threshold
        ref_in = raw * keep
        np.testing.assert_array_equal(rec.masked[p.name].numpy(), ref_in)
        w = tiny.get_submodule(p.name).weight
        torch.testing.assert_close(rec.out[p.name], F.linear(torch.from_numpy(ref_in), w), rtol=0, atol=0)
        zeroed_total[p.name] = 1.0 - keep.mean()
        if mode == "topk":
            assert (keep.sum(-1) == topk_keep(p.sparsity, p.in_features)).all()
    for name, value in eff.items():
        assert value == pytest.approx(zeroed_total[name], abs=1e-12)
    # q, k, v read the same tensor but get different masks (different budgets)
    q, k = projection_name(0, "q_proj"), projection_name(0, "k_proj")
    torch.testing.assert_close(rec.raw[q], rec.raw[k], rtol=0, atol=0)
    assert not torch.equal(rec.masked[q], rec.masked[k])


def hooked_run(model, ids, config, budgets, **options):
    """(Recorder of every projection's raw / masked input, effective sparsity) of one forward under apply_sparsity."""
    rec = Recorder(model, budgets)
    try:
        with torch.inference_mode(), apply_sparsity(model, config, **options) as hooks:
            model(ids)
            eff = hooks.effective_sparsity()
    finally:
        rec.remove()
    return rec, eff


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("ramp, soft", [(0.1, False), (0.5, False), (0.0, True)])
def test_value_rule_hooks_match_reference_member_values(tiny, ids, mode, ramp, soft):
    """apply_sparsity(ramp=δ) / (soft=True) feeds each projection reference.member_values(x, mode, member, δ, soft)."""
    budgets = random_budgets(tiny, seed=3)
    config = hand_config(tiny, budgets, mode)
    rng = np.random.default_rng(4)
    for p in config.projections:
        p.threshold = float(rng.uniform(0.0, 0.05)) if mode == "threshold" else None
    rec, eff = hooked_run(tiny, ids, config, budgets, ramp=ramp, soft=soft)
    changed = 0
    for p in config.projections:
        raw = rec.raw[p.name].numpy()
        member = Member(threshold=p.threshold) if mode == "threshold" else Member(k=topk_keep(p.sparsity, p.in_features))
        values, keep = member_values(raw, mode, member, ramp, soft=soft)
        got = rec.masked[p.name].numpy()
        if soft:
            # float32 hook vs float64 reference: (s - t), the division and x * f each round once; entries just above t
            # shrink to a few ulp of x, hence the absolute term (x ~ 1e-2 .. 1 here)
            np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-7)
        else:
            # float32 hook vs float64 reference: (s - t), δ t, the division and x * f each round once (~4 ulp of x)
            np.testing.assert_allclose(got, values, rtol=1e-6, atol=0)
            np.testing.assert_array_equal(got != 0, values != 0)  # same zero set as the reference
        assert eff[p.name] == pytest.approx(1.0 - keep.mean(), abs=1e-12)  # counts the zero set, not the value rule
        changed += int(((values != 0) & (values != raw)).sum())
    assert changed > 0  # the rule scaled some kept entries (else the test would not tell it from the hard mask)


def test_wina_hooks_rank_by_weight_column_norms(tiny, ids):
    """scores="wina": each projection keeps its k largest |x_i| * ||W[:, i]|| (reference.member_values with the scale)."""
    budgets = random_budgets(tiny, seed=8)
    config = hand_config(tiny, budgets)
    rec, eff = hooked_run(tiny, ids, config, budgets, scores="wina")
    differs = 0
    for p in config.projections:
        raw = rec.raw[p.name].numpy()
        # the scale as the hook computes it (float32 norm): a scale rounded otherwise could reorder a near tie
        scale = tiny.get_submodule(p.name).weight.detach().float().norm(dim=0).numpy()
        k = topk_keep(p.sparsity, p.in_features)
        values, keep = member_values(raw, "topk", Member(k=k, scale=scale))
        np.testing.assert_array_equal(rec.masked[p.name].numpy(), values.astype(np.float32))  # kept values unchanged
        assert eff[p.name] == pytest.approx(1.0 - k / p.in_features, abs=1e-12)
        differs += int((keep != np_topk_mask(raw, k)).any())
    assert differs > 0  # the weighted ranking chose other entries than |x| somewhere


def test_bad_value_rules_are_refused(tiny):
    with pytest.raises(ActTailError, match="not both"):
        apply_sparsity(tiny, hand_config(tiny, 0.5), ramp=0.1, soft=True)
    with pytest.raises(ActTailError, match="scores must be one of"):
        apply_sparsity(tiny, hand_config(tiny, 0.5), scores="norm")
    with pytest.raises(ActTailError, match="top-k mode only"):
        apply_sparsity(tiny, hand_config(tiny, 0.5, "threshold"), mode="threshold", scores="wina")


def test_negative_ramp_is_refused(tiny):
    with pytest.raises(ActTailError, match="ramp"):
        apply_sparsity(tiny, hand_config(tiny, 0.5), ramp=-0.1)


def test_effective_sparsity_equals_target_in_topk(tiny, ids):
    config = hand_config(tiny, random_budgets(tiny, seed=5))
    with torch.inference_mode(), apply_sparsity(tiny, config) as hooks:
        tiny(ids)
        tiny(ids[:1, :10])
    eff = hooks.effective_sparsity()
    assert set(eff) == {p.name for p in config.projections}
    for p in config.projections:
        d = p.in_features
        assert eff[p.name] == pytest.approx((d - topk_keep(p.sparsity, d)) / d, abs=1e-12)
        assert abs(eff[p.name] - p.sparsity) < 1.0 / d
    params = np.array([p.parameters for p in config.projections], dtype=float)
    expected = float(np.dot([eff[p.name] for p in config.projections], params) / params.sum())
    assert hooks.weighted_effective_sparsity() == pytest.approx(expected, abs=1e-12)
    recorded = hooks.record()
    assert recorded.effective_sparsity == pytest.approx(expected)
    assert abs(recorded.effective_sparsity - config.weighted_sparsity()) < 1.0 / 64


@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_zero_sparsity_is_dense(tiny, ids, mode):
    config = hand_config(tiny, 0.0, mode)
    with torch.inference_mode():
        dense = tiny(ids).logits
        with apply_sparsity(tiny, config) as hooks:
            sparse = tiny(ids).logits
        assert torch.equal(dense, sparse)
        assert hooks.weighted_effective_sparsity() == 0.0


def test_remove_restores_dense(tiny, ids):
    config = hand_config(tiny, 0.7)
    with torch.inference_mode():
        dense = tiny(ids).logits
        hooks = apply_sparsity(tiny, config)
        sparse = tiny(ids).logits
        hooks.remove()
        hooks.remove()
        after = tiny(ids).logits
    assert not torch.allclose(dense, sparse)
    assert torch.equal(dense, after)


def test_bad_configs(tiny, ids):
    with torch.inference_mode():
        dense = tiny(ids).logits
    config = hand_config(tiny, 0.5, "threshold")
    config.projections[0].threshold = 0.1  # the first projection is fine, a later one fails
    with pytest.raises(ActTailError, match="run calibration"):
        apply_sparsity(tiny, config)
    with torch.inference_mode():
        assert torch.equal(tiny(ids).logits, dense)  # nothing left installed
    with pytest.raises(ActTailError, match="mode must be one of"):
        apply_sparsity(tiny, config, mode="random")
    config = hand_config(tiny, 0.5)
    config.projections[0].name = "model.layers.9.self_attn.q_proj"
    with pytest.raises(ActTailError, match="no projection model.layers.9"):
        apply_sparsity(tiny, config)
    with pytest.raises(ActTailError, match="no projections"):
        apply_sparsity(tiny, ActTailConfig(target_sparsity=0.5))
