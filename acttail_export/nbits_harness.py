"""ctypes wrapper of the SparseMatMulNBits CUDA entry points of the benchmark harness (libacttail_bench.so).

Built by ``ACTTAIL_BENCH=1 bash scripts/build_ops.sh`` from csrc/sparse_matmul_nbits/bench.cu; used by
benchmarks/kernel_bench_nbits.py (timing) and tests/test_ops_nbits_harness.py (every forced kernel variant against the
reference). torch tensors in, on torch's current CUDA stream; torch is imported lazily.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np

logger = logging.getLogger(__name__)
BLOCK = 32
VARIANT_FIELDS = ("cols_per_lane", "blocks_per_sm", "use_cublas", "stream_scratch", "prefetch", "stage", "kernel", "splits", "chunk_kb",
                  "chunk_cols", "fused_select")


class NBitsCall(ctypes.Structure):
    """Mirror of NBitsCall in csrc/sparse_matmul_nbits/bench.cu."""

    _fields_ = [("half", ctypes.c_int), ("x", ctypes.c_void_p), ("q", ctypes.c_void_p), ("scales", ctypes.c_void_p),
                ("offsets", ctypes.c_void_p), ("thresholds", ctypes.c_void_p), ("threshold_count", ctypes.c_longlong),
                ("scale", ctypes.c_void_p), ("scale_rows", ctypes.c_longlong), ("y", ctypes.c_void_p), ("workspace", ctypes.c_void_p),
                ("stream", ctypes.c_void_p), ("M", ctypes.c_longlong), ("K", ctypes.c_longlong), ("N", ctypes.c_longlong),
                ("B", ctypes.c_longlong), ("topk", ctypes.c_int), ("ramp", ctypes.c_float), ("G", ctypes.c_int),
                ("ends", ctypes.POINTER(ctypes.c_longlong)), ("ks", ctypes.POINTER(ctypes.c_longlong)), ("density", ctypes.c_float),
                ("swiglu", ctypes.c_int)]


class NBitsVariant(ctypes.Structure):
    """Mirror of NBitsVariant: 0 (columns, blocks) / -1 (the others) keep the op's own choice."""

    _fields_ = [(name, ctypes.c_int) for name in VARIANT_FIELDS]


class Harness:
    """The SparseMatMulNBits entry points of libacttail_bench.so."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.err = ctypes.create_string_buffer(512)
        self.lib.acttail_nbits_bench_run.argtypes = [ctypes.POINTER(NBitsCall), ctypes.POINTER(NBitsVariant), ctypes.c_char_p, ctypes.c_int]
        self.lib.acttail_nbits_bench_run.restype = ctypes.c_int
        self.lib.acttail_nbits_bench_workspace_bytes.argtypes = [ctypes.POINTER(NBitsCall), ctypes.POINTER(NBitsVariant)]
        self.lib.acttail_nbits_bench_workspace_bytes.restype = ctypes.c_longlong
        nblocks = getattr(self.lib, "acttail_nblocks_bench_run", None)
        if nblocks is not None:
            nblocks.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_longlong] * 3 + [
                ctypes.c_int] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_char_p, ctypes.c_int]
            nblocks.restype = ctypes.c_int
        self.nblocks = nblocks
        for name, args in (("acttail_bench_block_select", [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3 + [ctypes.c_int, ctypes.c_longlong]),
                           ("acttail_bench_topk_select", [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3),
                           ("acttail_bench_swiglu", [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 2)):
            fn = getattr(self.lib, name, None)
            if fn is not None:
                fn.argtypes = args + [ctypes.c_char_p, ctypes.c_int]
                fn.restype = ctypes.c_int
        floor = getattr(self.lib, "acttail_bench_read_floor", None)
        if floor is not None:
            floor.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
            floor.restype = ctypes.c_int
        self.floor = floor
        floor_launch = getattr(self.lib, "acttail_bench_read_floor_launch", None)
        if floor_launch is not None:
            floor_launch.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_char_p, ctypes.c_int]
            floor_launch.restype = ctypes.c_int
        self.floor_launch = floor_launch

    @staticmethod
    def call(x, q, scales, offsets, y, *, thresholds=None, scale=None, workspace=None, topk: bool, ks=(0,), ends=None,
             ramp: float = 0.0, block: int = BLOCK, density: float = -1.0, swiglu: bool = False) -> NBitsCall:
        """An NBitsCall for torch tensors (x [M, K], q [K, ceil(N/2)] uint8, scales / offsets [ceil(K/B), N], y [M, N]);
        density: the node's attribute (the expected kept fraction, threshold mode; < 0: not given); swiglu: x is
        [M, 2K] = [gate | up] and the input silu(gate) * up (the op's activation "swiglu")."""
        import torch

        G = len(ends) if ends else 1
        c = NBitsCall()
        c.half = int(x.dtype == torch.float16)
        c.x, c.q, c.scales, c.offsets, c.y = x.data_ptr(), q.data_ptr(), scales.data_ptr(), offsets.data_ptr(), y.data_ptr()
        c.thresholds = thresholds.data_ptr() if thresholds is not None else None
        c.threshold_count = thresholds.numel() if thresholds is not None else 0
        c.scale = scale.data_ptr() if scale is not None else None
        c.scale_rows = (1 if scale.dim() == 1 else scale.shape[0]) if scale is not None else 0
        c.workspace = workspace.data_ptr() if workspace is not None else None
        c.M, c.K, c.N, c.B = x.shape[0], x.shape[1] // (2 if swiglu else 1), y.shape[1], block
        c.topk, c.ramp, c.G, c.density, c.swiglu = int(topk), float(ramp), G, float(density), int(swiglu)
        ends_arr = (ctypes.c_longlong * G)(*(ends or [y.shape[1]]))
        ks_arr = (ctypes.c_longlong * G)(*(list(ks) * G if len(ks) == 1 else ks))
        c.ends, c.ks = ends_arr, ks_arr
        # The struct holds raw pointers: keep the arrays and tensors alive as long as the call exists. Without this, a
        # tensor passed as a temporary (call(x, dev(q), ...)) is freed at once and torch hands its memory to the next
        # allocation (the workspace, which the op zeroes): the kernel then reads zeros where Q / scales were.
        c._keep = (ends_arr, ks_arr, x, q, scales, offsets, y, thresholds, scale, workspace)
        return c

    @staticmethod
    def _variant(variant: tuple[int, ...] | None):
        """The NBitsVariant* argument: a reference to the padded variant (which it keeps alive), or None."""
        if variant is None:
            return None
        return ctypes.byref(NBitsVariant(*(tuple(variant) + (-1,) * (len(VARIANT_FIELDS) - len(variant)))))

    def workspace(self, call: NBitsCall, variant: tuple[int, ...] | None = None):
        """Device workspace the op would allocate for this call under the variant (a torch uint8 tensor)."""
        import torch

        n = max(int(self.lib.acttail_nbits_bench_workspace_bytes(ctypes.byref(call), self._variant(variant))), 16)
        return torch.empty((n + 15) // 16 * 16, dtype=torch.uint8, device="cuda")

    def run(self, call: NBitsCall, variant: tuple[int, ...] | None = None) -> None:
        """Run one call; variant = a prefix of VARIANT_FIELDS (0 / -1: the op's choice), None: the op's plan."""
        import torch

        call.stream = torch.cuda.current_stream().cuda_stream
        if self.lib.acttail_nbits_bench_run(ctypes.byref(call), self._variant(variant), self.err, 512):
            raise RuntimeError(self.err.value.decode())

    def run_case(self, case, variant=None, density: float = -1.0) -> np.ndarray:
        """Run a test case (x, packed(), scales, offsets, block, mode, thresholds, scale, ks, segments, ramp) through the
        harness; returns Y as numpy."""
        import torch

        def dev(a):
            return torch.from_numpy(np.ascontiguousarray(a)).cuda()

        x = dev(case.x.reshape(-1, case.K))
        y = torch.empty((x.shape[0], case.N), dtype=x.dtype, device="cuda")
        thr = dev(np.asarray(case.thresholds, np.float32).reshape(-1)) if case.mode == "threshold" else None
        scale = dev(case.scale) if case.scale is not None else None
        c = self.call(x, dev(case.packed()), dev(case.scales), dev(case.offsets), y, thresholds=thr, scale=scale, topk=case.mode == "topk",
                      ks=case.ks or (0,), ends=case.segments, ramp=case.ramp, block=case.block, density=density)
        ws = self.workspace(c, variant)
        c.workspace = ws.data_ptr()
        c._keep += (ws,)
        self.run(c, variant)
        torch.cuda.synchronize()
        return y.cpu().numpy().reshape(case.x.shape[:-1] + (case.N,))

    def _entry(self, name: str):
        fn = getattr(self.lib, name, None)
        if fn is None:
            raise RuntimeError(f"this harness has no {name} (rebuild it from the current csrc/)")
        return fn

    def swiglu(self, x):
        """silu(gate) * up of float16 x [M, 2K] by the op's activation kernel (what its top-k paths select on): [M, K]."""
        import torch

        if x.dtype != torch.float16 or x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 2:
            raise ValueError(f"swiglu: x must be a contiguous float16 [M, 2K] tensor, got {x.dtype} {tuple(x.shape)}")
        M, K = x.shape[0], x.shape[1] // 2
        out = torch.empty((M, K), dtype=torch.float16, device=x.device)
        if self._entry("acttail_bench_swiglu")(x.data_ptr(), out.data_ptr(), torch.cuda.current_stream().cuda_stream, M, K, self.err, 512):
            raise RuntimeError(self.err.value.decode())
        return out

    def select(self, x, k: int, *, swiglu: bool = False, in_block: bool = False) -> np.ndarray:
        """(cut key, last kept tie index) of each row of float16 x [M, K] (rows contiguous; [M, 2K] = [gate | up] with
        swiglu), uint32 [M, 2]: the selection kernel (after the activation kernel with swiglu), or the decode GEMV's
        in-block selection (in_block)."""
        import torch

        if x.dtype != torch.float16 or x.dim() != 2 or not x.is_contiguous():
            raise ValueError(f"select: x must be a contiguous float16 [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
        M, K = x.shape[0], x.shape[1] // (2 if swiglu else 1)
        sel = torch.zeros((M, 2), dtype=torch.int32, device=x.device)
        stream = torch.cuda.current_stream().cuda_stream
        if in_block:
            rc = self._entry("acttail_bench_block_select")(x.data_ptr(), sel.data_ptr(), stream, M, K, k, int(swiglu), x.stride(0),
                                                           self.err, 512)
        else:
            src = self.swiglu(x) if swiglu else x
            rc = self._entry("acttail_bench_topk_select")(1, src.data_ptr(), sel.data_ptr(), stream, M, K, k, self.err, 512)
        if rc:
            raise RuntimeError(self.err.value.decode())
        torch.cuda.synchronize()
        return sel.cpu().numpy().view(np.uint32)

    def read_floor(self, buf, nbytes: int, sink, blocks: int) -> None:
        """A plain streaming read of nbytes of buf by `blocks` blocks (the copy floor of the op's bytes)."""
        import torch

        if self.floor(buf.data_ptr(), nbytes // 16 * 16, sink.data_ptr(), blocks, torch.cuda.current_stream().cuda_stream, self.err, 512):
            raise RuntimeError(self.err.value.decode())

    def read_floor_launch(self, buf, nbytes: int, sink, blocks: int, mode: int) -> None:
        """read_floor launched plainly (mode 0) or as a programmatic dependent waiting before (1) or after (2) its reads."""
        import torch

        if self.floor_launch is None:
            raise RuntimeError("this harness build has no acttail_bench_read_floor_launch")
        if self.floor_launch(buf.data_ptr(), nbytes // 16 * 16, sink.data_ptr(), blocks, mode, torch.cuda.current_stream().cuda_stream,
                             self.err, 512):
            raise RuntimeError(self.err.value.decode())

    def run_nblocks(self, x, threshold: float, q, pairs, y, scratch, counters, *, block: int, cols_per_lane: int = 32,
                    unroll: int = 4, splits: int = 0) -> None:
        """The blocks-along-N prototype decode GEMV (csrc/sparse_matmul_nbits/kernels/gemv_nblocks.cuh) on torch CUDA tensors:
        x float16 [K], q uint8 [K, N/2], pairs float16 [K, ceil(N/B), 2] (scale, offset), y float16 [N]; scratch float32
        [N] and counters int32 [ceil(N/512)] zero before the first call (every call leaves them zero); unroll: pooled rows
        a warp loads before using them (4 or 8)."""
        import torch

        if self.nblocks is None:
            raise RuntimeError("this harness has no acttail_nblocks_bench_run (rebuild it from the current csrc/)")
        K, N = x.shape[-1], y.shape[-1]
        nb = (N + block - 1) // block
        want = {"x": (x, torch.float16, K), "y": (y, torch.float16, N), "q": (q, torch.uint8, K * (N // 2)),
                "pairs": (pairs, torch.float16, K * nb * 2), "scratch": (scratch, torch.float32, N),
                "counters": (counters, torch.int32, (N + 511) // 512)}
        for name, (t, dtype, numel) in want.items():
            exact = name not in ("scratch", "counters")  # these two may be larger (one buffer for several shapes)
            if t.dtype != dtype or not t.is_cuda or not t.is_contiguous() or t.numel() < numel or (exact and t.numel() != numel):
                raise ValueError(f"run_nblocks: {name} must be a contiguous CUDA {dtype} tensor of {numel} elements, got {t.dtype} {tuple(t.shape)}")
        if self.nblocks(x.data_ptr(), float(threshold), q.data_ptr(), pairs.data_ptr(), K, N, block, cols_per_lane, unroll, splits,
                        scratch.data_ptr(), counters.data_ptr(), y.data_ptr(), torch.cuda.current_stream().cuda_stream, self.err, 512):
            raise RuntimeError(self.err.value.decode())
