"""Turn a bench/gpu_run.py result (gpu.json) into docs/benchmarks/h100.json (one record per model shape, engine and
test), h100-detail.json (checks, kernels, decode and prefill profiles) and h100.png.

Usage: python bench/gpu_report.py GPU_JSON [--out docs/benchmarks] [--name h100] [--llamacpp DIR]

--llamacpp-records JSON instead carries llama.cpp's records over from an earlier report of this script (for a run
without the llama.cpp build, which costs ~4 minutes of device time); each gets `"lease": "earlier"` and keeps the
copy bandwidth of its own run.

--llamacpp DIR folds in llama.cpp's llama-bench JSON (llamacpp-<shape>.json, written by the kit of
../shared/gpu-anchor/run.sh in the same device call): one record per shape and test, engine "llama.cpp", scheme
Q4_0, with bandwidth_fraction computed like edgellm's (weight bytes read per decode token x tok/s / the copy
bandwidth measured in the same run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = ("model", "test", "engine", "scheme", "avg_ts", "stddev_ts", "samples_ts", "weight_bytes", "read_bytes_per_token",
        "achieved_gbs",
        "bandwidth_fraction", "copy_bandwidth_gbs", "device")
TESTS = ("pp128", "pp512", "tg128")
HATCH = {"edgellm": None, "edgellm --head q4": "xx", "llama.cpp": ".."}  # every other engine (transformers): "//"


def _legend(engine: str, recs: list[dict]) -> str:
    scheme = next(r["scheme"] or "" for r in recs if r["engine"] == engine)
    earlier = any(r.get("lease") == "earlier" for r in recs if r["engine"] == engine)
    return (engine if scheme in engine else f"{engine} {scheme}") + (" (earlier lease)" if earlier else "")


def _style(engine: str) -> dict:
    return {"alpha": 1.0 if engine == "edgellm" else 0.45, "hatch": HATCH.get(engine, "//")}


def records(run: dict) -> list[dict]:
    return [{k: r.get(k) for k in KEEP} for r in run["bench"]]


# llama-bench model files of the kit: every 2-D weight Q4_0 (18 bytes per 32 weights), norms F32
ANCHOR_SHAPES = {  # shape: (hidden, ffn, layers, heads, kv_heads, vocab, tied, label)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, True, "SmolLM2-135M shape"),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256, True, "Llama-3.2-1B shape"),
    "llama-3-8b": (4096, 14336, 32, 32, 8, 128256, False, "Llama-3-8B shape"),
}


def q4_0_read_bytes_per_token(shape: str) -> int:
    """Weight bytes one decode token reads from a pure-Q4_0 file: every layer matrix and the head (the tied
    embedding is the head; an untied embedding is read one row per token, counted as nothing)."""
    h, f, n, heads, kv, vocab, _tied, _ = ANCHOR_SHAPES[shape]
    hd = h // heads
    per_layer = h * (heads * hd) + 2 * h * (kv * hd) + (heads * hd) * h + 3 * h * f
    return (n * per_layer + vocab * h) * 18 // 32


def llamacpp_records(folder: Path, copy_bw: float, device: str | None) -> list[dict]:
    out = []
    for shape, spec in ANCHOR_SHAPES.items():
        path = folder / f"llamacpp-{shape}.json"
        if not path.exists():
            continue
        for r in json.loads(path.read_text()):
            test = f"pp{r['n_prompt']}" if r.get("n_prompt") else f"tg{r['n_gen']}"
            rec = {k: None for k in KEEP}
            rec.update(model=spec[7], test=test, engine="llama.cpp", scheme="Q4_0 (pure)", avg_ts=r["avg_ts"],
                       stddev_ts=r["stddev_ts"], samples_ts=r.get("samples_ts"), weight_bytes=r.get("model_size"),
                       device=device, copy_bandwidth_gbs=copy_bw / 1e9 if copy_bw else None)
            if test.startswith("tg") and copy_bw:
                rb = q4_0_read_bytes_per_token(shape)
                rec.update(read_bytes_per_token=rb, achieved_gbs=rb * r["avg_ts"] / 1e9,
                           bandwidth_fraction=rb * r["avg_ts"] / copy_bw)
            out.append(rec)
    return out


def plot(recs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in recs))
    engines = list(dict.fromkeys(r["engine"] for r in recs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    width = 0.8 / (len(TESTS) * len(engines))
    for m_i, model in enumerate(models):
        for t_i, test in enumerate(TESTS):
            for e_i, eng in enumerate(engines):
                r = next((r for r in recs if r["model"] == model and r["test"] == test and r["engine"] == eng), None)
                if r is None:
                    continue
                x = m_i + (t_i * len(engines) + e_i) * width - 0.4 + width / 2
                ax.bar(x, r["avg_ts"], width, color=f"C{t_i}", **_style(eng), edgecolor="black", linewidth=0.4)
                ax.text(x, r["avg_ts"] * 1.08, f"{r['avg_ts']:.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["avg_ts"] for r in recs) * 8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("tokens / s (log)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=f"C{i}", label=t) for i, t in enumerate(TESTS)]
              + [Patch(facecolor="white", edgecolor="black", hatch=_style(e)["hatch"],
                       label=_legend(e, recs)) for e in engines],
              fontsize=7, ncol=5, loc="upper center")
    ax.set_title(title, fontsize=9)
    ax = axes[1]
    for e_i, eng in enumerate(engines):
        vals = [next((r["bandwidth_fraction"] or 0 for r in recs if r["model"] == m and r["test"] == "tg128"
                      and r["engine"] == eng), 0) * 100 for m in models]
        xs = [i + (e_i - (len(engines) - 1) / 2) * 0.8 / len(engines) for i in range(len(models))]
        ax.bar(xs, vals, 0.8 / len(engines), color="C3", **_style(eng), edgecolor="black", linewidth=0.4)
        for x, v in zip(xs, vals):
            ax.text(x, v + 1, f"{v:.0f}%", ha="center", fontsize=7)
    ax.axhline(75, color="gray", ls="--", lw=0.8)
    ax.set_xticks(range(len(models)), [m.replace(" shape", "") for m in models], fontsize=7)
    ax.set_ylabel("tg128: weight bytes x tok/s / copy bandwidth (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gpu_json", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks")
    ap.add_argument("--name", default="h100")
    ap.add_argument("--llamacpp", type=Path, help="folder of llama-bench JSON (llamacpp-<shape>.json) from the same run")
    ap.add_argument("--llamacpp-records", type=Path, help="an earlier report's JSON: carry its llama.cpp records over")
    args = ap.parse_args()
    run = json.loads(args.gpu_json.read_text())
    recs = records(run)
    if args.llamacpp_records:  # read before anything is written: it may be the file this run replaces
        recs += [{**r, "lease": "earlier"} for r in json.loads(args.llamacpp_records.read_text())
                 if r["engine"] == "llama.cpp"]
    if args.llamacpp:
        recs += llamacpp_records(args.llamacpp, run.get("copy_bw", 0), run.get("device"))
    (args.out / f"{args.name}.json").write_text(json.dumps(recs, indent=1) + "\n")
    detail = {k: run.get(k) for k in ("device", "copy_bw", "checks", "kernels", "profiles", "prefill_profiles", "load_seconds",
                                        "batched", "errors")}
    (args.out / f"{args.name}-detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    bw = run.get("copy_bw", 0) / 1e9
    title = f"{run.get('device')}, copy bandwidth {bw:.0f} GB/s, same run"
    plot(recs, args.out / f"{args.name}.png", title + (" (llama.cpp: earlier lease)" if args.llamacpp_records else ""))
    for r in recs:
        frac = r.get("bandwidth_fraction")
        print(f"| {r['model']} | {r['engine']} | {r['test']} | {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} | "
              + (f"{r['achieved_gbs']:.0f} | {frac:.1%} |" if frac else "- | - |"))
    for r in run.get("batched", []):  # gpu_run.bench_batched: aggregate tok/s with b sequences in flight
        print(f"| {r['model']} | batched x{r['sequences']} | {r['aggregate_ts']:.0f} tok/s aggregate | "
              f"{r['step_ms']:.2f} ms/step |")


if __name__ == "__main__":
    main()
