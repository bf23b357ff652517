#!/usr/bin/env bash
# Fetch ONNX Runtime C/C++ API headers (API 21) from Debian trixie's libonnxruntime-dev, without
# installing anything into the system: apt state and the extracted files stay under third_party/.
# Prints the include directory. Set ONNXRUNTIME_INCLUDE_DIR to use your own headers instead.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/third_party/onnxruntime"
inc="$dest/include"
if [ -f "$inc/onnxruntime_cxx_api.h" ]; then echo "$inc"; exit 0; fi
work="$root/third_party/.apt-trixie"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/sources.list.d" "$work/etc/preferences.d" "$work/debs"
echo "deb http://deb.debian.org/debian trixie main" > "$work/etc/sources.list"
opts=(-o Dir::Etc::SourceList="$work/etc/sources.list" -o Dir::Etc::SourceParts="$work/etc/sources.list.d"
      -o Dir::Etc::Preferences="$work/etc/preferences" -o Dir::Etc::PreferencesParts="$work/etc/preferences.d"
      -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache" -o APT::Architecture=amd64
      -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
apt-get "${opts[@]}" update >&2
(cd "$work/debs" && apt-get "${opts[@]}" download libonnxruntime-dev >&2)
deb=$(ls "$work/debs"/libonnxruntime-dev_*.deb | head -1)
tmp="$work/x"; rm -rf "$tmp"; dpkg-deb -x "$deb" "$tmp"
hdr=$(dirname "$(find "$tmp" -name onnxruntime_cxx_api.h | head -1)")
mkdir -p "$inc"; cp -r "$hdr"/. "$inc"/
rm -rf "$tmp"
echo "$inc"
