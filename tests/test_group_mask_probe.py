"""benchmarks/group_mask_probe.py's pure parts against brute-force numpy loops: the group mask (widths G does and does
not divide, both scores, tied scores: the earlier group wins), the number of kept groups, and the sorted channel order
(mean |x| descending, ties: the lower channel first), also as measured by the calibration hooks on a tiny model.

The probe is a script of benchmarks/ that imports its neighbour probe_common by name, so the folder is put on sys.path
for the import only."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from acttail_export.config import ActTailConfig, ProjectionConfig
from acttail_export.sparsify import mask_topk

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
sys.path.insert(0, BENCHMARKS)
try:
    probe = importlib.import_module("group_mask_probe")
finally:
    sys.path.remove(BENCHMARKS)


def brute_mask(x: np.ndarray, group: int, n_keep: int, score: str, order: np.ndarray | None) -> np.ndarray:
    rows, width = x.shape
    order = np.arange(width) if order is None else order
    keep = np.zeros((rows, width), dtype=bool)
    for t in range(rows):
        scores = []
        for g, start in enumerate(range(0, width, group)):
            channels = order[start : start + group]
            values = x[t, channels].astype(np.float64)
            scores.append((np.abs(values).sum() if score == "l1" else (values**2).sum(), g, channels))
        for _, _, channels in sorted(scores, key=lambda s: (-s[0], s[1]))[:n_keep]:
            keep[t, channels] = True
    return keep


@pytest.mark.parametrize("score", ["l1", "l2"])
@pytest.mark.parametrize("width,group", [(64, 8), (64, 32), (70, 8), (45, 32), (33, 32), (12, 5)])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("integers", [False, True])
def test_group_mask_matches_brute_force(score, width, group, permuted, integers):
    rng = np.random.default_rng(width * 100 + group)
    # small integers: exact sums and many tied groups (the earlier one must win); floats: heavy-tailed like activations
    x = rng.integers(-2, 3, size=(17, width)).astype(np.float32) if integers else \
        (rng.standard_t(3, size=(17, width))).astype(np.float32)
    order = rng.permutation(width) if permuted else None
    n_groups = -(-width // group)
    for n_keep in sorted({1, n_groups // 2, n_groups - 1, n_groups}):
        t_order = None if order is None else torch.from_numpy(order)
        got = probe.group_keep_mask(torch.from_numpy(x), group, max(n_keep, 1), score, t_order).numpy()
        np.testing.assert_array_equal(got, brute_mask(x, group, max(n_keep, 1), score, order))
    # leading dims are batch dims
    x3 = torch.from_numpy(x).reshape(1, 17, width)
    got3 = probe.group_keep_mask(x3, group, 1, score, None if order is None else torch.from_numpy(order))
    assert got3.shape == x3.shape and got3.dtype == torch.bool


def test_group_of_one_is_topk():
    x = torch.randn(9, 40)
    keep = probe.group_keep_mask(x, 1, 13)
    torch.testing.assert_close(x * keep, mask_topk(x, 13))


def test_groups_kept():
    assert probe.groups_kept(576, 32, 0.4) == 11  # 10.8
    assert probe.groups_kept(1536, 32, 0.5) == 24
    assert probe.groups_kept(576, 8, 0.4) == 43  # 43.2
    assert probe.groups_kept(40, 16, 0.5) == 1  # 1.25 of 3 groups
    assert probe.groups_kept(48, 32, 0.25) == 1  # 1.125 of 2
    assert probe.groups_kept(64, 32, 0.75) == 1  # 0.5, half up
    assert probe.groups_kept(64, 32, 0.99) == 1  # at least 1
    assert probe.groups_kept(40, 16, 0.0) == 3  # at most ceil(K / G)


def test_sorted_order_descending_ties_lower_first():
    rng = np.random.default_rng(0)
    for values in (rng.random(50), rng.integers(0, 4, size=50).astype(np.float64)):
        got = probe.sorted_order(torch.from_numpy(values)).numpy()
        want = sorted(range(values.size), key=lambda i: (-values[i], i))
        np.testing.assert_array_equal(got, want)


def test_channel_means_and_order_on_a_tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 6), torch.nn.Linear(6, 12))
    config = ActTailConfig(target_sparsity=0.5, allocation="uniform", mode="topk")
    config.projections = [ProjectionConfig(name="0", layer=0, kind="q_proj", in_features=12, out_features=6, sparsity=0.5),
                          ProjectionConfig(name="1", layer=0, kind="o_proj", in_features=6, out_features=12, sparsity=0.5)]
    windows = torch.randn(3, 5, 12) * torch.linspace(0.1, 2.0, 12)
    means = probe.channel_means(model, config, windows)
    x = windows.reshape(-1, 12).double()
    np.testing.assert_allclose(means["0"].numpy(), x.abs().mean(0).numpy(), rtol=1e-6)
    with torch.no_grad():
        hidden = model[0](windows.reshape(-1, 12)).double()
    np.testing.assert_allclose(means["1"].numpy(), hidden.abs().mean(0).numpy(), rtol=1e-5)
    order = probe.sorted_order(means["0"]).numpy()
    assert np.all(np.diff(means["0"].numpy()[order]) <= 0)


def test_hooks_count_the_effective_sparsity():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(40, 8))
    config = ActTailConfig(target_sparsity=0.5, allocation="uniform", mode="topk")
    config.projections = [ProjectionConfig(name="0", layer=0, kind="q_proj", in_features=40, out_features=8, sparsity=0.5)]
    hooks = probe.GroupHooks(model, config, 16, "l1")  # groups 16, 16, 8; round(1.25) = 1 kept
    x = torch.randn(200, 40)
    try:
        y = model(x)
    finally:
        hooks.remove()
    keep = probe.group_keep_mask(x, 16, 1)
    torch.testing.assert_close(y, model(x * keep))
    assert hooks.weighted_effective_sparsity() == pytest.approx(1 - keep.sum().item() / keep.numel())
    assert 8 / 40 <= 1 - hooks.weighted_effective_sparsity() <= 16 / 40
