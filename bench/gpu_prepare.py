"""Prepare what a CUDA GPU machine needs to run edgellm artifacts, in under 64 MiB: `.device/`.

  .device/site/tvm       the TVM runtime only (no libtvm_compiler.so, no 3rdparty/include/src)
  .device/site/tvm_ffi   apache-tvm-ffi unpacked from the wheel for the GPU machine's Python (3.12 by default)
  .device/art/*          artifacts built here for the GPU's arch; big models travel without weight shards and
                         run with the runner's explicit random-weights mode
  .device/ckpt/*         tiny HF checkpoints for the transformers reference on the GPU

Usage: python bench/gpu_prepare.py [--arch sm_90] [--python 3.12]; then run bench/gpu_run.py there with
PYTHONPATH=.device/site:. (see docs/benchmarks/h100.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".device"
sys.path.insert(0, str(REPO / "tests"))


def copy_runtime_tvm(dst: Path) -> None:
    import tvm

    src = Path(tvm.__file__).parent
    shutil.copytree(src, dst / "tvm", ignore=shutil.ignore_patterns(
        "libtvm_compiler.so", "3rdparty", "include", "src", "__pycache__", "*.pyc"))


def fetch_tvm_ffi(dst: Path, python: str) -> None:
    import tvm_ffi

    version = tvm_ffi.__version__
    pyv = python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", "--abi", f"cp{pyv}",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", tmp, f"apache-tvm-ffi=={version}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("tvm_ffi/") and "/include/" not in name and "/src/" not in name:
                    z.extract(name, dst)


def build_artifacts(arch: str) -> None:
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    preset = f"cuda-{arch.replace('_', '')}"
    ckpt = make_checkpoint(OUT / "ckpt" / "llama", "llama")
    for scheme in ("q0f16", "q4f16_1", "q0f32"):
        compile_model(CompileArgs(model=str(ckpt), output=OUT / "art" / f"tiny-{scheme}", target=preset, quant=scheme,
                                  runtime=RuntimeOptions(256, 128, 16, 4)))
    smol = OUT / "art" / "smollm2-q4f16_1"
    compile_model(CompileArgs(model=None, output=smol, target=preset, quant="q4f16_1",
                              runtime=RuntimeOptions(1024, 512, 16, 4)))
    for shard in (smol / "params").glob("shard_*.bin"):  # weights stay behind; random-weights mode there
        shard.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--python", default="3.12")
    args = ap.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "site").mkdir(parents=True)
    copy_runtime_tvm(OUT / "site")
    fetch_tvm_ffi(OUT / "site", args.python)
    build_artifacts(args.arch)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {total / 2**20:.1f} MiB")
    if total > 60 * 2**20:
        raise SystemExit("over the 64 MiB a device call can carry; drop an artifact")


if __name__ == "__main__":
    main()
