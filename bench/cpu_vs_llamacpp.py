"""edgellm vs llama.cpp on the same GGUF, same machine, same thread count: pp128 and tg128, alternating reps.

llama.cpp comes from llama-cpp-python, built once into bench/.cache/llamacpp-venv (a bench-only dependency, never
a runtime one). The edgellm artifact (embedded SmolLM2, host target) is compiled once into bench/.cache/.
Prints a table with ratios, writes docs/benchmarks/cpu.json and docs/benchmarks/cpu.png, and with --kernels a
per-kernel decode breakdown (each linear shape timed alone).

    python bench/cpu_vs_llamacpp.py --threads 2 --reps 5 [--quant q4f32_2] [--kernels]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
VENV = CACHE / "llamacpp-venv"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n_p, n_g = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_p + n_g + 16, n_batch=n_p,
            verbose=False, seed=0)
toks = [(i * 7919) % 40000 + 100 for i in range(n_p)]
llm.reset(); llm.eval(toks[:8])           # warm-up
llm.reset(); t = time.perf_counter(); llm.eval(toks); pp = time.perf_counter() - t
llm.reset(); llm.eval([toks[0]]); t = time.perf_counter()
for i in range(n_g):
    llm.eval([toks[i % n_p]])
tg = time.perf_counter() - t
print("result:" + json.dumps({"pp": n_p / pp, "tg": n_g / tg}))
"""

EDGELLM_WORKER = r"""
import json, sys, time
import numpy as np
from edgellm.device_runners.engine import Engine
art, threads, n_p, n_g = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eng = Engine(art, threads=threads)
toks = [(i * 7919) % 40000 + 100 for i in range(n_p)]
with eng.sequence() as s:                  # warm-up
    s.prefill(toks[:8]); s.decode(toks[0])
with eng.sequence() as s:
    t = time.perf_counter(); s.prefill(toks); pp = time.perf_counter() - t
with eng.sequence() as s:
    s.prefill([toks[0]]); t = time.perf_counter()
    for i in range(n_g):
        s.decode(toks[i % n_p])
    tg = time.perf_counter() - t
print("result:" + json.dumps({"pp": n_p / pp, "tg": n_g / tg}))
"""


def ensure_llamacpp() -> Path:
    py = VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0
    if not ok:
        print(f"building {LLAMA_CPP_PYTHON} into {VENV} (once; several minutes on 2 cores)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON], check=True,
                       env={**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    return py


def ensure_artifact(quant: str, head: str | None = None) -> Path:
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    from edgellm.compile import _git_sha

    art = CACHE / (f"smollm2-host-{quant}" + (f"-head-{head}" if head else ""))
    manifest = art / "manifest.json"
    stale = not manifest.exists() or json.loads(manifest.read_text()).get("git_sha") != _git_sha()
    if stale:  # rebuilt whenever the code that built it changed
        compile_model(CompileArgs(model=None, output=art, quant=quant, runtime=RuntimeOptions(1024, 256),
                                  overwrite=True, head=head))
    return art


def run_worker(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    line = [x for x in out.stdout.splitlines() if x.startswith("result:")][-1]
    return json.loads(line[len("result:"):])


def kernel_breakdown(quant: str, threads: int) -> list[dict]:
    """Each SmolLM2 linear shape timed alone with the artifact's kernels and schedules (decode, one row)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import numpy as np
    import tvm

    from edgellm.kernels import KernelRegistry
    from edgellm.quant import SCHEMES
    from edgellm.quant import reference as ref
    from edgellm.targets import resolve

    target, dev, s = resolve("host").tvm(), tvm.cpu(), SCHEMES[quant]
    rows = []
    for name, in_f, out_f, count in [("qkv_proj", 576, 960, 30), ("o_proj", 576, 576, 30),
                                     ("gate_up_proj", 576, 3072, 30), ("down_proj", 1536, 576, 30),
                                     ("lm_head", 576, 49152, 1)]:
        f = KernelRegistry(target).linear(1, in_f, out_f, s, s.act_dtype, False)  # scheduled for the target
        fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)["main"]
        w = np.random.default_rng(0).standard_normal((out_f, in_f)).astype(np.float32)
        stored = list(ref.quantize(w, s)) if s.quantized else [w.astype(s.weight_dtype)]
        args = [tvm.runtime.tensor(a, dev) for a in [np.ones((1, in_f), s.act_dtype), *stored]]
        args.append(tvm.runtime.empty((1, out_f), s.act_dtype, dev))
        for _ in range(5):
            fn(*args)
        n, t = 200, time.perf_counter()
        for _ in range(n):
            fn(*args)
        dt = (time.perf_counter() - t) / n
        nbytes = sum(a.nbytes for a in stored)
        rows.append({"kernel": name, "in": in_f, "out": out_f, "calls_per_token": count, "us": dt * 1e6,
                     "gbs": nbytes / dt / 1e9, "ms_per_token": dt * count * 1e3})
    return rows


def read_bandwidth(threads: int, mbytes: int = 256) -> float:
    """GB/s of a parallel streaming read (XOR of every uint32 word) over `mbytes`, far beyond the caches: the
    ceiling for a decode step that must stream every weight once."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import numpy as np
    import tvm
    from tvm.script import tirx as T

    from edgellm.targets import resolve

    rows, width = mbytes * 2**20 // 4 // 1024, 1024

    @T.prim_func(private=True)
    def stream(a: T.Buffer((rows, width), "uint32"), out: T.Buffer((rows,), "uint32")):
        for r in T.parallel(rows):
            acc = T.alloc_buffer((16,), "uint32", scope="local")
            acc[T.ramp(0, 1, 16)] = T.Broadcast(T.uint32(0), 16)
            for c in range(width // 16):
                acc[T.ramp(0, 1, 16)] = acc[T.ramp(0, 1, 16)] ^ a[r, T.ramp(c * 16, 1, 16)]
            out[r] = acc[0] ^ acc[7]

    target = resolve("host").tvm()
    fn = tvm.compile(tvm.IRModule({"main": stream.with_attr("global_symbol", "main")}), target=target)["main"]
    dev = tvm.cpu()
    a = tvm.runtime.tensor(np.ones((rows, width), np.uint32), dev)
    o = tvm.runtime.empty((rows,), "uint32", dev)
    fn(a, o)
    times = []
    for _ in range(7):
        t = time.perf_counter()
        fn(a, o)
        times.append(time.perf_counter() - t)
    return rows * width * 4 / statistics.median(times) / 1e9


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tests = [r["test"] for r in summary]
    x = range(len(tests))
    ax.bar([i - 0.2 for i in x], [r["llama.cpp"] for r in summary], 0.4, label="llama.cpp")
    ax.bar([i + 0.2 for i in x], [r["edgellm"] for r in summary], 0.4, label="edgellm")
    ax.set_xticks(list(x), tests)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"SmolLM2-135M, {summary[0]['threads']} threads, same GGUF")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quant", default="q4f32_2", help="edgellm scheme (q4f32_2: the host preset's default)")
    ap.add_argument("--head", default=None, choices=["q4", "q8", "f16"],
                    help="embedding/head precision (default: source-faithful, 8-bit for this GGUF)")
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--kernels", action="store_true", help="also time each linear kernel alone")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    a = ap.parse_args()
    from edgellm.loaders import default_model_path

    gguf = default_model_path()
    py = ensure_llamacpp()
    art = ensure_artifact(a.quant, a.head)
    samples: dict[str, dict[str, list[float]]] = {"llama.cpp": {"pp": [], "tg": []}, "edgellm": {"pp": [], "tg": []}}
    for rep in range(a.reps):  # alternate, so drift in machine load hits both
        r = run_worker([str(py), "-c", LLAMA_WORKER, str(gguf), str(a.threads), str(a.p), str(a.n)])
        e = run_worker([sys.executable, "-c", EDGELLM_WORKER, str(art), str(a.threads), str(a.p), str(a.n)])
        for k in ("pp", "tg"):
            samples["llama.cpp"][k].append(r[k])
            samples["edgellm"][k].append(e[k])
        print(f"rep {rep}: llama.cpp pp {r['pp']:.1f} tg {r['tg']:.1f} | edgellm pp {e['pp']:.1f} tg {e['tg']:.1f}",
              file=sys.stderr)
    summary = []
    for k, n in (("pp", a.p), ("tg", a.n)):
        lc, ed = statistics.median(samples["llama.cpp"][k]), statistics.median(samples["edgellm"][k])
        summary.append({"test": f"{k}{n}", "llama.cpp": lc, "edgellm": ed, "ratio": ed / lc, "threads": a.threads,
                        "reps": a.reps, "quant": a.quant, "head": a.head or "source", "samples": {x: samples[x][k] for x in samples}})
    print(f"| test | llama.cpp tok/s | edgellm {a.quant} tok/s | edgellm / llama.cpp |")
    print("|---|---:|---:|---:|")
    for r in summary:
        print(f"| {r['test']} | {r['llama.cpp']:.1f} | {r['edgellm']:.1f} | {r['ratio']:.2f}x |")
    weight_bytes = sum(e["nbytes"] for e in json.loads((art / "params" / "index.json").read_text())["params"])
    bw = read_bandwidth(a.threads)
    tg = next(r for r in summary if r["test"].startswith("tg"))
    achieved = weight_bytes * tg["edgellm"] / 1e9
    print(f"\ndecode streams {weight_bytes / 1e6:.1f} MB of weights per token: {achieved:.1f} GB/s at "
          f"{tg['edgellm']:.1f} tok/s; parallel read bandwidth of this machine ({a.threads} threads): {bw:.1f} GB/s "
          f"({achieved / bw:.0%})")
    record = {"machine": _cpu_name(), "threads": a.threads, "gguf": gguf.name, "llama_cpp_python": LLAMA_CPP_PYTHON,
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "summary": summary,
              "weight_bytes": weight_bytes, "read_bandwidth_gbs": bw, "decode_weight_gbs": achieved}
    if a.kernels:
        record["kernels"] = kernel_breakdown(a.quant, a.threads)
        total = sum(k["ms_per_token"] for k in record["kernels"])
        print("\n| kernel | in x out | us/call | GB/s | ms/token |\n|---|---|---:|---:|---:|")
        for k in record["kernels"]:
            print(f"| {k['kernel']} | {k['in']}x{k['out']} | {k['us']:.0f} | {k['gbs']:.1f} | {k['ms_per_token']:.2f} |")
        print(f"| all linear kernels | | | | {total:.2f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cpu.json").write_text(json.dumps(record, indent=1))
    plot(summary, a.out / "cpu.png")
    return 0


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
