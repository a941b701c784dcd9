"""Artifact layout (DESIGN §3): manifest.json, lib/, params/ shards + index, tokenizer/.

An artifact is written into a temporary sibling directory and renamed into place only when complete, so a failed
compile never leaves a partial artifact. Loading verifies every file's sha256 against the manifest first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

FORMAT_VERSION = 2  # 2: manifest.json.sha256 binds the manifest; every opened file is listed and confined
SHARD_BYTES = 64 << 20
MANIFEST = "manifest.json"
DIGEST = "manifest.json.sha256"  # `sha256sum -c` format; its hash is the artifact's root digest
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARAM_DTYPES = {"float32", "float16", "bfloat16", "uint32", "int32", "int8", "uint8"}


class ArtifactError(RuntimeError):
    """An artifact that is missing, incomplete or tampered with; the message names the file."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def is_artifact(path: Path) -> bool:
    """True when `path` is a folder holding a manifest.json written by edgellm (any format version)."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "edgellm_version" in m and "format_version" in m and "files" in m


def check_output(final: Path, overwrite: bool, kind: str = "artifact", protect: Iterable[Path] = (),
                 ours=is_artifact) -> None:
    """Refuse, before any work, an output folder we must not write: an existing one without `overwrite`, and with
    it anything that is not one of ours (`ours(path)`), the current directory or one of its parents, or a folder
    holding (or inside) one of the `protect` paths (the model being read)."""
    final = Path(final)
    if not final.exists() and not final.is_symlink():
        return
    if not overwrite:
        raise ArtifactError(f"output {final} already exists; choose another output folder or pass --overwrite "
                            "(overwrite=True from Python)")
    real = final.resolve()
    if final.is_symlink() or not final.is_dir():
        raise ArtifactError(f"--overwrite refused: output {final} is {'a symlink' if final.is_symlink() else 'not a folder'}"
                            f"; only an existing edgellm {kind} folder may be replaced")
    cwd = Path.cwd().resolve()
    if cwd == real or real in cwd.parents:
        raise ArtifactError(f"--overwrite refused: output {final} is the current directory or one of its parents; "
                            "choose a new output folder")
    for p in protect:
        p = Path(p).resolve()
        if p == real or real in p.parents or p in real.parents:
            raise ArtifactError(f"--overwrite refused: output {final} holds or is inside the model being read ({p}); "
                                "choose another output folder")
    if not ours(final):
        raise ArtifactError(f"--overwrite refused: {final} is not an edgellm {kind} (no {kind} manifest of ours in it); "
                            "it may hold your files, so remove it yourself or choose another output folder")


@contextlib.contextmanager
def _cleanup_on_sigterm() -> Iterator[None]:
    """SIGTERM raises SystemExit inside the block (main thread only), so `finally` clean-ups run as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False, kind: str = "artifact", protect: Iterable[Path] = (),
               ours=is_artifact) -> Iterator[Path]:
    """Yield a temp dir next to `final`; rename it to `final` on success, delete it on any failure (exceptions,
    Ctrl-C, SIGTERM). With `overwrite`, only a folder `ours()` accepts is replaced (see check_output)."""
    final = Path(final)
    check_output(final, overwrite, kind, protect, ours)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _cleanup_on_sigterm():
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an artifact gets the user's usual mode
            yield tmp
            old = None
            if final.exists():
                check_output(final, overwrite, kind, protect, ours)  # it may have changed while we worked
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.replace(final, old / "x")
            try:
                os.replace(tmp, final)
            except BaseException:
                if old is not None:
                    os.replace(old / "x", final)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def write_params(root: Path, named: Iterable[tuple[str, np.ndarray]], shard_bytes: int = SHARD_BYTES) -> list[dict]:
    """Raw little-endian tensors packed into params/shard_NNN.bin files of at most `shard_bytes` each.

    A tensor starts a new shard when it would not fit in the current one; a tensor larger than a whole shard is
    split across consecutive shards and its index entry lists the `pieces` (shard, offset, nbytes) in order.
    """
    pdir = root / "params"
    pdir.mkdir(parents=True, exist_ok=True)
    index: list[dict] = []
    state = {"shard": -1, "offset": 0, "file": None}

    def new_shard():
        if state["file"] is not None:
            state["file"].close()
        state["shard"] += 1
        state["offset"] = 0
        state["file"] = open(pdir / f"shard_{state['shard']:03d}.bin", "wb")

    try:
        for name, arr in named:
            data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
            raw = memoryview(data.reshape(-1).view(np.uint8))
            if state["file"] is None or (state["offset"] and state["offset"] + len(raw) > shard_bytes):
                new_shard()
            pieces, pos = [], 0
            while pos < len(raw) or not pieces:
                if state["offset"] >= shard_bytes:
                    new_shard()
                n = min(len(raw) - pos, shard_bytes - state["offset"])
                state["file"].write(raw[pos : pos + n])
                pieces.append({"shard": state["shard"], "offset": state["offset"], "nbytes": n})
                state["offset"] += n
                pos += n
            entry = {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), **pieces[0], "nbytes": len(raw)}
            if len(pieces) > 1:
                entry["pieces"] = pieces
            index.append(entry)
    finally:
        if state["file"] is not None:
            state["file"].close()
    (pdir / "index.json").write_text(json.dumps({"params": index}, indent=1))
    return index


def file_table(root: Path, skip: str | Iterable[str] = (MANIFEST, DIGEST)) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file under root except `skip` (the manifest and its digest)."""
    skip = {skip} if isinstance(skip, str) else set(skip)
    return {rel: {"sha256": sha256_of(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and (rel := p.relative_to(root).as_posix()) not in skip}


def write_manifest(root: Path, manifest: dict) -> str:
    """manifest.json plus manifest.json.sha256 (`sha256sum -c` format); returns the root digest."""
    data = json.dumps(manifest, indent=1).encode()
    (root / MANIFEST).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / DIGEST).write_text(f"{digest}  {MANIFEST}\n")
    return digest


def confined(root: Path, rel: object, what: str = "path") -> Path:
    """`root / rel` for a manifest path that is a relative, normalized POSIX path staying inside `root` once
    symlinks are resolved; anything else (absolute, `..`, `./`, backslashes, empty) raises ArtifactError."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ArtifactError(f"manifest {what} {rel!r} is not a relative path; the artifact is malformed or tampered")
    pp = PurePosixPath(rel)
    if pp.is_absolute() or pp.as_posix() != rel or any(part in ("..", ".", "") for part in pp.parts):
        raise ArtifactError(f"manifest {what} {rel!r} is not a normalized path inside the artifact (absolute or "
                            "with '..'); refusing a tampered artifact")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if base not in path.parents:
        raise ArtifactError(f"manifest {what} {rel!r} resolves outside the artifact ({path}), through a symlink; "
                            "refusing a tampered artifact")
    return path


def _check_file_table(files: object) -> dict[str, dict]:
    if not isinstance(files, dict) or not files:
        raise ArtifactError("manifest has no file table ('files'); the artifact is malformed: recompile")
    for rel, meta in files.items():
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])
                and isinstance(meta.get("bytes"), int) and not isinstance(meta["bytes"], bool) and meta["bytes"] >= 0):
            raise ArtifactError(f"manifest entry for {rel!r} needs a sha256 (64 hex digits) and a byte count; the "
                                "artifact is malformed or tampered: recompile")
    return files


def _field(d: object, key: str, kind: type | tuple, where: str, optional: bool = False):
    """d[key] of type `kind` (bool never passes for int), or ArtifactError naming the manifest field."""
    value = d.get(key) if isinstance(d, dict) else None
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ArtifactError(f"manifest field {where}{key} is {value!r}, not a {'/'.join(k.__name__ for k in kinds)}; "
                            "the artifact is malformed: recompile")
    return value


@dataclass(frozen=True)
class RuntimeShape:
    """The shapes fixed at compile time (manifest `runtime`)."""

    context_window: int
    prefill_chunk: int
    page_size: int
    max_batch: int


@dataclass(frozen=True)
class Manifest:
    """The typed view of manifest.json, read and checked in one place (`Manifest.read`); `raw` keeps the dict for
    fields only a few places need (model config, quant details, target features)."""

    raw: dict
    format_version: int
    edgellm_version: str
    tvm_version: str
    lib: str
    files: dict
    arch: str
    config: dict
    source: str
    source_sha256: str
    scheme: str
    preset: str
    target_kind: str  # TVM kind: llvm | cuda | metal | opencl | webgpu
    device: str  # runtime device: cpu | cuda | metal | opencl | webgpu
    host_triple: str | None
    export: str  # so | tar
    runtime: RuntimeShape
    add_bos_token: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: bool
    functions: tuple[str, ...]
    weight_bytes: int
    shapes_only: bool
    system_lib_prefix: str | None

    @classmethod
    def read(cls, m: dict) -> Manifest:
        model, target = _field(m, "model", dict, ""), _field(m, "target", dict, "")
        rt, tok = _field(m, "runtime", dict, ""), _field(m, "tokenizer", dict, "")
        shape = RuntimeShape(*(_field(rt, k, int, "runtime.") for k in ("context_window", "prefill_chunk",
                                                                          "page_size", "max_batch")))
        if min(shape.context_window, shape.prefill_chunk, shape.page_size, shape.max_batch) < 1:
            raise ArtifactError(f"manifest runtime {shape} has a non-positive size; the artifact is malformed: recompile")
        eos = _field(tok, "eos_token_ids", list, "tokenizer.")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in eos):
            raise ArtifactError(f"manifest field tokenizer.eos_token_ids is {eos!r}, not token ids; recompile")
        functions = _field(m, "functions", list, "")
        return cls(
            raw=m, format_version=_field(m, "format_version", int, ""),
            edgellm_version=_field(m, "edgellm_version", str, ""), tvm_version=_field(m, "tvm_version", str, ""),
            lib=_field(m, "lib", str, ""), files=_check_file_table(m.get("files")),
            arch=_field(model, "arch", str, "model."), config=_field(model, "config", dict, "model."),
            source=str(model.get("source", "")), source_sha256=str(model.get("source_sha256") or ""),
            scheme=_field(_field(m, "quant", dict, ""), "scheme", str, "quant."),
            preset=_field(target, "preset", str, "target."), target_kind=_field(target, "kind", str, "target."),
            device=_field(target, "device", str, "target."),
            host_triple=_field(target, "host_triple", str, "target.", optional=True),
            export=_field(target, "export", str, "target."), runtime=shape,
            add_bos_token=bool(tok.get("add_bos_token", False)),
            bos_token_id=_field(tok, "bos_token_id", int, "tokenizer.", optional=True),
            eos_token_ids=tuple(eos), chat_template=bool(tok.get("chat_template", False)),
            functions=tuple(str(f) for f in functions), weight_bytes=_field(m, "weight_bytes", int, ""),
            shapes_only=bool(m.get("shapes_only", False)),
            system_lib_prefix=_field(m, "system_lib_prefix", str, "", optional=True),
        )


@dataclass
class Artifact:
    """A compiled model folder. `open` checks, before anything is loaded: the manifest against its digest file,
    every path it names (relative, inside the artifact), and every listed file's size and sha256. Files are then
    opened only through `path()`, which accepts listed (so checked) files alone."""

    root: Path
    manifest: dict
    digest: str = ""  # sha256 of manifest.json: the root digest, which covers every file through the file table
    info: Manifest | None = None  # the typed view, set by open()

    @classmethod
    def open(cls, root: str | Path, verify: bool = True, skip_params: bool = False,
             expect_digest: str | None = None) -> Artifact:
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"artifact {str(root)!r} does not exist (compile one with `edgellm compile -o DIR`)")
        if not mpath.is_file():
            raise ArtifactError(f"{root} has no {MANIFEST}: not an edgellm artifact, or an incomplete one")
        confined(root, MANIFEST, "file")
        data = mpath.read_bytes()
        try:
            manifest = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{mpath} is not a JSON object; not an edgellm artifact")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{mpath}: format_version {manifest.get('format_version')!r}, this edgellm reads {FORMAT_VERSION}; "
                "recompile the model"
            )
        digest = hashlib.sha256(data).hexdigest()
        dpath = root / DIGEST
        try:
            recorded = confined(root, DIGEST, "file").read_text().split()[0] if dpath.is_file() else None
        except (OSError, IndexError, UnicodeDecodeError):
            recorded = None
        if recorded != digest:
            raise ArtifactError(f"{MANIFEST} of {root} does not match {DIGEST} (edited or replaced after compile); "
                                "refusing it: recompile the artifact")
        if expect_digest is not None:
            want = expect_digest.strip().lower().removeprefix("sha256:")
            if len(want) < 12 or not re.fullmatch(r"[0-9a-f]+", want) or not digest.startswith(want):
                raise ArtifactError(f"artifact {root} has root digest {digest}, not the expected {expect_digest}; "
                                    "it is another build or was altered")
        art = cls(root, manifest, digest, Manifest.read(manifest))
        art._check_layout()
        if verify:
            art.verify(skip_params=skip_params)
        return art

    def _check_layout(self) -> None:
        """Every path the manifest names is confined and listed, so nothing unchecked is ever opened."""
        files = _check_file_table(self.manifest.get("files"))
        for rel in files:
            confined(self.root, rel, "file")
        lib = self.manifest.get("lib")
        confined(self.root, lib, "lib")
        twins = [v["lib"] for v in self.lib_variants]
        for rel in twins:
            confined(self.root, rel, "lib")
        for rel in (lib, *twins, "params/index.json", "tokenizer/tokenizer.json"):
            if rel not in files:
                raise ArtifactError(f"{rel} is not in the manifest's file table, so it cannot be checked; refusing "
                                    "a tampered artifact")

    def verify(self, skip_params: bool = False) -> None:
        """Check every listed file's size and sha256; raise naming the first file that differs.
        skip_params leaves out the weight shards (random-weights benchmarking of models too big to ship)."""
        for rel, meta in self.manifest["files"].items():
            if skip_params and rel.startswith("params/shard_"):
                continue
            p = confined(self.root, rel, "file")
            if not p.is_file():
                raise ArtifactError(f"artifact file {rel} is missing from {self.root}")
            if p.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"artifact file {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}: truncated or replaced; recompile")
            if sha256_of(p) != meta["sha256"]:
                raise ArtifactError(f"artifact file {rel} fails its sha256 check (tampered or corrupted); refusing to run it")

    def path(self, rel: str) -> Path:
        """The confined path of a file the manifest lists (and `verify` checked); unlisted files are refused."""
        if rel not in self.manifest["files"]:
            raise ArtifactError(f"{rel} is not in the manifest's file table of {self.root}, so it was never checked; "
                                "refusing to open it")
        return confined(self.root, rel, "file")

    def listed(self, rel: str) -> Path | None:
        """path(rel) for an optional file: None when the manifest does not list it."""
        return self.path(rel) if rel in self.manifest["files"] else None

    @property
    def lib_path(self) -> Path:
        return self.path(self.manifest["lib"])

    @property
    def lib_variants(self) -> list[dict]:
        """Twin libraries of `lib` (--opt webgpu_subgroups=auto): [{lib, subgroup_lanes, tvm_target, kernels}],
        checked for shape here (their paths by _check_layout)."""
        out = self.manifest.get("lib_variants") or []
        if not isinstance(out, list) or not all(
                isinstance(v, dict) and isinstance(v.get("lib"), str) and isinstance(v.get("subgroup_lanes"), int)
                and not isinstance(v.get("subgroup_lanes"), bool) and v["subgroup_lanes"] > 0 for v in out):
            raise ArtifactError("manifest field lib_variants is malformed (each entry needs lib and a positive "
                                "subgroup_lanes); recompile the artifact")
        return out

    def lib_for_subgroups(self, lanes: int) -> tuple[str, int]:
        """(library, its subgroup lanes) to load on an adapter whose subgroups span `lanes` consecutive lanes: the
        widest twin that runs there, else `lib` (its own kernels' lanes, 0 when it has none)."""
        fits = [v for v in self.lib_variants if v["subgroup_lanes"] <= lanes]
        if fits:
            best = max(fits, key=lambda v: v["subgroup_lanes"])
            return best["lib"], best["subgroup_lanes"]
        return self.manifest["lib"], int((self.manifest.get("kernels") or {}).get("subgroup_lanes") or 0)

    def param_index(self) -> list[dict]:
        try:
            index = json.loads(self.path("params/index.json").read_text())["params"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"params/index.json of {self.root} is malformed ({exc}); recompile") from None
        for e in index:
            self._check_entry(e)
        return index

    def _check_entry(self, e: object) -> None:
        """One index entry: known dtype, sizes that agree, pieces that lie inside listed shards."""
        try:
            dt, shape = e["dtype"], [int(x) for x in e["shape"]]
            ok = dt in _PARAM_DTYPES and all(x >= 0 for x in shape) and \
                int(e["nbytes"]) == int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            if ok and e.get("shard") is not None:
                pieces = e.get("pieces") or [e]
                ok = sum(int(p["nbytes"]) for p in pieces) == int(e["nbytes"])
                for p in pieces:
                    meta = self.manifest["files"].get(f"params/shard_{int(p['shard']):03d}.bin")
                    ok = ok and meta is not None and int(p["offset"]) >= 0 and int(p["nbytes"]) >= 0 \
                        and int(p["offset"]) + int(p["nbytes"]) <= meta["bytes"]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            name = e.get("name") if isinstance(e, dict) else e
            raise ArtifactError(f"params/index.json entry {name!r} does not fit the listed shards (size, dtype or "
                                "a shard missing from the file table); refusing a tampered artifact")

    def iter_params(self) -> Iterator[tuple[dict, np.ndarray]]:
        """(index entry, array) in parameter order, read with one memory map per shard."""
        maps: dict[int, np.memmap] = {}

        def piece(p):
            if p["shard"] not in maps:
                maps[p["shard"]] = np.memmap(self.path(f"params/shard_{p['shard']:03d}.bin"), dtype=np.uint8, mode="r")
            return maps[p["shard"]][p["offset"] : p["offset"] + p["nbytes"]]

        for e in self.param_index():
            raw = np.concatenate([piece(p) for p in e["pieces"]]) if "pieces" in e else piece(e)
            yield e, raw.view(np.dtype(e["dtype"]).newbyteorder("<")).reshape(e["shape"])

    def random_params(self, seed: int = 0) -> Iterator[tuple[dict, np.ndarray]]:
        """Parameters with the index's shapes and dtypes but random values (benchmarks only, never the default):
        INT4 words hold random nibbles, scales are small, norms are one, so activations stay finite."""
        rng = np.random.default_rng(seed)
        for e in self.param_index():
            shape, dt = tuple(e["shape"]), np.dtype(e["dtype"])
            if dt == np.uint32:
                a = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
            elif e["name"].endswith("norm.weight"):
                a = np.ones(shape, dt)
            elif e["name"].endswith("q_scale"):
                a = (rng.random(shape) * 0.004 + 0.001).astype(dt)
            elif e["name"].endswith("q_min"):  # asymmetric grid: about -7.5 scales, so weights centre on zero
                a = (-(rng.random(shape) * 0.03 + 0.0075)).astype(dt)
            else:
                a = (rng.standard_normal(shape) * 0.02).astype(dt)
            yield e, a

    @property
    def weight_bytes(self) -> int:
        return sum(e["nbytes"] for e in self.param_index())
