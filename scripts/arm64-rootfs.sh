#!/usr/bin/env bash
# Prepare an arm64 Debian root filesystem with python3 and the aarch64 TVM *runtime* (no compiler library), so
# Raspberry Pi / Jetson-host artifacts run here under qemu-aarch64-static. Idempotent: an existing, complete
# root is left alone. Usage: scripts/arm64-rootfs.sh [ROOT]   (default: $EDGELLM_ARM64_ROOT or
# ~/.cache/edgellm/arm64-rootfs). Needs: qemu-user-static, debootstrap (Debian packages), pip.
set -euo pipefail
ROOT="${1:-${EDGELLM_ARM64_ROOT:-$HOME/.cache/edgellm/arm64-rootfs}}"
SITE="$ROOT/opt/edgellm-site"
TVM_VERSION="0.27.0.post1"
if [ -f "$ROOT/.edgellm-complete" ]; then echo "$ROOT"; exit 0; fi
for tool in qemu-aarch64-static debootstrap; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install qemu-user-static debootstrap" >&2; exit 1; }
done
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
rm -rf "$ROOT"; mkdir -p "$ROOT"
debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 bookworm "$ROOT" "$MIRROR" >&2
for d in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg -x "$d" "$ROOT"; done
qemu-aarch64-static "$ROOT/sbin/ldconfig" -r "$ROOT"
PYV=$(QEMU_CPU=cortex-a72 qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
WHEELS="$ROOT/opt/wheels"; mkdir -p "$WHEELS" "$SITE"
PLAT=(--only-binary=:all: --no-deps --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
      --platform manylinux2014_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_26_aarch64
      --python-version "$PYV" --implementation cp --abi "cp$PYV" --abi abi3 --abi none)
python3 -m pip download -q "${PLAT[@]}" -d "$WHEELS" \
  "apache-tvm==$TVM_VERSION" apache-tvm-ffi numpy ml_dtypes typing_extensions tokenizers jinja2 markupsafe >&2
python3 -m pip install -q "${PLAT[@]}" --no-compile --target "$SITE" "$WHEELS"/*.whl >&2
rm -f "$SITE/tvm/lib/libtvm_compiler.so"   # a device has the runtime only
rm -rf "$WHEELS" "$SITE/tvm/3rdparty" "$SITE/tvm/include" "$SITE/tvm/src" "$ROOT/var/cache/apt/archives"/*.deb
touch "$ROOT/.edgellm-complete"
echo "$ROOT"
