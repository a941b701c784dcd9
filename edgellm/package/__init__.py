"""package_artifact: a compiled Android/iOS artifact -> what an app build links (DESIGN §1, `edgellm package`).

Android (arm64-v8a): a Gradle library module holding the model's static library (the artifact's objects in an
indexed `ar` archive), a C header, a CMakeLists.txt that links the archive whole, and the weights bundle as assets.
iOS: an xcframework-style folder (Info.plist, an ios-arm64 slice and, given a simulator artifact, an
ios-arm64-simulator slice) and a `.bundle` folder with the weights and config. Metal/OpenCL kernels travel as
source inside the archive's devc.o (TVM compiles them on the device at load time).

Every output is deterministic (same artifact, same bytes) and listed with its sha256 in edgellm-package.json;
the bundle's own bundle-manifest.json lets the app verify the weights it ships.
"""

from __future__ import annotations

import hashlib
import json
import plistlib
import re
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ..artifact import Artifact, ArtifactError, atomic_dir, check_output, confined, file_table
from ..targets.binfmt import object_format
from .objects import has_static_init, read_archive, write_archive
from .templates import android_files, header, ios_modulemap

PACKAGE_MANIFEST = "edgellm-package.json"
BUNDLE_MANIFEST = "bundle-manifest.json"
APP_CONFIG = "edgellm-config.json"
PACKAGE_FORMAT = 1


class PackageError(ValueError):
    """An artifact that cannot be packaged for the platform asked; the message names the value and the fix."""


@dataclass(frozen=True)
class PlatformSpec:
    name: str
    object_format: str  # elf | macho
    machine: str  # aarch64 | arm64
    triple_marker: str  # what the artifact's host triple must contain
    device: str  # TVM device the kernels run on
    dl_device_type: int  # DLPack device type the app passes to the VM
    kernel_marker: bytes  # device-kernel source that must be inside devc.o
    preset: str  # the compile preset that makes a suitable artifact


PLATFORMS: dict[str, PlatformSpec] = {
    "android": PlatformSpec("android", "elf", "aarch64", "android", "opencl", 4, b"__kernel", "android"),
    "ios": PlatformSpec("ios", "macho", "arm64", "apple-ios", "metal", 8, b"kernel void", "ios"),
}
SIMULATOR_TARGET = ('{"kind": "metal", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768, '
                    '"thread_warp_size": 32, "max_function_args": 31, '
                    '"host": {"kind": "llvm", "mtriple": "arm64-apple-ios14.0.0-simulator", "mcpu": "apple-a14"}}')


@dataclass
class PackageArgs:
    artifact: Path
    platform: str  # android | ios
    output: Path
    name: str = "edgellm_model"  # C identifier: lib<name>.a, <name>.h, asset/bundle folder
    simulator_artifact: Path | None = None  # ios only: an artifact built for arm64-apple-ios*-simulator
    overwrite: bool = False

    def __post_init__(self):
        self.artifact, self.output = Path(self.artifact), Path(self.output)
        if self.simulator_artifact is not None:
            self.simulator_artifact = Path(self.simulator_artifact)
        if self.platform not in PLATFORMS:
            raise PackageError(f"--platform {self.platform!r} is not supported; use one of {', '.join(PLATFORMS)}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", self.name):
            raise PackageError(f"--name {self.name!r} must be a C identifier (letters, digits, _; not starting with a "
                               "digit), e.g. --name qwen_chat")
        if self.simulator_artifact is not None and self.platform != "ios":
            raise PackageError("--simulator-artifact is for --platform ios only; drop it for android")

    def display(self) -> str:
        return "\n".join(f"  {k:<18} {v}" for k, v in asdict(self).items())


@dataclass
class PackageResult:
    output: Path
    platform: str
    library: Path  # the device static library
    slices: list[str]
    bundle: Path
    header: Path
    prefix: str
    files: int
    bytes: int

    def summary(self) -> str:
        return (f"packaged {self.platform} ({', '.join(self.slices)}) into {self.output}: {self.files} files, "
                f"{self.bytes / 2**20:.1f} MiB; library {self.library.relative_to(self.output)}, header "
                f"{self.header.relative_to(self.output)}, bundle {self.bundle.relative_to(self.output)}, "
                f"system-lib prefix {self.prefix}")


def _needs(spec: PlatformSpec) -> str:
    return (f"--platform {spec.name} needs an artifact compiled with `--target {spec.preset}` (host code for "
            f"{'aarch64-linux-android' if spec.name == 'android' else 'arm64-apple-ios'}, {spec.device} kernels, "
            f"exported as object files): `edgellm compile MODEL --target {spec.preset} -o DIR`")


def check_artifact(art: Artifact, spec: PlatformSpec, what: str = "artifact") -> dict[str, bytes]:
    """The artifact's object files after checking target, export format, arch, system-lib prefix and kernels."""
    t = art.manifest.get("target", {})
    triple = t.get("host_triple") or ""
    desc = f"{what} {art.root} was compiled for target {t.get('preset')!r} ({t.get('kind')}, host {triple or '-'})"
    if spec.triple_marker not in triple or t.get("export") != "tar":
        raise PackageError(f"{desc}; {_needs(spec)}")
    prefix = art.manifest.get("system_lib_prefix")
    if not prefix:
        raise PackageError(f"{desc} but without a system-lib prefix (compiled by an older edgellm, so apps cannot "
                           f"register it statically); recompile it: `edgellm compile MODEL --target {spec.preset} -o DIR`")
    with tarfile.open(art.lib_path) as tf:
        objs = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    if set(objs) != {"lib0.o", "devc.o"}:
        raise PackageError(f"{art.lib_path} holds {sorted(objs)}, expected lib0.o and devc.o; recompile the artifact")
    for name, data in objs.items():
        f = object_format(data)
        if (f["format"], f["machine"], f["type"]) != (spec.object_format, spec.machine, "relocatable"):
            raise PackageError(f"{art.lib_path}:{name} is {f['format']} {f['machine']} {f['type']}, --platform "
                               f"{spec.name} needs {spec.object_format} {spec.machine} relocatable; {_needs(spec)}")
        if not has_static_init(data):
            raise PackageError(f"{art.lib_path}:{name} has no static constructor, so it would not register the model "
                               f"as a system library; recompile with this edgellm (`--target {spec.preset}`)")
    if spec.kernel_marker not in objs["devc.o"]:
        raise PackageError(f"{art.lib_path}:devc.o carries no {spec.device} kernel source; {_needs(spec)}")
    return objs


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def app_config(art: Artifact, spec: PlatformSpec, name: str) -> dict:
    """What the app reads at start: the model, how to find it in the binary, the runtime limits, the files."""
    m = art.manifest
    return {
        "format": "edgellm-app-config", "version": 1, "name": name,
        "model": {"arch": m["model"]["arch"], "config": m["model"]["config"], "params": m["model"]["params"]},
        "quant": m["quant"], "runtime": m["runtime"], "functions": m["functions"],
        "system_lib_prefix": m["system_lib_prefix"],
        "device": {"kind": spec.device, "dl_device_type": spec.dl_device_type},
        "tokenizer": m["tokenizer"], "params_index": "params/index.json", "weight_bytes": m["weight_bytes"],
        "artifact": {"manifest_sha256": art.digest, "target": m["target"]["preset"],
                     "tvm_version": m["tvm_version"], "edgellm_version": m["edgellm_version"]},
    }


def write_bundle(art: Artifact, spec: PlatformSpec, name: str, dest: Path) -> None:
    """Weights, tokenizer and app config, with bundle-manifest.json listing each file's sha256."""
    dest.mkdir(parents=True)
    for rel in sorted(art.manifest["files"]):
        if rel.startswith(("params/", "tokenizer/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(art.path(rel), dest / rel)  # rel: relative, normalized, confined (Artifact.open)
    _write_json(dest / APP_CONFIG, app_config(art, spec, name))
    _write_json(dest / BUNDLE_MANIFEST, {"format": "edgellm-bundle", "version": 1, "files": file_table(dest, BUNDLE_MANIFEST)})


def verify_bundle(bundle: Path) -> None:
    """Raise PackageError naming the first file whose size or sha256 differs from bundle-manifest.json."""
    listed = json.loads((bundle / BUNDLE_MANIFEST).read_text())["files"]
    actual = file_table(bundle, BUNDLE_MANIFEST)
    for rel in sorted(set(listed) | set(actual)):
        if listed.get(rel) != actual.get(rel):
            state = "missing" if rel not in actual else "unlisted" if rel not in listed else "changed"
            raise PackageError(f"bundle file {rel} in {bundle} is {state} against {BUNDLE_MANIFEST}; repackage it")


def _archive(objs: dict[str, bytes], out: Path, fmt: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for n in ("lib0.o", "devc.o"):  # fixed order: same input, same bytes
            (Path(tmp) / n).write_bytes(objs[n])
            paths.append(Path(tmp) / n)
        write_archive(out, paths, fmt)
    members, _ = read_archive(out)
    if members != objs:
        raise RuntimeError(f"{out}: archive members differ from the artifact's objects after writing")


def _package_android(art, spec, args, objs, tmp) -> tuple[Path, list[str], Path, Path]:
    prefix = art.manifest["system_lib_prefix"]
    lib = tmp / "src/main/cpp/libs/arm64-v8a" / f"lib{args.name}.a"
    _archive(objs, lib, spec.object_format)
    hdr = tmp / "src/main/cpp/include" / f"{args.name}.h"
    hdr.parent.mkdir(parents=True)
    hdr.write_text(header(args.name, prefix, art.manifest, spec))
    for rel, text in android_files(args.name).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    bundle = tmp / "src/main/assets" / args.name
    write_bundle(art, spec, args.name, bundle)
    return lib, ["android-arm64-v8a"], bundle, hdr


def _xcframework_plist(name: str, slices: list[str]) -> bytes:
    libs = []
    for ident in slices:
        d = {"HeadersPath": "Headers", "LibraryIdentifier": ident, "LibraryPath": f"lib{name}.a",
             "SupportedArchitectures": ["arm64"], "SupportedPlatform": "ios"}
        if ident.endswith("-simulator"):
            d["SupportedPlatformVariant"] = "simulator"
        libs.append(d)
    return plistlib.dumps({"AvailableLibraries": libs, "CFBundlePackageType": "XFWK",
                           "XCFrameworkFormatVersion": "1.0"}, sort_keys=True)


def _package_ios(art, spec, args, objs, tmp) -> tuple[Path, list[str], Path, Path]:
    prefix = art.manifest["system_lib_prefix"]
    slices = {"ios-arm64": objs}
    if args.simulator_artifact is not None:
        sim = Artifact.open(args.simulator_artifact)
        sim_objs = check_artifact(sim, spec, "simulator artifact")
        platforms = {object_format(d).get("platform") for d in sim_objs.values()}
        if platforms != {"ios-simulator"}:
            raise PackageError(f"simulator artifact {sim.root} has objects for platform {sorted(map(str, platforms))}, "
                               "not ios-simulator; compile it with the simulator triple: "
                               f"`edgellm compile MODEL --target '{SIMULATOR_TARGET}' -o DIR`")
        if sim.manifest["system_lib_prefix"] != prefix:
            raise PackageError(f"simulator artifact {sim.root} is another model or scheme (system-lib prefix "
                               f"{sim.manifest['system_lib_prefix']}, device artifact {prefix}); compile both from "
                               "the same MODEL and --quant")
        slices["ios-arm64-simulator"] = sim_objs
    xcf = tmp / f"{args.name}.xcframework"
    for ident, o in slices.items():
        _archive(o, xcf / ident / f"lib{args.name}.a", spec.object_format)
        hdrs = xcf / ident / "Headers"
        hdrs.mkdir()
        (hdrs / f"{args.name}.h").write_text(header(args.name, prefix, art.manifest, spec))
        (hdrs / "module.modulemap").write_text(ios_modulemap(args.name))
    (xcf / "Info.plist").write_bytes(_xcframework_plist(args.name, list(slices)))
    bundle = tmp / f"{args.name}.bundle"
    write_bundle(art, spec, args.name, bundle)
    return xcf / "ios-arm64" / f"lib{args.name}.a", list(slices), bundle, xcf / "ios-arm64/Headers" / f"{args.name}.h"


def package_artifact(args: PackageArgs) -> PackageResult:
    """Package `args.artifact` for `args.platform`; the output folder appears only when complete."""
    spec = PLATFORMS[args.platform]
    protect = [p for p in (args.artifact, args.simulator_artifact) if p]
    check_output(args.output, args.overwrite, "package", protect, _is_package)  # before any work
    art = Artifact.open(args.artifact)  # verifies every file's sha256 first
    objs = check_artifact(art, spec)
    build = _package_android if spec.name == "android" else _package_ios
    with atomic_dir(args.output, args.overwrite, "package", protect, _is_package) as tmp:
        lib, slices, bundle, hdr = build(art, spec, args, objs, tmp)
        verify_bundle(bundle)
        m = art.manifest
        _write_json(tmp / PACKAGE_MANIFEST, {
            "format": "edgellm-package", "version": PACKAGE_FORMAT, "platform": spec.name, "name": args.name,
            "slices": slices, "system_lib_prefix": m["system_lib_prefix"],
            "library": lib.relative_to(tmp).as_posix(), "header": hdr.relative_to(tmp).as_posix(),
            "bundle": bundle.relative_to(tmp).as_posix(),
            "artifact": {"manifest_sha256": art.digest, "target": m["target"]["preset"],
                         "model": m["model"]["arch"], "scheme": m["quant"]["scheme"]},
            "files": file_table(tmp, PACKAGE_MANIFEST),
        })
        rels = (lib.relative_to(tmp), bundle.relative_to(tmp), hdr.relative_to(tmp))
    out = args.output
    files = [p for p in out.rglob("*") if p.is_file()]
    return PackageResult(out, spec.name, out / rels[0], slices, out / rels[1], out / rels[2],
                         art.manifest["system_lib_prefix"], len(files), sum(p.stat().st_size for p in files))


def _is_package(path: Path) -> bool:
    """True for a folder holding an edgellm-package.json of ours."""
    try:
        return json.loads((Path(path) / PACKAGE_MANIFEST).read_text()).get("format") == "edgellm-package"
    except (OSError, ValueError, AttributeError):
        return False


def verify_package(root: Path) -> dict:
    """Check every file of a package against edgellm-package.json and its bundle; return the package manifest."""
    root = Path(root)
    pm = json.loads((root / PACKAGE_MANIFEST).read_text())
    actual = file_table(root, PACKAGE_MANIFEST)
    if actual != pm["files"]:
        bad = sorted(k for k in set(actual) | set(pm["files"]) if actual.get(k) != pm["files"].get(k))
        raise PackageError(f"package {root}: files differ from {PACKAGE_MANIFEST}: {bad[:5]}; repackage it")
    try:
        bundle = confined(root, pm["bundle"], "bundle")
    except ArtifactError as exc:
        raise PackageError(f"package {root}: {exc}") from None
    verify_bundle(bundle)
    return pm


def digest(root: Path) -> str:
    """One sha256 over every file's relative path and bytes (for determinism checks)."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


__all__ = ["PLATFORMS", "PackageArgs", "PackageError", "PackageResult", "package_artifact", "check_artifact",
           "verify_bundle", "verify_package", "app_config", "digest"]
