"""Ad-hoc prefill checks of the transposed dequantization through the harness (not part of the test suite):
float32 tiny weight scales (the exact-conversion fallback), shapes with several tiles per block, partial tiles,
K % 8 != 0 (general path), M = 9."""
import sys

import numpy as np

sys.path.insert(0, "tests")
from test_ops_nbits import Case, assert_matches, llm_case, random_weights  # noqa: E402

from acttail_export.nbits_harness import Harness  # noqa: E402

ok = fail = 0
for lib in sys.argv[1:]:
    h = Harness(lib)
    rng = np.random.default_rng(7)
    cases = []
    x = rng.standard_normal((16, 512)).astype(np.float32)
    q, s, o = random_weights(rng, 512, 256, 32, np.float32)
    s[::2] *= np.float32(1e-33)
    o[::2] *= np.float32(1e-33)
    cases.append(("f32 tiny scales", Case(x, q, s, o, 32, "threshold", thresholds=np.array(0.3, np.float32))))
    for m, K, N, B, dt, mode in ((24, 11008, 4096, 32, np.float16, "threshold"), (24, 4096, 4104, 32, np.float16, "topk"),
                                 (9, 1000, 200, 16, np.float16, "threshold"), (17, 1004, 96, 64, np.float16, "threshold"),
                                 (33, 768, 1000, 128, np.float32, "topk"), (12, 11008, 136, 32, np.float32, "threshold")):
        cases.append((f"{m}x{K}x{N} B{B} {np.dtype(dt).name} {mode}", llm_case(rng, m, K, N, B, dt, mode)))
    for name, case in cases:
        try:
            for _ in range(2):
                assert_matches(h.run_case(case), case)
            ok += 1
            print("ok  ", lib, name, flush=True)
        except AssertionError as e:
            fail += 1
            print("FAIL", lib, name, str(e)[:300], flush=True)
print(f"adhoc: {ok} ok, {fail} failed")
sys.exit(1 if fail else 0)
