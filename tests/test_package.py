"""edgellm package: Android/iOS static libraries, headers, bundles (docs/packaging.md)."""

from __future__ import annotations

import hashlib
import json
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgellm.artifact import Artifact, write_manifest
from edgellm.cli import cli
from edgellm.compile import CompileArgs, compile_model
from edgellm.config import RuntimeOptions
from edgellm.package import (
    PLATFORMS,
    SIMULATOR_TARGET,
    PackageArgs,
    PackageError,
    digest,
    package_artifact,
    verify_bundle,
    verify_package,
)
from edgellm.package.objects import has_static_init, read_archive, section_names
from edgellm.package.templates import header
from edgellm.targets import PRESETS, resolve
from edgellm.targets.binfmt import object_format


@pytest.fixture(scope="module")
def arts(tmp_path_factory, checkpoints, preset_build):
    """target name -> artifact compiled from the tiny Qwen2 in q4f16_1 (android, ios: the session's preset builds,
    tests/conftest.py preset_build; the ios simulator: built here on first use)."""
    root = tmp_path_factory.mktemp("pkg-art")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            if name != "ios-sim":
                assert PRESETS[name].default_quant == "q4f16_1"
                cache[name] = preset_build(name)
            else:
                out = root / name
                compile_model(CompileArgs(model=str(checkpoints["qwen2"]), output=out, target=SIMULATOR_TARGET,
                                          quant="q4f16_1", runtime=RuntimeOptions(128, 32)))
                cache[name] = out
        return cache[name]

    return get


@pytest.fixture(scope="module")
def packaged(arts, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg-out")
    cache: dict[str, Path] = {}

    def get(platform: str) -> Path:
        if platform not in cache:
            sim = arts("ios-sim") if platform == "ios" else None
            package_artifact(PackageArgs(arts(platform), platform, root / platform, simulator_artifact=sim))
            cache[platform] = root / platform
        return cache[platform]

    return get


def _prefix(art: Path) -> str:
    return Artifact.open(art).manifest["system_lib_prefix"]


def _slices(pkg: Path) -> dict[str, Path]:
    pm = json.loads((pkg / "edgellm-package.json").read_text())
    if pm["platform"] == "android":
        return {"android-arm64-v8a": pkg / pm["library"]}
    return {s: pkg / "edgellm_model.xcframework" / s / "libedgellm_model.a" for s in pm["slices"]}


def test_compile_records_system_lib_prefix(arts, compiled):
    prefix = _prefix(arts("android"))
    assert prefix.startswith("edgellm_qwen2_q4f16_1_") and prefix.endswith("_") and len(prefix) > 8
    assert _prefix(arts("ios")) == prefix == _prefix(arts("ios-sim"))  # same model + scheme -> same prefix
    assert Artifact.open(compiled("llama", "q4f32_1")).manifest["system_lib_prefix"] is None  # host: a .so


@pytest.mark.parametrize("platform,fmt,machine,platforms", [
    ("android", "elf", "aarch64", {"android-arm64-v8a": None}),
    ("ios", "macho", "arm64", {"ios-arm64": None, "ios-arm64-simulator": "ios-simulator"}),
])
def test_archive_members_are_objects_for_the_platform(packaged, platform, fmt, machine, platforms):
    slices = _slices(packaged(platform))
    assert set(slices) == set(platforms)
    for ident, lib in slices.items():
        assert lib.read_bytes().startswith(b"!<arch>\n")
        members, _ = read_archive(lib)
        assert sorted(members) == ["devc.o", "lib0.o"]
        for name, data in members.items():
            f = object_format(data)
            assert (f["format"], f["machine"], f["type"]) == (fmt, machine, "relocatable"), (ident, name, f)
            if fmt == "macho":
                assert f["platform"] == platforms[ident], (ident, name, f)


@pytest.mark.parametrize("platform", ["android", "ios"])
def test_system_lib_registration_present(packaged, arts, platform):
    prefix = _prefix(arts(platform))
    mangle = "_" if platform == "ios" else ""  # Mach-O C symbols carry a leading underscore
    for ident, lib in _slices(packaged(platform)).items():
        members, index = read_archive(lib)
        # the archive index lets the linker find both objects by the symbols the header declares
        assert f"{mangle}{prefix}__tvm_ffi__library_bin" in index, ident
        assert f"{mangle}{prefix}__tvm_ffi__library_ctx" in index, ident
        assert any(s.startswith(f"{mangle}__tvm_ffi_{prefix}") for s in index)  # host functions, prefixed
        for name, data in members.items():
            # a static constructor calling TVMFFIEnvModRegisterSystemLibSymbol registers each object
            assert has_static_init(data), (ident, name, section_names(data))
            assert b"TVMFFIEnvModRegisterSystemLibSymbol" in data
        kernel = PLATFORMS[platform].kernel_marker  # OpenCL / Metal source embedded in devc.o
        assert kernel in members["devc.o"]


def test_nm_sees_the_registration_symbols(packaged, arts):
    nm = shutil.which("llvm-nm") or shutil.which("nm")
    if nm is None:
        pytest.skip("no nm here")
    prefix = _prefix(arts("android"))
    out = subprocess.run([nm, str(_slices(packaged("android"))["android-arm64-v8a"])], capture_output=True,
                         text=True).stdout
    assert f"R {prefix}__tvm_ffi__library_bin" in out
    assert "U TVMFFIEnvModRegisterSystemLibSymbol" in out


@pytest.mark.parametrize("platform", ["android", "ios"])
def test_bundle_manifest_hashes_verify(packaged, arts, platform, tmp_path):
    pkg = packaged(platform)
    pm = verify_package(pkg)
    bundle = pkg / pm["bundle"]
    listed = json.loads((bundle / "bundle-manifest.json").read_text())["files"]
    assert {"params/index.json", "params/shard_000.bin", "tokenizer/tokenizer.json", "edgellm-config.json"} <= set(listed)
    for rel, meta in listed.items():
        data = (bundle / rel).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (meta["sha256"], meta["bytes"]), rel
    art = Artifact.open(arts(platform))
    for rel in ("params/shard_000.bin", "params/index.json", "tokenizer/tokenizer.json"):
        assert listed[rel]["sha256"] == art.manifest["files"][rel]["sha256"]  # the artifact's own bytes
    cfg = json.loads((bundle / "edgellm-config.json").read_text())
    assert cfg["system_lib_prefix"] == art.manifest["system_lib_prefix"]
    assert cfg["device"] == {"kind": PLATFORMS[platform].device, "dl_device_type": PLATFORMS[platform].dl_device_type}
    assert cfg["functions"] == art.manifest["functions"] and cfg["runtime"]["context_window"] == 128
    # a changed weight byte is caught, naming the file
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    shard = copy / "params" / "shard_000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="params/shard_000.bin"):
        verify_bundle(copy)


def test_layouts(packaged):
    a = packaged("android")
    for rel in ("build.gradle", "src/main/AndroidManifest.xml", "src/main/cpp/CMakeLists.txt",
                "src/main/cpp/include/edgellm_model.h", "src/main/cpp/libs/arm64-v8a/libedgellm_model.a",
                "src/main/assets/edgellm_model/edgellm-config.json"):
        assert (a / rel).is_file(), rel
    cmake = (a / "src/main/cpp/CMakeLists.txt").read_text()
    assert "-Wl,--whole-archive" in cmake and "libs/${ANDROID_ABI}/libedgellm_model.a" in cmake
    assert "noCompress" in (a / "build.gradle").read_text()
    i = packaged("ios")
    plist = plistlib.loads((i / "edgellm_model.xcframework/Info.plist").read_bytes())
    assert plist["CFBundlePackageType"] == "XFWK"
    libs = {d["LibraryIdentifier"]: d for d in plist["AvailableLibraries"]}
    assert set(libs) == {"ios-arm64", "ios-arm64-simulator"}
    assert libs["ios-arm64-simulator"]["SupportedPlatformVariant"] == "simulator"
    assert "SupportedPlatformVariant" not in libs["ios-arm64"]
    for ident, d in libs.items():
        root = i / "edgellm_model.xcframework" / ident
        assert (root / d["LibraryPath"]).is_file() and (root / d["HeadersPath"] / "edgellm_model.h").is_file()
        assert d["SupportedArchitectures"] == ["arm64"] and d["SupportedPlatform"] == "ios"
    assert (i / "edgellm_model.bundle/params/index.json").is_file()


@pytest.mark.parametrize("platform", ["android", "ios"])
def test_packaging_is_deterministic(arts, packaged, platform, tmp_path):
    first = packaged(platform)
    sim = arts("ios-sim") if platform == "ios" else None
    package_artifact(PackageArgs(arts(platform), platform, tmp_path / "again", simulator_artifact=sim))
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again").as_posix() for p in (tmp_path / "again").rglob("*")
                           if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    assert digest(first) == digest(tmp_path / "again")


def _cuda_manifest_copy(host_art: Path, dest: Path) -> Path:
    """A host artifact whose manifest says CUDA (sm_90, x86-64 host): what `--target cuda-sm90` writes there."""
    shutil.copytree(host_art, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["target"] = resolve("cuda-sm90").as_dict()
    write_manifest(dest, m)  # re-signed: this test is about the target check, not tampering
    return dest


def test_host_or_cuda_artifact_for_android_names_the_target_needed(compiled, tmp_path):
    host = compiled("llama", "q4f32_1")
    with pytest.raises(PackageError) as exc:
        package_artifact(PackageArgs(host, "android", tmp_path / "p"))
    msg = str(exc.value)
    assert "'host'" in msg and "--target android" in msg and "aarch64-linux-android" in msg
    cuda = _cuda_manifest_copy(host, tmp_path / "cuda")
    with pytest.raises(PackageError, match=r"'cuda-sm90' \(cuda.*--target android"):
        package_artifact(PackageArgs(cuda, "android", tmp_path / "p"))
    with pytest.raises(PackageError, match="--target ios"):
        package_artifact(PackageArgs(host, "ios", tmp_path / "p"))
    assert not (tmp_path / "p").exists()  # nothing half-written


def test_wrong_platform_and_bad_args(arts, tmp_path):
    with pytest.raises(PackageError, match=r"'android'.*--target ios"):
        package_artifact(PackageArgs(arts("android"), "ios", tmp_path / "p"))
    with pytest.raises(PackageError, match=r"'ios'.*--target android"):
        package_artifact(PackageArgs(arts("ios"), "android", tmp_path / "p"))
    with pytest.raises(PackageError, match="not ios-simulator"):  # a device artifact given as the simulator slice
        package_artifact(PackageArgs(arts("ios"), "ios", tmp_path / "p", simulator_artifact=arts("ios")))
    with pytest.raises(PackageError, match="--name '1bad-name'"):
        PackageArgs(arts("ios"), "ios", tmp_path / "p", name="1bad-name")
    with pytest.raises(PackageError, match="--platform 'wasm'"):
        PackageArgs(arts("ios"), "wasm", tmp_path / "p")
    with pytest.raises(PackageError, match="ios only"):
        PackageArgs(arts("android"), "android", tmp_path / "p", simulator_artifact=arts("ios"))


def test_cli_package(arts, compiled, tmp_path):
    runner = CliRunner()
    out = tmp_path / "pkg"
    r = runner.invoke(cli, ["package", str(arts("android")), "--platform", "android", "-o", str(out), "--name", "tiny",
                            "--json"])
    assert r.exit_code == 0, r.output + str(r.exception)
    res = json.loads(r.stdout)
    assert res["platform"] == "android" and res["slices"] == ["android-arm64-v8a"]
    assert Path(res["library"]) == out / "src/main/cpp/libs/arm64-v8a/libtiny.a" and Path(res["library"]).is_file()
    assert "#define TINY_SYSTEM_LIB_PREFIX" in Path(res["header"]).read_text()
    r = runner.invoke(cli, ["package", str(arts("android")), "--platform", "android", "-o", str(out)])
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = runner.invoke(cli, ["package", str(compiled("llama", "q4f32_1")), "--platform", "android",
                            "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "--target android" in r.stderr
    r = runner.invoke(cli, ["package", str(arts("android")), "--platform", "windows", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2


def test_android_header_links_the_archive_without_whole_archive(packaged, arts, tmp_path):
    """An aarch64 shared object that only calls <name>_force_link() keeps both objects and their constructors."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if cc is None:
        pytest.skip("aarch64-linux-gnu-gcc missing (scripts/test.sh installs it)")
    pkg = packaged("android")
    (tmp_path / "app.c").write_text('#include "edgellm_model.h"\nuintptr_t app_init(void) { return edgellm_model_force_link(); }\n')
    so = tmp_path / "libapp.so"
    subprocess.run([cc, "-shared", "-fPIC", "-Wall", "-Werror", f"-I{pkg / 'src/main/cpp/include'}",
                    str(tmp_path / "app.c"), str(pkg / "src/main/cpp/libs/arm64-v8a/libedgellm_model.a"), "-o", str(so)],
                   check=True, capture_output=True)
    data = so.read_bytes()
    assert f"{_prefix(arts('android'))}__tvm_ffi__library_bin".encode() in data
    assert b"__kernel" in data and ".init_array" in section_names(data)


def test_header_loader_runs_on_host(tmp_path):
    """The header's C++ loader (ffi.SystemLib(prefix) -> vm_load_executable -> vm_initialization) on an x86-64
    system lib built the same way as the Android/iOS ones, linked from an archive through <name>_force_link()."""
    gxx = shutil.which("g++")
    if gxx is None or shutil.which("gcc") is None or shutil.which("ar") is None:
        pytest.skip("needs gcc, g++ and ar")
    import tvm
    import tvm_ffi
    from tvm.script import relax as R

    from edgellm.compile.pipeline import build

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((4,), "float32"), y: R.Tensor((4,), "float32")):
            return R.add(x, y)

    prefix = "edgellm_hosttest_"
    target = tvm.target.Target("llvm")
    c = build(Mod, target, None, prefix)  # the build step compile_model runs for android/ios
    c.export_library(str(tmp_path / "m.tar"))
    subprocess.run(["tar", "-C", str(tmp_path), "-xf", str(tmp_path / "m.tar")], check=True)
    subprocess.run(["ar", "rcsD", str(tmp_path / "libhosttest.a"), *sorted(map(str, tmp_path.glob("*.o")))], check=True)
    manifest = {"runtime": {"context_window": 1, "prefill_chunk": 1, "page_size": 1, "max_batch": 1},
                "functions": ["main"], "model": {"arch": "add", "params": 0}, "quant": {"scheme": "none"},
                "target": {"preset": "host", "host_triple": "x86_64-linux-gnu"}, "tvm_version": tvm.__version__}
    (tmp_path / "hosttest.h").write_text(header("hosttest", prefix, manifest, PLATFORMS["android"]))
    (tmp_path / "main.cc").write_text(
        '#include "hosttest.h"\n#include <cstdio>\n'
        "int main() {\n  tvm::ffi::Module vm = hosttest::LoadVirtualMachine(1, 0);\n"
        '  std::printf("main=%d\\n", (int)vm->GetFunction("main").has_value());\n  return 0;\n}\n')
    ffi_dir, tvm_lib = Path(tvm_ffi.__file__).parent, Path(tvm.__file__).parent / "lib"
    subprocess.run([gxx, "-std=c++17", "-O0", "-DHOSTTEST_WITH_TVM_FFI", f"-I{tmp_path}", f"-I{ffi_dir / 'include'}",
                    str(tmp_path / "main.cc"), str(tmp_path / "libhosttest.a"), f"-L{ffi_dir / 'lib'}", f"-L{tvm_lib}",
                    "-ltvm_ffi", "-ltvm_runtime", f"-Wl,-rpath,{ffi_dir / 'lib'}:{tvm_lib}", "-o",
                    str(tmp_path / "main")], check=True, capture_output=True)
    r = subprocess.run([str(tmp_path / "main")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "main=1"
    # the header's Python recipe, in a fresh process: link through force_link only, dlopen, system_lib(prefix), run
    (tmp_path / "shim.c").write_text('#include "hosttest.h"\nuintptr_t shim(void) { return hosttest_force_link(); }\n')
    subprocess.run(["gcc", "-shared", "-fPIC", f"-I{tmp_path}", str(tmp_path / "shim.c"), str(tmp_path / "libhosttest.a"),
                    "-o", str(tmp_path / "libshim.so")], check=True, capture_output=True)
    script = (
        "import ctypes, numpy as np, tvm, tvm_ffi\n"
        f"ctypes.CDLL({str(tmp_path / 'libshim.so')!r}, mode=ctypes.RTLD_GLOBAL)\n"
        f"vm = tvm.runtime.vm.VirtualMachine(tvm_ffi.system_lib({prefix!r}), tvm.cpu())\n"
        "a = tvm.runtime.tensor(np.arange(4, dtype='float32'))\n"
        "print(vm['main'](a, a).numpy().tolist())\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[0.0, 2.0, 4.0, 6.0]"


def test_android_cmake_module_links_the_archive_whole(packaged, arts, tmp_path):
    """The generated CMakeLists.txt, used as the docs say (add_subdirectory + edgellm::NAME), keeps both objects
    with no reference from app code; a non-arm64 ABI stops at configure time with the fix."""
    cc, cmake = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("cmake")
    if cc is None or cmake is None:
        pytest.skip("needs aarch64-linux-gnu-gcc and cmake (scripts/test.sh installs both)")
    cpp = packaged("android") / "src/main/cpp"
    proj = tmp_path / "app"
    proj.mkdir()
    (proj / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(app C)\n"
        f'add_subdirectory("{cpp}" edgellm_model)\n'
        "add_library(app SHARED app.c)\ntarget_link_libraries(app PRIVATE edgellm::edgellm_model)\n")
    (proj / "app.c").write_text('#include "edgellm_model.h"\n'
                                "const char* app_prefix(void) { return EDGELLM_MODEL_SYSTEM_LIB_PREFIX; }\n")
    common = ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64", f"-DCMAKE_C_COMPILER={cc}"]
    subprocess.run([cmake, "-S", str(proj), "-B", str(tmp_path / "b"), "-DANDROID_ABI=arm64-v8a", *common],
                   check=True, capture_output=True)
    subprocess.run([cmake, "--build", str(tmp_path / "b")], check=True, capture_output=True)
    data = (tmp_path / "b" / "libapp.so").read_bytes()
    assert f"{_prefix(arts('android'))}__tvm_ffi__library_bin".encode() in data
    assert ".init_array" in section_names(data)
    r = subprocess.run([cmake, "-S", str(proj), "-B", str(tmp_path / "b32"), "-DANDROID_ABI=armeabi-v7a", *common],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "arm64-v8a only" in r.stderr
