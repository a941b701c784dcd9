"""Artifact layout (DESIGN §3): manifest.json, lib/, params/ shards + index, tokenizer/.

An artifact is written into a temporary sibling directory and renamed into place only when complete, so a failed
compile never leaves a partial artifact. Loading verifies every file's sha256 against the manifest first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
SHARD_BYTES = 64 << 20
MANIFEST = "manifest.json"


class ArtifactError(RuntimeError):
    """An artifact that is missing, incomplete or tampered with; the message names the file."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `final`; rename it to `final` on success, delete it on any failure."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise ArtifactError(f"output {final} already exists; choose another -o or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
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


def file_table(root: Path, skip: str = MANIFEST) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} for every file under root except `skip` (the manifest that lists them)."""
    return {rel: {"sha256": sha256_of(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and (rel := p.relative_to(root).as_posix()) != skip}


@dataclass
class Artifact:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, verify: bool = True, skip_params: bool = False) -> Artifact:
        root = Path(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise ArtifactError(f"artifact {str(root)!r} does not exist (compile one with `edgellm compile -o DIR`)")
        if not mpath.exists():
            raise ArtifactError(f"{root} has no {MANIFEST}: not an edgellm artifact, or an incomplete one")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{mpath}: format_version {manifest.get('format_version')!r}, this edgellm reads {FORMAT_VERSION}; "
                "recompile the model"
            )
        art = cls(root, manifest)
        if verify:
            art.verify(skip_params=skip_params)
        return art

    def verify(self, skip_params: bool = False) -> None:
        """Check every listed file's size and sha256; raise naming the first file that differs.
        skip_params leaves out the weight shards (random-weights benchmarking of models too big to ship)."""
        for rel, meta in self.manifest["files"].items():
            if skip_params and rel.startswith("params/shard_"):
                continue
            p = self.root / rel
            if not p.exists():
                raise ArtifactError(f"artifact file {rel} is missing from {self.root}")
            if p.stat().st_size != meta["bytes"]:
                raise ArtifactError(f"artifact file {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}: truncated or replaced; recompile")
            if sha256_of(p) != meta["sha256"]:
                raise ArtifactError(f"artifact file {rel} fails its sha256 check (tampered or corrupted); refusing to run it")

    @property
    def lib_path(self) -> Path:
        return self.root / self.manifest["lib"]

    def param_index(self) -> list[dict]:
        return json.loads((self.root / "params" / "index.json").read_text())["params"]

    def iter_params(self) -> Iterator[tuple[dict, np.ndarray]]:
        """(index entry, array) in parameter order, read with one memory map per shard."""
        maps: dict[int, np.memmap] = {}

        def piece(p):
            if p["shard"] not in maps:
                maps[p["shard"]] = np.memmap(self.root / "params" / f"shard_{p['shard']:03d}.bin", dtype=np.uint8, mode="r")
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
