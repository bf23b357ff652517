"""The #15 bound from the recorded CUPTI rows of this folder (run from the repository root):

    python docs/results/h200_exporter/cupti_int4/bound.py

For each acttail-export int4 row: what the projections would have to cost for the target (× genai int4 of the same
call), needed = genai_int4_ms / target - (our ms - our projection kernel ms), against two floors at the copy bandwidth
(3.2 and 4.2 TB/s) plus a fixed cost per call (FIXED_US, docs/kernels.md: block launch, one DRAM round trip and the
grid's tail, ~2 µs):
  * kept 4-bit rows only: (1 - s) x K*N/2 bytes per projection (no scales read);
  * this op's layout: kept rows of Q plus every block's float16 scale and offset (4 bytes per 32 weights of a column;
    at s <= 0.9 almost every 32-row block keeps a row, so every block's scales are read);
  * blocks along N (docs/quantization.md, "Scales that travel with their row"; not built): kept rows of Q plus their
    own float16 scale and offset per B outputs, (1 - s) x (K*N/2 + K*N/B*4) bytes, for B = 64 and 128.
s is the folder's target (parameter-weighted) sparsity. ms are timed decode medians with CUDA graph (the row's
decode_ms_median); projection kernel ms from the row's CUPTI split (no CUDA graph).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
from benchmarks.decode import cupti_split, kernel_class  # noqa: E402

HERE = Path(__file__).resolve().parent
FILES = ("exporter_llama2-7b_int4_0.5-0.json", "exporter_llama2-7b_int4_0.8.json")
TARGETS = {0.0: 1.2, 0.5: 1.6, 0.8: 2.0}
BANDWIDTH_TB_S = (3.2, 4.2)
FIXED_US = 2.0


def lm_head_us(c: dict, cls: str) -> float | None:
    """Duration of the last step's lm_head: the last kernel of class ``cls`` (MatMulNBits) or the float GEMM after the
    last layer (the kernel before the sampling kernels)."""
    step = c.get("last_step") or []
    if cls == "matmul_nbits":
        hits = [k for k in step if kernel_class(k[0]) == cls]  # classified again: the 0.8 file predates the name
        return hits[-1][2] if hits else None
    hits = [k for k in step if k[0].startswith("nvjet")]
    return hits[-1][2] if hits else None


SLOTS = ("q|k|v", "o", "gate|up", "down")


def per_slot(c: dict) -> str:
    """Mean / min / max µs per projection kind in the last step's kernel sequence (4 per layer in this order; a 129th
    MatMulNBits call is the lm_head and left out)."""
    calls = [k[2] for k in c.get("last_step") or [] if kernel_class(k[0]) != "other"][:128]
    if len(calls) != 128:
        return "last step: no per-layer sequence"
    parts = []
    for j, slot in enumerate(SLOTS):
        v = calls[j::4]
        parts.append(f"{slot} {sum(v) / len(v):.2f} ({min(v):.2f}-{max(v):.2f})")
    return "last step, us per call, mean (min-max) over 32 layers: " + ", ".join(parts)


def main() -> None:
    for name in FILES:
        data = json.loads((HERE / name).read_text())
        m = data["model"]
        h, inter, layers = m["hidden_size"], m["intermediate_size"], m["layers"]
        kv = h // m["num_attention_heads"] * m["num_key_value_heads"]
        params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
        q_bytes, scale_bytes = params / 2, params / 32 * 4
        runs = [r for r in data["runs"] if "error" not in r and isinstance(r.get("cupti"), dict)]
        g = next(r for r in runs if r["backend"] == "genai-int4")
        gs = cupti_split(g["cupti"])
        g_lm = lm_head_us(g["cupti"], "matmul_nbits")
        print(f"== {name}: projection weights {params / 1e9:.3f} G parameters, Q {q_bytes / 1e9:.3f} GB, "
              f"scales+offsets {scale_bytes / 1e9:.3f} GB")
        print(f"genai int4: timed {g['decode_ms_median']:.3f} ms; CUPTI GPU kernels {g['cupti']['gpu_kernel_ms_per_token']:.3f} ms "
              f"({g['cupti']['kernels_per_token']:.0f} kernels), MatMulNBits {gs['projection_kernel_ms_per_token']:.3f} ms in "
              f"{gs['projection_calls_per_token']:.0f} calls (lm_head {g_lm} us in the last step), other "
              f"{gs['other_kernel_ms_per_token']:.3f} ms; timed - GPU kernels = "
              f"{g['decode_ms_median'] - g['cupti']['gpu_kernel_ms_per_token']:.3f} ms")
        print(f"  {per_slot(g['cupti'])}")
        if g_lm is not None:
            layer_ms = gs["projection_kernel_ms_per_token"] - g_lm / 1e3
            mnb_bytes = params / 2 + params / 32 * 2.5  # MatMulNBits: float16 scale + 4-bit zero point per block of 32
            print(f"  MatMulNBits without lm_head: {layer_ms:.3f} ms / 128 calls = {layer_ms / 128 * 1e3:.2f} us per call; "
                  f"its {mnb_bytes / 1e9:.3f} GB at {mnb_bytes / (layer_ms / 1e3) / 1e12:.2f} TB/s")
        for r in runs:
            if r["backend"] != "acttail-export":
                continue
            c, s = r["cupti"], float(r["sparsity"])
            sp = cupti_split(c)
            assert all(kernel_class(k["name"]) != "matmul_nbits" for k in c["top_kernels"])
            proj, calls = sp["projection_kernel_ms_per_token"], sp["projection_calls_per_token"]
            rest = r["decode_ms_median"] - proj
            target = TARGETS[s]
            needed = g["decode_ms_median"] / target - rest
            print(f"-- {r['variant']}: timed {r['decode_ms_median']:.3f} ms ({g['decode_ms_median'] / r['decode_ms_median']:.2f}x genai int4); "
                  f"CUPTI GPU kernels {c['gpu_kernel_ms_per_token']:.3f} ms ({c['kernels_per_token']:.0f} kernels), projections "
                  f"{proj:.3f} ms in {calls:.0f} calls ({proj / calls * 1e3:.2f} us per call), other kernels "
                  f"{sp['other_kernel_ms_per_token']:.3f} ms (float16 lm_head {lm_head_us(c, 'other')} us); timed - GPU kernels = "
                  f"{r['decode_ms_median'] - c['gpu_kernel_ms_per_token']:.3f} ms")
            print(f"   {per_slot(c)}")
            if s == 0:
                print(f"   our layout's {(q_bytes + scale_bytes) / 1e9:.3f} GB at {(q_bytes + scale_bytes) / (proj / 1e3) / 1e12:.2f} TB/s")
            print(f"   everything but the projections (timed - projection kernels): {rest:.3f} ms -> "
                  f"at most {g['decode_ms_median'] / rest:.2f}x with free projections")
            print(f"   target {target}x: {g['decode_ms_median']:.3f} / {target} - {rest:.3f} = needed projections {needed:.3f} ms "
                  f"= {needed / calls * 1e3:.2f} us per call ({proj / needed:.2f}x faster than now)")
            floors = [("kept 4-bit rows only", (1 - s) * q_bytes), ("kept rows + all scales/offsets", (1 - s) * q_bytes + scale_bytes)]
            floors += [(f"blocks along N, B={b}: kept rows + their own scales", (1 - s) * (q_bytes + params / b * 4)) for b in (64, 128)]
            for label, nbytes in floors:
                lo, hi = (nbytes / (bw * 1e12) * 1e3 for bw in reversed(BANDWIDTH_TB_S))
                fixed = calls * FIXED_US / 1e3
                best = [g["decode_ms_median"] / (rest + fixed + t) for t in (lo, hi)]
                print(f"   floor, {label}: {nbytes / 1e9:.3f} GB -> read {lo:.3f}-{hi:.3f} ms + {calls:.0f} x {FIXED_US} us = "
                      f"{fixed + lo:.3f}-{fixed + hi:.3f} ms -> at best {best[1]:.2f}-{best[0]:.2f}x genai int4; "
                      f"bandwidth needed for the target with the fixed part: "
                      + (f"{nbytes / ((needed - fixed) / 1e3) / 1e12:.2f} TB/s" if needed > fixed else "none (fixed part alone too slow)"))


if __name__ == "__main__":
    main()
