"""Every target preset builds a tiny model without hardware; binaries are checked for what the device needs (the Pi
builds under qemu: tests/test_targets_emulated.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from edgellm.artifact import Artifact
from edgellm.cli import cli
from edgellm.compile import CompileArgs, compile_model
from edgellm.config import RuntimeOptions
from edgellm.targets import PRESETS, TargetError, resolve
from edgellm.targets.binfmt import describe_library

REQUIRED = ["host", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90", "jetson-orin", "jetson-xavier", "rpi4", "rpi5",
            "metal", "ios", "android", "vulkan"]
# jetson-xavier (sm_72) needs CUDA <= 12; this machine's nvcc 13.0 dropped sm_72 (see test_xavier_...). cuda-sm86 and
# cuda-sm89 are cuda-sm80's build for another nvcc -arch (test_sm86_and_sm89_build_what_sm80_builds): their tiny
# builds left the matrix for CI time
SAME_AS_SM80 = ("cuda-sm86", "cuda-sm89")
BUILDABLE = [p for p in REQUIRED if p not in ("vulkan", "jetson-xavier", *SAME_AS_SM80)] + ["vulkan-arm64"]
EXPECT = {  # preset -> (library, object format, machine, fatbin arch)
    "host": ("so", "elf", "x86_64", None),
    "cuda-sm80": ("so", "elf", "x86_64", "sm_80"), "cuda-sm86": ("so", "elf", "x86_64", "sm_86"),
    "cuda-sm89": ("so", "elf", "x86_64", "sm_89"), "cuda-sm90": ("so", "elf", "x86_64", "sm_90"),
    "jetson-orin": ("so", "elf", "aarch64", "sm_87"), "jetson-xavier": ("so", "elf", "aarch64", "sm_72"),
    "rpi4": ("so", "elf", "aarch64", None), "rpi5": ("so", "elf", "aarch64", None),
    "metal": ("tar", "macho", "arm64", None), "ios": ("tar", "macho", "arm64", None),
    "android": ("tar", "elf", "aarch64", None), "vulkan-arm64": ("so", "elf", "aarch64", None),
}
NEEDS_NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA presets build their fatbin with nvcc "
                                "(CUDA toolkit), which is not on PATH here")


def test_preset_table_has_every_target():
    assert set(REQUIRED) <= set(PRESETS)
    assert PRESETS["jetson-orin"].target["arch"] == "sm_87" and PRESETS["jetson-orin"].host["mcpu"] == "cortex-a78"
    assert PRESETS["jetson-xavier"].host["mcpu"] == "carmel"
    assert PRESETS["rpi4"].target["mcpu"] == "cortex-a72" and "+neon" in PRESETS["rpi4"].target["mattr"]
    assert PRESETS["rpi5"].target["mcpu"] == "cortex-a76"
    assert PRESETS["ios"].host["mtriple"] == "arm64-apple-ios" and PRESETS["metal"].host["mtriple"] == "arm64-apple-macos"
    assert PRESETS["android"].host["mtriple"] == "aarch64-linux-android" and PRESETS["android"].target["kind"] == "opencl"
    r = CliRunner().invoke(cli, ["targets", "--json"])
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert set(REQUIRED) <= set(rows) and rows["rpi5"]["toolchain"] == "aarch64-linux-gnu-g++"


def test_unknown_preset_lists_presets_and_closest():
    with pytest.raises(TargetError, match=r"unknown target 'rpi6'.*presets: host.*Did you mean rpi5, rpi4"):
        resolve("rpi6")
    r = CliRunner().invoke(cli, ["compile", "--target", "jetson-nano", "-o", "x"])
    assert r.exit_code == 2 and "jetson-orin" in r.stderr


def test_vulkan_compiles_without_a_vulkan_device(matrix, monkeypatch):
    """--target vulkan (TVM's webgpu codegen) needs no adapter, driver or plugin to compile: lib/model.so holds host
    code for this machine and the WGSL kernels. Running it: tests/test_vulkan_target.py."""
    from edgellm.runtime import webgpu_plugin

    monkeypatch.setattr(webgpu_plugin, "load_plugin", lambda: (_ for _ in ()).throw(AssertionError("plugin loaded")))
    art = Artifact.open(matrix("vulkan"))
    m = art.manifest
    assert m["target"]["kind"] == "webgpu" and m["target"]["device"] == "webgpu" and m["quant"]["scheme"] == "q4f32_1"
    assert m["target"]["features"]["backend"] == "wgpu-native on Vulkan" and m["lib"] == "lib/model.so"
    obj = describe_library(art.lib_path)["object"]
    assert obj["format"] == "elf" and obj["type"] == "shared" and obj["machine"] == m["target"]["host_triple"].split("-")[0]
    assert art.lib_path.read_bytes().count(b"@compute @workgroup_size(") >= 10  # the WGSL kernels, as source


def test_xavier_needs_older_cuda_and_says_so(monkeypatch, tmp_path):
    from edgellm.compile import cuda

    import edgellm.compile as comp

    if "sm_72" in cuda.nvcc_archs():
        pytest.skip("this nvcc still builds sm_72; the matrix covers it")
    monkeypatch.setattr(comp, "open_model", lambda *a: (_ for _ in ()).throw(AssertionError("weights were loaded")))
    with pytest.raises(ValueError, match=r"jetson-xavier.*cannot build sm_72.*CUDA 13 dropped sm_72"):
        compile_model(CompileArgs(model=None, output=tmp_path / "x", target="jetson-xavier"))


def test_raw_target_json(checkpoints, tmp_path):
    spec = json.dumps({"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu", "mcpu": "x86-64-v2"})
    compile_model(CompileArgs(model=str(checkpoints["llama"]), output=tmp_path / "a", target=spec, quant="q4f32_1",
                              runtime=RuntimeOptions(128, 32)))
    m = Artifact.open(tmp_path / "a").manifest
    assert m["target"]["preset"] == "custom" and m["target"]["tvm_target"]["mcpu"] == "x86-64-v2"


@pytest.mark.parametrize("preset", [pytest.param(p, marks=NEEDS_NVCC) if PRESETS[p].target["kind"] == "cuda" else p
                                    for p in BUILDABLE])
def test_compile_matrix(preset, matrix):
    art = Artifact.open(matrix(preset))
    m, (lib, fmt, machine, arch) = art.manifest, EXPECT[preset]
    p = PRESETS[preset]
    assert m["target"]["preset"] == preset and m["target"]["kind"] == p.target["kind"]
    assert m["target"]["export"] == lib and m["lib"] == f"lib/model.{lib}"
    host = (p.host or p.target).get("mtriple")
    assert m["target"]["host_triple"] == (host if host != "host" else m["target"]["host_triple"])
    desc = describe_library(art.lib_path)
    if lib == "so":
        assert desc["object"]["format"] == fmt and desc["object"]["machine"] == machine
        assert desc["object"]["type"] == "shared"
        assert [e["arch"] for e in desc["fatbin"]] == ([arch] if arch else [])
        assert not desc["cuda_source"]  # nvcc built the kernels; no CUDA source shipped
    else:
        members = desc["members"]
        assert {"devc.o", "lib0.o"} <= set(members)
        assert all(v["format"] == fmt and v["machine"] == machine and v["type"] == "relocatable" for v in members.values())
        from edgellm.targets.binfmt import tar_members

        devc = tar_members(art.lib_path)["devc.o"]
        assert (b"kernel void" in devc) if p.target["kind"] == "metal" else (b"__kernel" in devc)


@NEEDS_NVCC
def test_sm86_and_sm89_build_what_sm80_builds():
    """cuda-sm86 / cuda-sm89 differ from cuda-sm80 only in the arch nvcc builds (the matrix builds sm80 and sm90): no
    kernel choice of the registry changes between sm_80 and sm_89 (dp4a from sm_61, cp.async from sm_80, PDL and
    wgmma from sm_90), checked on every decode and prefill shape class, and this nvcc builds both arches."""
    from edgellm.compile import cuda
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant import get_scheme

    shapes = [(1, 576, 1536), (1, 4096, 6144), (1, 14336, 4096), (1, 4096, 128256), (None, 4096, 6144),
              (None, 96, 64), (1, 4096, 64)]
    rows = ("q4f16_1", "q4f16_0", "q4f16_2", "q8f16_1", "q4f32_1", "q4f32_3")

    def picks(preset: str, **options) -> list[str]:
        reg = KernelRegistry(resolve(preset).tvm(), KernelOptions(**options))
        assert not reg.pdl
        return [reg._pick_linear(r, i, o, get_scheme(s), get_scheme(s).act_dtype, False)[0]
                for r, i, o in shapes for s in rows]

    base = picks("cuda-sm80")
    assert "int4_gemv_dp4a" in base and "int4_gemm_mma_half2" in base  # what sm_80 adds over older GPUs
    for preset in SAME_AS_SM80:
        assert PRESETS[preset].target["arch"] in cuda.nvcc_archs()
        assert picks(preset) == base and picks(preset, cuda_gemv="fp16x2") == picks("cuda-sm80", cuda_gemv="fp16x2")


# Pi builds run under qemu, the fp16 fallback, the remote entry point: tests/test_targets_emulated.py (a file of its own,
# so the suite's two workers can share this one's five minutes)
