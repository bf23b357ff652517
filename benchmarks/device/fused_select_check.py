"""Driver for compute-sanitizer over the top-k selection inside the 4-bit decode GEMV blocks (ACTTAIL_FUSED_SELECT=1,
harness variant fused_select): fused and selection-kernel-first decode calls for each decode loop (stream-K, one-row,
pipelined) over K from 40 to 14336, members with their own k, the SwiGLU input; and the in-block selection alone on rows
with ties, both inputs. No profiler (CUPTI and the sanitizer do not mix); correctness is
tests/test_ops_nbits_harness.py's.

    compute-sanitizer --tool memcheck python3 benchmarks/device/fused_select_check.py   # and --tool racecheck
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from test_ops_nbits import random_weights  # noqa: E402
from test_ops_nbits_harness import _fused, _run_select_case, _select_input  # noqa: E402

from acttail_export.nbits_harness import Harness  # noqa: E402

# (K, N, member ends, k per member, SwiGLU input)
CASES = [(576, 1536, [500, 1536], [200, 300], True), (4100, 1056, None, [2050], False), (11008, 512, None, [5504], True),
         (14336, 512, [100, 512], [7000, 14336], False), (40, 64, None, [0], False)]


def main() -> int:
    h = Harness(os.environ.get("ACTTAIL_BENCH_LIB", str(ROOT / "build" / "ops" / "libacttail_bench.so")))
    rng = np.random.default_rng(1)
    launches = 0
    for kernel in (0, 3, 4):  # stream-K, one-row, pipelined one-row
        for K, N, ends, ks, swiglu in CASES:
            for fused in (1, 0):
                x = _select_input(rng, 2 * K if swiglu else K, "normal")
                q, s, o = random_weights(rng, K, N, 32, np.float16)
                _run_select_case(h, x, q, s, o, ks, ends, swiglu, _fused(kernel, fused))
                launches += 1
        for K in (257, 4096, 14336):
            x = torch.from_numpy(_select_input(rng, 2 * K, "ties")).cuda().repeat(8, 1)
            for swiglu in (False, True):
                h.select(x if swiglu else x[:, :K].contiguous(), K // 2, swiglu=swiglu, in_block=True)
                launches += 1
    torch.cuda.synchronize()
    print(f"sanitizer driver: ok, {launches} launches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
