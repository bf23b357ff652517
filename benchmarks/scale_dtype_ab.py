"""The 4-bit op's scales and offsets in float16 against float32, same folder, same values, alternating runs.

A CPU ``--weights int4`` export stores the fused op's scales and offsets in float16 beside its float32 activations
(``ExportOptions.scale_dtype``). This copies FOLDER with those tensors widened to float32 (the same values: the op's
result is the same to the bit, ``tests/test_ops_nbits.py::test_float16_scales_beside_float32_x``) and times both
folders with onnxruntime-genai, alternating, in ``benchmarks/decode.py``'s child (128-token random prompt, greedy
decode), so the difference is the bytes a decode step streams and nothing else::

    python benchmarks/scale_dtype_ab.py FOLDER --threads 2 --rounds 4 --output docs/results/int4/smollm2_cpu_scale_dtype_ab.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def widen_scales(folder: Path, out: Path) -> int:
    """Copy ``folder`` to ``out`` with every SparseMatMulNBits node's float16 scales / offsets stored as float32; returns
    how many tensors were widened."""
    import onnx
    from onnx import numpy_helper

    from acttail_export.int4_rewrite import NBITS_OP

    shutil.copytree(folder, out)
    model = onnx.load(str(folder / "model.onnx"))
    names = {i for n in model.graph.node if n.op_type == NBITS_OP for i in n.input[2:4]}
    widened = 0
    for t in model.graph.initializer:
        if t.name in names and t.data_type == onnx.TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
            widened += 1
    for f in out.glob("model.onnx*"):
        f.unlink()
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return widened


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import decode

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a --weights int4 export for the CPU (float16 scales)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both folders")
    ap.add_argument("--rounds", type=int, default=4, help="alternating runs of each folder")
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wide = work / "float32-scales"
        widened = widen_scales(args.folder, wide)
        if widened == 0:
            raise SystemExit(f"{args.folder} has no float16 scales of a SparseMatMulNBits node")
        prompt = np.random.default_rng(0).integers(100, 40000, (1, args.prompt_length))
        np.save(work / "prompt.npy", prompt)
        common = {"prompt": str(work / "prompt.npy"), "decode_tokens": args.decode_tokens, "warmup_tokens": 8,
                  "provider": "cpu", "threads": args.threads, "kind": "genai", "filename": "model.onnx", "cuda_graph": False}
        folders = {"float16 scales": args.folder, "float32 scales": wide}
        runs: dict[str, list[dict]] = {k: [] for k in folders}
        for r in range(args.rounds):
            for label, folder in folders.items():
                res = decode.run_child(dict(common, dir=str(folder)), 900)
                if "error" in res:
                    raise SystemExit(f"{label}: {res['error']}")
                runs[label].append(res)
                print(f"round {r + 1} {label}: decode {res['decode_ms_median']:.3f} ms/token", flush=True)
        sizes = {k: sum(p.stat().st_size for p in f.iterdir() if p.is_file()) for k, f in folders.items()}
    summary = {k: {"decode_ms_median_of_runs": float(np.median([r["decode_ms_median"] for r in v])),
                   "decode_ms_runs": [round(r["decode_ms_median"], 3) for r in v],
                   "prefill_ms_median_of_runs": float(np.median([r["prefill_ms"] for r in v])),
                   "folder_bytes": sizes[k]} for k, v in runs.items()}
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != str(args.folder)]
    out = {"command": "python benchmarks/scale_dtype_ab.py FOLDER " + " ".join(given),
           "threads": args.threads, "rounds": args.rounds, "widened_tensors": widened, "summary": summary, "runs": runs}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1))
    for k, v in summary.items():
        print(f"{k}: decode {v['decode_ms_median_of_runs']:.3f} ms/token (runs {v['decode_ms_runs']}), "
              f"prefill {v['prefill_ms_median_of_runs']:.1f} ms, folder {v['folder_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
