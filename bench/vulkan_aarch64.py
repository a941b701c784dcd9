"""The Vulkan target on aarch64 (issue 15's stretch: a Pi 5 artifact using its GPU), checked here under qemu.

  python bench/vulkan_aarch64.py prepare DIR   # DIR/wgpu: the `wgpu` aarch64 wheel's wgpu-native (pip download);
                                               # DIR/libedgellm_webgpu.so: the plugin cross-built with
                                               # aarch64-linux-gnu-g++ against the arm64 root's TVM runtime;
                                               # DIR/art-*: tiny Llama q0f32 / q4f32_1 for webgpu with aarch64 host
                                               # code, and the same for this machine (the reference)
  python bench/vulkan_aarch64.py run DIR MESA  # runs the aarch64 artifacts on emulated Cortex-A76 cores
                                               # (scripts/arm64-rootfs.sh's root, qemu-aarch64-static) on Mesa's
                                               # arm64 lavapipe (MESA: an unpacked mesa-vulkan-drivers:arm64 +
                                               # libvulkan1:arm64 with their libraries), and compares the logits
                                               # with the x86 build on this machine's lavapipe

MESA, once (no root needed; ~60 MB of arm64 .debs):
  O="-oAPT::Architecture=arm64 -oAPT::Architectures=arm64 -oDir::State::Lists=/tmp/a64/lists
     -oDir::State::status=/tmp/a64/status -oDir::Cache::archives=/tmp/a64/debs -oDebug::NoLocking=1"
  mkdir -p /tmp/a64/lists /tmp/a64/debs; touch /tmp/a64/status; apt-get $O update
  apt-get $O install -y --download-only --no-install-recommends mesa-vulkan-drivers libvulkan1
  for d in /tmp/a64/debs/*.deb; do dpkg -x $d MESA; done

The same Mesa package holds v3dv (`libvulkan_broadcom.so`, the Pi 5's VideoCore VII) and turnip (Adreno), panvk is
not in Debian 12's. On a real board nothing here is needed beyond `pip install 'edgellm[vulkan]'` and g++: the
plugin is compiled there at first use (docs/vulkan.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]
STEPS = 8
SCHEMES = ("q0f32", "q4f32_1")


def _fetch_wgpu_arm(out: Path) -> Path:
    res = out / "wgpu" / "resources"
    if (res / "webgpu.h").exists():
        return res
    import importlib.metadata

    version = importlib.metadata.version("wgpu")
    whl = out / "whl"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
                    "-d", str(whl), f"wgpu=={version}"], check=True)
    with zipfile.ZipFile(next(whl.glob("wgpu-*aarch64*.whl"))) as z:
        for name in z.namelist():
            if name.startswith("wgpu/resources/"):
                z.extract(name, out)
    return res


def prepare_all(out: Path) -> None:
    from pi_emulation import ROOT
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.runtime.webgpu_plugin import cross_build

    out.mkdir(parents=True, exist_ok=True)
    res = _fetch_wgpu_arm(out)
    site = ROOT / "opt" / "edgellm-site"
    cross_build(out / "libedgellm_webgpu.so", "aarch64-linux-gnu-g++", res,
                [site / "tvm" / "lib", site / "tvm_ffi" / "lib"],
                ["/opt/edgellm-site/tvm/lib", "/opt/edgellm-site/tvm_ffi/lib", str(res.resolve())])
    ckpt = make_checkpoint(out / "ckpt" / "llama", "llama")
    arm = "vulkan-arm64"  # the preset: vulkan with aarch64 host code and the cross toolchain
    for scheme in SCHEMES:
        for label, preset in (("arm64", arm), ("x86", "vulkan")):
            dst = out / f"art-{label}-{scheme}"
            if not dst.exists():
                # --head q4: the embedding and head in the layers' 4-bit row (fp32 scales): the default 8-bit rows
                # keep fp16 scales, which WGSL reads only with shader-f16 (arm64 lavapipe has none)
                compile_model(CompileArgs(model=str(ckpt), output=dst, target=preset, quant=scheme,
                                          runtime=RuntimeOptions(256, 128, 16, 1), head="q4"))
    print("prepared", out)


BOARD_SCRIPT = """
import json, sys, numpy as np
from edgellm.device_runners.engine import Engine
eng = Engine(sys.argv[1], verify=False)
with eng.sequence() as seq:
    rows = [seq.prefill(json.loads(sys.argv[2]))]
    for t in json.loads(sys.argv[3]):
        rows.append(seq.decode(t))
print("EDGELLM_ROWS " + json.dumps({"device": eng.device_info.describe(), "logits": np.stack(rows).tolist()}))
"""


def run(out: Path, mesa: Path) -> None:
    from pi_emulation import ROOT

    from edgellm.device_runners.emulate import python_command
    from edgellm.device_runners.engine import Engine

    lib = mesa / "usr" / "lib" / "aarch64-linux-gnu"
    icd = out / "lvp_arm64.json"
    icd.write_text(json.dumps({"file_format_version": "1.0.0",
                               "ICD": {"library_path": str(lib / "libvulkan_lvp.so"), "api_version": "1.3.0"}}))
    results = {}
    for scheme in SCHEMES:
        ref_eng = Engine(out / f"art-x86-{scheme}", verify=False)
        with ref_eng.sequence() as seq:
            toks = [int(np.argmax(seq.prefill(PROMPT)))]
            for _ in range(STEPS - 1):
                toks.append(seq.decode_greedy(toks[-1]))
        with ref_eng.sequence() as seq:
            ref = np.stack([seq.prefill(PROMPT)] + [seq.decode(t) for t in toks])
        src = out / "src"  # the package for the board's python (pure Python; the board has no compiler library)
        if not src.exists():
            src.mkdir()
            subprocess.run(["cp", "-r", str(REPO / "edgellm"), str(src)], check=True)
        cmd, env = python_command(ROOT, "cortex-a76", ["-c", BOARD_SCRIPT, str(out / f"art-arm64-{scheme}"),
                                                       json.dumps(PROMPT), json.dumps(toks)], [src])
        env.update({"EDGELLM_WEBGPU_PLUGIN": str(out / "libedgellm_webgpu.so"), "VK_ICD_FILENAMES": str(icd),
                    "LD_LIBRARY_PATH": f"{lib}:{mesa / 'lib' / 'aarch64-linux-gnu'}", "XDG_RUNTIME_DIR": "/tmp"})
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("EDGELLM_ROWS ")), None)
        if line is None:
            results[scheme] = {"error": proc.stderr[-1500:]}
            print(scheme, "failed:", proc.stderr[-1500:])
            continue
        board = json.loads(line[len("EDGELLM_ROWS "):])
        got = np.array(board["logits"], dtype=np.float32)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        results[scheme] = {"device": board["device"], "rel_err_vs_x86": rel, "steps": len(got),
                           "top1_agreement": float(np.mean(got.argmax(-1) == ref.argmax(-1)))}
        print(scheme, json.dumps(results[scheme]))
    (out / "result.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cmd, where = sys.argv[1], Path(sys.argv[2])
    if cmd == "prepare":
        prepare_all(where)
    else:
        run(where, Path(sys.argv[3]))
