#!/usr/bin/env bash
# Fetch the cuBLAS headers (types and prototypes; the op library opens libcublas at run time and never links
# it) when the CUDA toolkit has none, into third_party/cublas/include: from an installed nvidia-cublas Python
# package (offline GPU machines often have one), else from the nvidia-cublas wheel of the toolkit's major
# version through pip. Prints the include directory.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
inc="$root/third_party/cublas/include"
if [ -f "$inc/cublas_api.h" ]; then echo "$inc"; exit 0; fi
installed="$(python3 - <<'PY' 2>/dev/null || true
import importlib.util, pathlib
spec = importlib.util.find_spec("nvidia")
for root in (spec.submodule_search_locations if spec else []):
    for header in sorted(pathlib.Path(root).glob("*/include/cublas_api.h")):
        print(header.parent)
        raise SystemExit
PY
)"
if [ -n "$installed" ]; then mkdir -p "$inc"; cp "$installed"/cublas*.h "$inc"/; echo "$inc"; exit 0; fi
nvcc_path="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
major="$("$nvcc_path" --version | sed -nE 's/.*release ([0-9]+)\..*/\1/p')"
[ -n "$major" ] || { echo "fetch_cublas_headers: cannot read the CUDA version from $nvcc_path" >&2; exit 2; }
spec="nvidia-cublas==$major.*"
[ "$major" -lt 13 ] && spec="nvidia-cublas-cu$major"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$spec" >&2
mkdir -p "$inc"
python3 - "$tmp" "$inc" <<'PY'
import pathlib, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith((".h", ".hpp")) and "/include/" in name and "cublas" in name.rsplit("/", 1)[-1]:
            (dest / name.rsplit("/", 1)[-1]).write_bytes(z.read(name))
PY
[ -f "$inc/cublas_api.h" ] || { echo "fetch_cublas_headers: no cublas_api.h in the wheel" >&2; exit 2; }
echo "$inc"
