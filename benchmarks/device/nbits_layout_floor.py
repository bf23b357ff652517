"""The 4-bit decode GEMV's reads without its arithmetic, in the op's layout and in a tile-major one (CUDA machine).

`SparseMatMulNBits` stores Q row-major along K (row k = the N columns of input channel k, N/2 bytes), and its decode
GEMV cuts the work into column tiles of 512 columns (256 bytes of a row) x rows: a warp streams one tile's 256-byte
pieces of consecutive kept rows, one Q row (N/2 bytes) apart. This script times only those reads (the harness'
`acttail_bench_tiled_floor`: the same stream-K ranges, 8 warps per block, 8 rows in flight per lane) with the pieces
where the op's layout puts them (row stride N/2 bytes) and where a tile-major layout would (a tile's rows contiguous,
row stride 256 bytes), at 0 / 50 / 80 % of the rows skipped, on weights rotated over copies larger than 3x L2 (CUPTI
kernel time, calls captured in a CUDA graph as kernel_bench_nbits.py does).
If the op's layout reads much slower than the tile-major one, the layout, not the kernel's arithmetic, sets the
GEMV's speed.

    python3 benchmarks/device/nbits_layout_floor.py --harness build/dev90/libacttail_bench.so --output <json>
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_bench_nbits import time_graph  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
TILE_BYTES = 256  # 512 columns of 4-bit weights: one warp-row of the decode GEMV (16 columns per lane)
L2_BYTES = 60 * 2**20


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--harness", required=True, help="libacttail_bench.so built for this GPU")
    ap.add_argument("--blocks-per-sm", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    lib = ctypes.CDLL(args.harness)
    f = lib.acttail_bench_tiled_floor
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p,
                  ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    f.restype = ctypes.c_int
    err = ctypes.create_string_buffer(512)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(64, dtype=torch.int32, device="cuda")
    rows = []
    for K, N in SHAPES:
        tiles = math.ceil(N / 512)
        nbytes = K * tiles * TILE_BYTES
        copies = max(3, math.ceil(3 * L2_BYTES / nbytes))
        buf = torch.randint(0, 255, (copies * nbytes,), dtype=torch.uint8, device="cuda")
        grid = sms * args.blocks_per_sm
        aligned = grid // tiles * tiles  # as the op's launcher: a multiple of the tiles when within 10 %
        if aligned >= tiles and aligned * 10 >= grid * 9:
            grid = aligned
        for layout, row_stride, tile_stride in (("op (row-major)", tiles * TILE_BYTES, TILE_BYTES), ("tile-major", TILE_BYTES, K * TILE_BYTES)):
            for keep, sparsity in ((256, 0.0), (128, 0.5), (51, 0.8)):
                def call(c, row_stride=row_stride, tile_stride=tile_stride, keep=keep, base=buf.data_ptr()):
                    if f(base + c * nbytes, K, tiles, row_stride, tile_stride, keep, sink.data_ptr(), grid,
                         torch.cuda.current_stream().cuda_stream, err, 512):
                        raise RuntimeError(err.value.decode())
                calls = [lambda c=c: call(c) for c in range(copies)] * max(1, 48 // copies)
                _, us, _ = time_graph(calls, args.reps)  # CUPTI kernel time per call, calls captured in one CUDA graph
                read = nbytes * (keep / 256)
                rows.append({"K": K, "N": N, "layout": layout, "sparsity": sparsity, "us": us, "read_bytes": read, "tb_s": read / us / 1e6})
                print(f"{K}x{N} {layout:15s} s={sparsity:.1f}: {us:7.2f} us per call ({read / us / 1e6:.2f} TB/s of the rows read)", flush=True)
        del buf
        torch.cuda.empty_cache()
    if args.output:
        env = {"gpu": torch.cuda.get_device_name(0), "sms": sms, "blocks_per_sm": args.blocks_per_sm, "torch": torch.__version__}
        with open(args.output, "w") as fh:
            json.dump({"env": env, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
