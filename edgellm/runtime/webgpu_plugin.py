"""The WebGPU runtime plugin: TVM's webgpu kernels (WGSL) run by wgpu-native on Vulkan, inside TVM's native runtime.

`load_plugin()` compiles edgellm/runtime/webgpu/*.cc with the system C++ compiler against the apache-tvm wheel's
headers and the `wgpu` package's wgpu-native library, once per (sources, compiler, TVM, wgpu) content hash, caches
the library under ~/.cache/edgellm/webgpu-plugin/, and loads it into the process (RTLD_GLOBAL). After that TVM
knows the device "webgpu" (`device_api.webgpu`) and loads modules built with `Target("webgpu", host="llvm")`
(`ffi.Module.load_from_bytes.webgpu`). See docs/vulkan.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("edgellm")

SOURCE_DIR = Path(__file__).parent / "webgpu"
LIB_NAME = "libedgellm_webgpu.so"
CXX_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall"]

_lock = threading.Lock()
_loaded: Path | None = None


class PluginError(RuntimeError):
    """One-line reason the plugin cannot be used; `reason` is "compiler", "wgpu", "build" or "vulkan"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgellm" / "webgpu-plugin"


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX")
    if cxx:
        cmd = shlex.split(cxx)
        if shutil.which(cmd[0]) is None:
            raise PluginError("compiler", f"CXX={cxx!r} is not an executable: install g++ or fix CXX")
        return cmd
    for name in ("c++", "g++", "clang++"):
        if shutil.which(name):
            return [name]
    raise PluginError("compiler", "no C++ compiler found (c++, g++, clang++): install g++ "
                                  "(Debian: apt-get install g++) or set CXX")


def _wgpu_resources() -> tuple[Path, Path, str]:
    """(header dir, wgpu-native library, wgpu version) from the installed `wgpu` package."""
    spec = importlib.util.find_spec("wgpu")
    if spec is None or spec.origin is None:
        raise PluginError("wgpu", "the Python package `wgpu` (wgpu-native) is missing: pip install 'edgellm[vulkan]'")
    res = Path(spec.origin).parent / "resources"
    libs = sorted(res.glob("libwgpu_native-release.*"))
    if not libs or not (res / "webgpu.h").exists() or not (res / "wgpu.h").exists():
        raise PluginError("wgpu", f"the `wgpu` package at {res.parent} has no wgpu-native library or headers: "
                                  "reinstall it (pip install --force-reinstall wgpu)")
    return res, libs[0], importlib.metadata.version("wgpu")


def _tvm_dirs() -> tuple[list[Path], list[Path], str]:
    from edgellm import _tvm  # imports tvm: its libraries must be loaded before the plugin that links them

    import tvm_ffi

    tvm_root = Path(_tvm.tvm.__file__).parent
    ffi_root = Path(tvm_ffi.__file__).parent
    return ([tvm_root / "include", ffi_root / "include"], [tvm_root / "lib", ffi_root / "lib"],
            _tvm.tvm_version())


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cc", ".h"))


def _compiler_id(cxx: list[str]) -> str:
    try:
        out = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else " ".join(cxx)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PluginError("compiler", f"C++ compiler {' '.join(cxx)} does not run: {e}") from None


def plugin_path() -> tuple[Path, list[str]]:
    """Where the library for these sources, this compiler, TVM and wgpu lives, and the command that builds it."""
    cxx = _compiler()
    res, wgpu_lib, wgpu_version = _wgpu_resources()
    includes, libdirs, tvm_version = _tvm_dirs()
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    for part in (_compiler_id(cxx), " ".join(CXX_FLAGS), tvm_version, wgpu_version, str(wgpu_lib)):
        h.update(part.encode() + b"\0")
    out = cache_root() / h.hexdigest()[:20] / LIB_NAME
    cmd = [*cxx, *CXX_FLAGS, "-o", "{out}", *[str(p) for p in _sources() if p.suffix == ".cc"],
           *[f"-I{d}" for d in (*includes, res)], *[f"-L{d}" for d in (*libdirs, res)],
           "-ltvm_runtime", "-ltvm_ffi", f"-l:{wgpu_lib.name}",
           *[f"-Wl,-rpath,{d}" for d in (*libdirs, res)]]
    return out, cmd


def cross_build(out: Path, cxx: str, wgpu_resources: Path, lib_dirs: list[Path], rpaths: list[str]) -> Path:
    """Build the plugin for another machine (e.g. aarch64-linux-gnu-g++ for a Pi 5): the wheel's headers (the same
    for every architecture), that machine's wgpu-native (`wgpu_resources`: the `wgpu` wheel's resources folder for
    it) and TVM runtime libraries (`lib_dirs`: its libtvm_runtime.so and libtvm_ffi.so), `rpaths` where they will
    live there. Load it there with EDGELLM_WEBGPU_PLUGIN=PATH. Raises PluginError (one line)."""
    if shutil.which(cxx) is None:
        raise PluginError("compiler", f"cross compiler {cxx!r} not found "
                                      "(Debian: apt-get install g++-aarch64-linux-gnu)")
    libs = sorted(Path(wgpu_resources).glob("libwgpu_native-release.*"))
    if not libs or not (Path(wgpu_resources) / "webgpu.h").exists():
        raise PluginError("wgpu", f"{wgpu_resources} holds no wgpu-native library and headers: unpack the `wgpu` "
                                  "wheel for the target machine there")
    includes, _, _ = _tvm_dirs()
    cmd = [cxx, *CXX_FLAGS, "-o", "{out}", *[str(p) for p in _sources() if p.suffix == ".cc"],
           *[f"-I{d}" for d in (*includes, wgpu_resources)], *[f"-L{d}" for d in (*lib_dirs, wgpu_resources)],
           "-ltvm_runtime", "-ltvm_ffi", f"-l:{libs[0].name}", *[f"-Wl,-rpath,{r}" for r in rpaths]]
    _build(Path(out), cmd)
    return Path(out)


def _build(out: Path, cmd: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    log_path = out.parent / "build.log"
    try:
        argv = [a.replace("{out}", tmp) for a in cmd]
        proc = subprocess.run(argv, capture_output=True, text=True)
        log_path.write_text(" ".join(shlex.quote(a) for a in argv) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:200])
            raise PluginError("build", f"building the WebGPU plugin failed ({argv[0]} exit {proc.returncode}): "
                                       f"{first.strip()}; full log: {log_path}")
        os.replace(tmp, out)  # atomic: a reader sees the whole library or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_plugin() -> Path:
    """Build (first use) and load the plugin; returns the library's path. Raises PluginError (one line)."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        prebuilt = os.environ.get("EDGELLM_WEBGPU_PLUGIN")  # a library built elsewhere (a board with no compiler)
        if prebuilt:
            out = Path(prebuilt)
            if not out.is_file():
                raise PluginError("build", f"EDGELLM_WEBGPU_PLUGIN={prebuilt} is not a file: build the plugin "
                                           "(bench/vulkan_aarch64.py cross-builds one) or unset the variable")
        else:
            out, cmd = plugin_path()
            if not out.exists():
                log.info("building the WebGPU runtime plugin into %s", out.parent)
                _build(out, cmd)
        ctypes.CDLL(str(out), mode=ctypes.RTLD_GLOBAL)
        _loaded = out
    if not adapters():
        if ctypes.util.find_library("vulkan") is None:
            raise PluginError("vulkan", "no Vulkan loader (libvulkan.so.1): install one and a driver "
                                        "(Debian: apt-get install libvulkan1 mesa-vulkan-drivers)")
        raise PluginError("vulkan", "wgpu-native found no Vulkan device: install a Vulkan driver "
                                    "(Debian: apt-get install mesa-vulkan-drivers) or check VK_ICD_FILENAMES")
    return out


def _plugin_func(name: str):
    """The loaded plugin's global function `edgellm.webgpu.<name>`."""
    if _loaded is None:
        raise PluginError("build", "the WebGPU plugin is not loaded: call load_plugin() first")
    from edgellm import _tvm

    return _tvm.get_global_func(f"edgellm.webgpu.{name}")


def adapters() -> list[dict]:
    """The Vulkan adapters the loaded plugin sees, device 0 first: name, driver, backend, features, limits."""
    return json.loads(str(_plugin_func("adapters")()))


def subgroup_lanes(index: int) -> int:
    """Lanes N (1..32) such that kernels of adapter `index` may reduce over runs of N consecutive lanes by subgroup
    xor shuffles: the plugin runs a probe once per device (opening it) and checks every lane's answer. 1 where the
    adapter has no subgroups."""
    return int(_plugin_func("subgroup_lanes")(index))
