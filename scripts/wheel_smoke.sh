#!/usr/bin/env bash
# Build the wheel (`pip wheel .`: scikit-build-core runs CMakeLists.txt; CPU kernels here, ACTTAIL_CUDA as for
# scripts/build_ops.sh), check that it holds the op library, install it into a fresh venv and run
# scripts/wheel_smoke.py there, outside the clone. Offline: the venv gets its dependencies from .venv (a path entry
# to its site-packages, whose .pth files — among them the clone's editable path — are not processed), and only
# acttail-export from the wheel.   Usage: bash scripts/wheel_smoke.sh [calibration text]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
text=${1:-${ACTTAIL_WIKITEXT_DIR:-}/wiki.valid.raw}
[ -f "$text" ] || { echo "wheel_smoke: no calibration text at '$text': pass a file or set ACTTAIL_WIKITEXT_DIR" >&2; exit 2; }
work=build/wheel-smoke
rm -rf "$work" && mkdir -p "$work"
start=$(date +%s)
ACTTAIL_CUDA=${ACTTAIL_CUDA:-0} .venv/bin/python -m pip wheel -q . --no-deps -w "$work/dist" -Cbuild-dir="$work/cmake"
wheel=$(ls "$work"/dist/acttail_export-*.whl)
# the listing first, then grep: `zipfile -l | grep -q` fails under pipefail when grep exits early (the lister's broken pipe)
listing=$(.venv/bin/python -m zipfile -l "$wheel")
grep -q "acttail_export/lib/libacttail_ops.so" <<< "$listing" ||
  { echo "wheel_smoke: $wheel has no acttail_export/lib/libacttail_ops.so" >&2; exit 1; }
echo "wheel_smoke: built $(basename "$wheel") with the op library in $(( $(date +%s) - start )) s"
.venv/bin/python -m venv "$work/venv"
deps=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$deps" > "$site/_acttail_smoke_deps.pth"
"$work/venv/bin/python" -m pip install -q --no-index --no-deps "$wheel"
cd "$work" && "$root/$work/venv/bin/python" "$root/scripts/wheel_smoke.py" --calibration-data "$(cd "$root" && realpath "$text")" --work .
