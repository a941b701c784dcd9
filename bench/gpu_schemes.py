"""The GGUF-grid rows on CUDA (issue 14 items 2 and 6): kernels, tiny artifacts and SmolLM2 fidelity on one GPU.

  python bench/gpu_schemes.py prepare [--out .device-h1]     here (nvcc, full TVM)
  there: python3 -c "import tarfile; tarfile.open('.device-h1/bundle.tar.xz').extractall('/tmp/h1dev')"
         PYTHONPATH=/tmp/h1dev/site:/tmp/h1dev/gguf:. python3 bench/gpu_schemes.py run [--part-b .device-h1b]
                                                            -> $OUT/schemes.json
  (two device calls: the first carries .device-h1 and runs --steps kernels,tiny,1b; the second, on the still-warm
  machine, carries .device-h1b and runs --steps fidelity; docs/benchmarks/h200-schemes.md has both commands)

`prepare` writes two bundles (a device call carries 64 MiB; the SmolLM2 GGUF alone is 94 MiB, so it travels cut in
two, `cat` puts it back together there):
  OUT/site        runtime-only TVM + tvm_ffi for the GPU machine's Python (bench/gpu_prepare.new_bundle)
  OUT/gguf        the pure-python `gguf` package (transformers reads GGUFs with it; the GPU image lacks it)
  OUT/kernels.so  the decode GEMV and prefill GEMM each row gets from the registry, at Llama-3-8B shapes, for
                  q4f16_1 / q4f16_0 (Q4_0 grid) / q4f16_2 (Q4_1 grid); the 8-bit GEMV (q8f16_1) at the heads of
                  SmolLM2, Llama-3.2-1B and Llama-3-8B in a few configs, beside the generic GPU schedule it
                  replaces; bias / ragged-`out` correctness cases
  OUT/art/tiny-*  a tiny Llama written as GGUF (Q4_1 or Q4_0 layers, Q8_0 embedding), compiled for sm_90 with no
                  --quant (so in q4f16_2 / q4f16_0 with a q8f16_1 embedding)
  OUT/art/smol-*  the SmolLM2 GGUF compiled for sm_90 with shapes only (the default row, and --quant q4f16_1):
                  `run` packs the weights there from the GGUF (quant/convert.py, the same code as a compile)
  OUT/art/1b-*    Llama-3.2-1B shapes only, default (8-bit head) and --head q4: decode speed with random weights
  OUT/smol.gguf.a and OUTb/smol.gguf.b   the SmolLM2 GGUF in two pieces
`run`, each step reporting and going on when another fails: the kernels against numpy float64 (a random subset of
rows; every output finite) and timed with weights from HBM (CUDA-graph replays over rotated copies, as
bench/gpu_gemv_tune.py); the tiny artifacts against the numpy model of their weights and against transformers
fp32 reading the same GGUF; SmolLM2 in both rows against transformers fp32 reading the GGUF there, on the built-in
verify text (edgellm.verify: top-1 agreement, mean KL, perplexity); Llama-3.2-1B tg128 with the 8-bit and the
4-bit head.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from gpu_gemv_tune import time_rotated  # noqa: E402  (bench/ is on the path: the one timing loop)

ROWS = ("q4f16_1", "q4f16_0", "q4f16_2")
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}
GEMM_SHAPES = ("qkv", "gate_up", "down")
HEADS = {"smol_head": (576, 49152), "1b_head": (2048, 128256), "8b_head": (4096, 128256)}
Q8_CONFIGS = [(4, 4, 1, 1), (4, 2, 2, 1), (8, 4, 1, 2)]
CHECKS = {"bias": (4096, 1000, True), "short": (576, 77, True)}
ROTATE_BYTES = 320e6
GEMM_ROWS = 512


def q8_name(w, r, u, k):
    return f"q8w{w}r{r}u{u}k{k}"


# ---- prepare (here) ---------------------------------------------------------------------------------------------
def prepare(out: Path, part_b: Path, arch: str) -> None:
    import gguf
    from gpu_prepare import check_bundle_size, new_bundle, shape_folder

    import gpu_prepare
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.loaders import default_model_path

    t0 = time.time()
    new_bundle(out)
    shutil.copytree(Path(gguf.__file__).parent, out / "gguf" / "gguf",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    import importlib.metadata

    dist = Path(importlib.metadata.distribution("gguf")._path)  # transformers reads gguf's version from it
    shutil.copytree(dist, out / "gguf" / dist.name)
    build_kernels(out, arch)
    preset = f"cuda-{arch.replace('_', '')}"
    for layer, path in tiny_ggufs(out).items():
        compile_model(CompileArgs(model=str(path), output=out / "art" / f"tiny-{layer}", target=preset,
                                  runtime=RuntimeOptions(256, 128, 16, 4)))
    smol = default_model_path()
    for tag, quant in (("default", None), ("q4f16_1", "q4f16_1")):
        compile_model(CompileArgs(model=str(smol), output=out / "art" / f"smol-{tag}", target=preset, quant=quant,
                                  runtime=RuntimeOptions(1024, 256, 16, 1), shapes_only=True))
    write_recipe(smol, out / "art" / "smol-recipe.json")
    gpu_prepare.OUT = out
    folder = shape_folder("llama-3.2-1b")
    for tag, head in (("q8head", None), ("q4head", "q4")):
        compile_model(CompileArgs(model=str(folder), output=out / "art" / f"1b-{tag}", target=preset,
                                  runtime=RuntimeOptions(1024, 512, 16, 1), shapes_only=True, head=head))
    # everything but the GGUF as one tar.xz (the TVM runtime and the fatbins shrink 3-4x), then the GGUF in two
    # pieces: what fits beside it here, the rest in part_b
    import tarfile

    t1 = time.time()
    with tarfile.open(out / "bundle.tar.xz", "w:xz", preset=6) as tar:
        for p in sorted(out.iterdir()):
            if p.name != "bundle.tar.xz":
                tar.add(p, arcname=p.name)
    for p in list(out.iterdir()):
        if p.name != "bundle.tar.xz":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    used = (out / "bundle.tar.xz").stat().st_size
    print(f"bundle.tar.xz {used / 2**20:.1f} MiB in {time.time() - t1:.0f} s")
    room = int(58 * 2**20) - used
    data = smol.read_bytes()
    if len(data) - room > 58 * 2**20:
        raise SystemExit(f"the GGUF ({len(data) / 2**20:.1f} MiB) does not fit in two bundles beside "
                         f"{used / 2**20:.1f} MiB of the rest")
    (out / "smol.gguf.a").write_bytes(data[:room])
    shutil.rmtree(part_b, ignore_errors=True)
    part_b.mkdir(parents=True)
    (part_b / "smol.gguf.b").write_bytes(data[room:])
    (out / "smol.gguf.json").write_text(json.dumps({"name": smol.name, "bytes": len(data)}))
    check_bundle_size(out, 59)
    check_bundle_size(part_b, 59)
    print(f"prepared in {time.time() - t0:.0f} s")


def tiny_ggufs(out: Path) -> dict[str, Path]:
    import gguf
    from gguf_writer import write_gguf
    from tiny_models import make_checkpoint

    ckpt = make_checkpoint(out / "ckpt" / "llama", "llama")
    paths = {}
    for layer in ("Q4_1", "Q4_0"):
        def encode(name, arr, layer=layer):
            if arr.ndim != 2:
                return None
            t = gguf.GGMLQuantizationType["Q8_0" if "embed_tokens" in name else layer]
            return gguf.quants.quantize(arr, t), t
        paths[layer] = write_gguf(ckpt, out / "ckpt" / f"tiny-{layer}.gguf", encode=encode)
    return paths


def write_recipe(gguf_path: Path, dst: Path) -> None:
    """The source map the device needs to pack the weights from the GGUF (models/ needs the TVM compiler)."""
    from edgellm.loaders import open_model
    from edgellm.models import get_architecture

    src = open_model(gguf_path)
    _, source_map = get_architecture(src.config)
    smap, unused = source_map(src.config)
    dst.write_text(json.dumps({"smap": smap, "unused": unused}))


def build_kernels(out: Path, arch: str) -> None:
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import KernelRegistry, cuda_gemv
    from edgellm.kernels.schedule_gpu import schedule_gpu_linear
    from edgellm.kernels.te_linear import linear
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    target = resolve(f"cuda-{arch.replace('_', '')}").tvm()
    reg = KernelRegistry(target)
    funcs = {}
    for row in ROWS:
        s = get_scheme(row)
        for shape, (k, n) in SHAPES.items():
            funcs[f"gemv_{row}_{shape}"] = reg.linear(1, k, n, s, "float16", False)
            if shape in GEMM_SHAPES:
                funcs[f"gemm_{row}_{shape}"] = reg.linear(None, k, n, s, "float16", False)
        for label, (k, n, bias) in CHECKS.items():
            funcs[f"gemv_{row}_{label}"] = reg.linear(1, k, n, s, "float16", bias)
            funcs[f"gemm_{row}_{label}"] = reg.linear(None, k, n, s, "float16", bias)
    q8 = get_scheme("q8f16_1")
    for shape, (k, n) in HEADS.items():
        funcs[f"gemv_q8f16_1_{shape}"] = reg.linear(1, k, n, q8, "float16", False)
        funcs[f"generic_q8f16_1_{shape}"] = schedule_gpu_linear(linear(1, k, n, q8, "float16", False), target, True)
        for cfg in Q8_CONFIGS:
            funcs[f"{q8_name(*cfg)}_{shape}"] = cuda_gemv.int8_gemv_h2(k, n, False, *cfg)
    funcs["gemv_q8f16_1_bias"] = reg.linear(1, 4096, 1000, q8, "float16", True)
    print("kernels:", json.dumps(reg.manifest_entry()["chosen"]))
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    t0 = time.time()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(mod, target=target).export_library(str(out / "kernels.so"))
    print(f"{len(funcs)} kernels in {time.time() - t0:.0f} s")


# ---- run (on the GPU machine) -----------------------------------------------------------------------------------
res: dict = {"kernels": [], "checks": {}, "fidelity": [], "bench": [], "errors": []}


def step(label, fn, *args):
    t0 = time.time()
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 (report and go on: device time is scarce)
        res["errors"].append(f"{label}: " + traceback.format_exc()[-3000:])
        print(f"{label} FAILED\n{traceback.format_exc()[-3000:]}", flush=True)
    print(f"-- {label}: {time.time() - t0:.1f} s", flush=True)


def random_weights(rng, scheme, k, n):
    """Packed random weights in `scheme`'s format: uniform stored values, fp16 scales (and minimums)."""
    per = scheme.elems_per_word
    qw = rng.integers(0, 2**32, size=(n, k // per), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
    if scheme.zero_point:
        qm = (-qs.astype(np.float32) * (6 + 4 * rng.random((n, k // 32)))).astype(np.float16)
        return [qw, qs, qm]
    return [qw, qs]


def run_kernels(dev_dir: Path) -> None:
    from edgellm import _tvm
    from edgellm.quant import reference as qref
    from edgellm.quant.schemes import get_scheme

    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(dev_dir / "kernels.so")
    dev = _tvm.device("cuda", 0)
    rng = np.random.default_rng(int(time.time()))
    bw = res["copy_gbs"] * 1e9

    def one(name, scheme, k, n, rows, bias, timed, label):
        rec = {"kernel": name, "scheme": scheme.name, "in": k, "out": n, "rows": rows, "label": label}
        try:
            w = random_weights(rng, scheme, k, n)
            x = rng.standard_normal((rows, k)).astype(np.float16)
            if rows == 1:  # outliers as in real down-projection inputs
                x[0, rng.choice(k, 8, replace=False)] = rng.choice([-2000.0, 2000.0], 8)
            b = rng.standard_normal(n).astype(np.float16)
            sub = np.sort(rng.choice(n, min(n, 2048), replace=False))
            wd = qref.dequantize(w[0][sub], w[1][sub], k, scheme, w[2][sub] if scheme.zero_point else None)
            ref = x.astype(np.float64) @ wd.astype(np.float64).T + (b[sub].astype(np.float64) if bias else 0)
            f = mod[name]
            wt = [_tvm.tensor(a, dev) for a in w]
            out = _tvm.tensor(np.full((rows, n), np.nan, np.float16), dev)
            f(_tvm.tensor(x, dev), *wt, *([_tvm.tensor(b, dev)] if bias else []), out)
            got = out.numpy().astype(np.float64)
            rec["finite"] = bool(np.isfinite(got).all())
            rec["rel_err"] = float(np.linalg.norm(got[:, sub] - ref) / np.linalg.norm(ref))
            if timed:
                nbytes = sum(a.nbytes for a in w) + x.nbytes + 2 * rows * n
                count = max(2, int(np.ceil(ROTATE_BYTES / nbytes)))
                copies = [wt] + [[_tvm.tensor(a, dev) for a in w] for _ in range(count - 1)]
                t = time_rotated(f, _tvm.tensor(x, dev), copies, out)[0]
                rec.update(us=t * 1e6, gbs=nbytes / t / 1e9, copy_frac=nbytes / t / bw, bytes=nbytes)
                if rows > 1:
                    rec["tflops"] = 2 * rows * k * n / t / 1e12
                del copies
            print(f"{name:32s} rel_err {rec['rel_err']:.2e} finite {rec['finite']}"
                  + (f"  {rec['us']:8.2f} us {rec['gbs']:6.0f} GB/s ({100 * rec['copy_frac']:.0f}% of copy)"
                     if timed else ""), flush=True)
        except Exception as exc:  # noqa: BLE001
            rec["error"] = f"{type(exc).__name__}: {exc}"
            res["errors"].append(f"{name}: {rec['error']}")
            print(f"{name} FAILED {rec['error']}", flush=True)
        res["kernels"].append(rec)

    for row in ROWS:
        s = get_scheme(row)
        for shape, (k, n) in SHAPES.items():
            one(f"gemv_{row}_{shape}", s, k, n, 1, False, True, shape)
        for shape in GEMM_SHAPES:
            k, n = SHAPES[shape]
            one(f"gemm_{row}_{shape}", s, k, n, GEMM_ROWS, False, True, shape)
        for label, (k, n, bias) in CHECKS.items():
            one(f"gemv_{row}_{label}", s, k, n, 1, bias, False, label)
            one(f"gemm_{row}_{label}", s, k, n, 77, bias, False, label)
    q8 = get_scheme("q8f16_1")
    for shape, (k, n) in HEADS.items():
        one(f"gemv_q8f16_1_{shape}", q8, k, n, 1, False, True, shape)
        one(f"generic_q8f16_1_{shape}", q8, k, n, 1, False, True, shape)
        for cfg in Q8_CONFIGS:
            one(f"{q8_name(*cfg)}_{shape}", q8, k, n, 1, False, True, shape)
    one("gemv_q8f16_1_bias", q8, 4096, 1000, 1, True, False, "bias")


def run_tiny(dev_dir: Path) -> None:
    import gpu_run
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.device_runners.engine import Engine

    gpu_run.DEV = dev_dir
    gpu_run.results = res
    prompt = gpu_run.PROMPT
    for layer in ("Q4_1", "Q4_0"):
        art = f"tiny-{layer}"
        m = json.loads((dev_dir / "art" / art / "manifest.json").read_text())
        res["checks"][f"{art} kernels"] = m["kernels"]["chosen"]
        gpu_run.check_q4_vs_numpy(f"{art} ({m['quant']['scheme']}) vs its numpy model", art, prompt, 6)
        got = Engine(dev_dir / "art" / art).score(prompt)
        ck = dev_dir / "ckpt"
        with torch.no_grad():
            hf = AutoModelForCausalLM.from_pretrained(str(ck), gguf_file=f"tiny-{layer}.gguf",
                                                      dtype=torch.float32).cuda().eval()
            ref = hf(torch.tensor([prompt]).cuda()).logits[0].float().cpu().numpy()
        err = gpu_run.rel(got[:, : ref.shape[1]], ref)
        res["checks"][f"{art} vs transformers fp32 reading the same GGUF"] = {"rel_err": err, "tol": 2e-2,
                                                                             "ok": err < 2e-2}
        print(art, res["checks"][f"{art} vs transformers fp32 reading the same GGUF"], flush=True)


def fill_params(art: Path, gguf_path: Path, recipe: dict) -> None:
    """Pack a shapes-only artifact's weights from the GGUF, as compile_model does (quant.convert)."""
    from edgellm.artifact import file_table, write_manifest, write_params
    from edgellm.loaders import open_model
    from edgellm.quant.convert import convert
    from edgellm.quant.schemes import get_scheme

    man = json.loads((art / "manifest.json").read_text())
    index = json.loads((art / "params" / "index.json").read_text())["params"]
    params = {e["name"]: (tuple(e["shape"]), e["dtype"]) for e in index}
    src = open_model(gguf_path)
    smap = recipe["smap"]
    shapes = {n: (sum(src.tensors[s].shape[0] for s in srcs), src.tensors[srcs[0]].shape[1])
              for n, srcs in smap.items() if len(src.tensors[srcs[0]].shape) == 2}
    per = {n: get_scheme(s) for n, s in man["quant"]["per_tensor"].items()}
    packed = list(convert(src.tensors, smap, recipe["unused"], params, shapes, get_scheme(man["quant"]["scheme"]),
                          per))
    shutil.rmtree(art / "params")
    write_params(art, packed)
    man["shapes_only"] = False
    man["model"]["source"] = str(gguf_path)
    man["files"] = file_table(art)
    write_manifest(art, man)


PATHS = [p for p in os.environ.get("VERIFY_PATHS", "prefill,decode").split(",") if p]  # edgellm verify --path


def run_fidelity(dev_dir: Path, part_a: Path, part_b: Path) -> None:
    from edgellm.verify import TransformersScorer, VerifyArgs, verify

    meta = json.loads((part_a / "smol.gguf.json").read_text())
    gdir = Path("/tmp/h1-smol")
    gdir.mkdir(exist_ok=True)
    gguf_path = gdir / meta["name"]
    with open(gguf_path, "wb") as f:
        for part in (part_a / "smol.gguf.a", part_b / "smol.gguf.b"):
            f.write(part.read_bytes())
    if gguf_path.stat().st_size != meta["bytes"]:
        raise RuntimeError(f"reassembled GGUF is {gguf_path.stat().st_size} bytes, expected {meta['bytes']}")
    recipe = json.loads((dev_dir / "art" / "smol-recipe.json").read_text())
    t0 = time.time()
    ref = TransformersScorer(gguf_path, threads=16)
    print(f"transformers fp32 loaded in {time.time() - t0:.1f} s", flush=True)
    cache: dict = {}
    plain = ref.logits
    ref.logits = lambda ids: cache[tuple(ids)] if tuple(ids) in cache else cache.setdefault(tuple(ids), plain(ids))
    for tag in ("default", "q4f16_1"):
        art = dev_dir / "art" / f"smol-{tag}"
        t0 = time.time()
        fill_params(art, gguf_path, recipe)
        print(f"smol-{tag}: weights packed from the GGUF in {time.time() - t0:.1f} s", flush=True)
        man = json.loads((art / "manifest.json").read_text())
        for path in PATHS:  # the prefill path (GEMMs), then the decode path (GEMVs, the owned cache's attention)
            r = verify(VerifyArgs(artifact=art, path=path), loaded_reference=ref)
            rec = {"artifact": f"smol-{tag}", "scheme": r.scheme, "precision": man["quant"]["precision"],
                   "choice": man["quant"]["choice"], "kernels": man["kernels"]["chosen"], **r.to_json()}
            res["fidelity"].append(rec)
            print(r.table(), flush=True)
        bench_smol(art, tag)


def bench_smol(art: Path, tag: str) -> None:
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    eng = Engine(art)
    for r in run_bench(eng, 128, 128, reps=3, warmup=1, device_name="H200"):
        res["bench"].append({"model": f"SmolLM2-135M GGUF ({tag})", "test": r.test, "scheme": r.scheme,
                             "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts})
        print(res["bench"][-1], flush=True)


def bench_1b(dev_dir: Path) -> None:
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    for tag in ("q8head", "q4head"):
        eng = Engine(dev_dir / "art" / f"1b-{tag}", random_weights=0)
        prec = eng.art.manifest["quant"]["precision"]
        for r in run_bench(eng, 128, 128, reps=3, warmup=1, device_name="H200"):
            res["bench"].append({"model": f"Llama-3.2-1B shape ({tag})", "test": r.test, "scheme": r.scheme,
                                 "precision": prec, "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts})
            print(res["bench"][-1], flush=True)
        res["checks"][f"1b-{tag} kernels"] = eng.art.manifest["kernels"]["chosen"].get("linear_gemv")
        del eng


def run(dev_dir: Path, part_a: Path, part_b: Path | None, what: set[str]) -> int:
    import torch
    from gpu_run import copy_bandwidth

    res["device"] = torch.cuda.get_device_name(0)
    res["copy_gbs"] = copy_bandwidth() / 1e9
    print(f"{res['device']}: D2D copy {res['copy_gbs']:.0f} GB/s", flush=True)
    if "kernels" in what:
        step("kernels", run_kernels, dev_dir)
    if "tiny" in what:
        step("tiny", run_tiny, dev_dir)
    if "fidelity" in what and part_b is not None:
        step("fidelity", run_fidelity, dev_dir, part_a, part_b)
    if "1b" in what:
        step("1b", bench_1b, dev_dir)
    out = Path(os.environ.get("OUT", "."))
    (out / "schemes.json").write_text(json.dumps(res, indent=1, default=str))
    print("errors:", len(res["errors"]))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["prepare", "run"])
    ap.add_argument("--out", default=".device-h1", help="prepare: the bundle (part b goes to the same name + 'b')")
    ap.add_argument("--dev", default="/tmp/h1dev", help="run: where bundle.tar.xz was unpacked")
    ap.add_argument("--part-a", default=".device-h1", help="run: the folder holding smol.gguf.a (the bundle)")
    ap.add_argument("--part-b", default=None, help="run: the folder holding smol.gguf.b (fidelity step)")
    ap.add_argument("--steps", default="kernels,tiny,fidelity,1b")
    ap.add_argument("--arch", default="sm_90")
    args = ap.parse_args()
    if args.cmd == "prepare":
        out = (REPO / args.out).resolve()
        prepare(out, out.with_name(out.name + "b"), args.arch)
        return 0
    dev = (REPO / args.dev).resolve()
    sys.path.insert(0, str(dev / "gguf"))
    return run(dev, (REPO / args.part_a).resolve(), (REPO / args.part_b).resolve() if args.part_b else None,
               set(args.steps.split(",")))


if __name__ == "__main__":
    raise SystemExit(main())
