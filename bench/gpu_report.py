"""Turn a bench/gpu_run.py result (gpu.json) into docs/benchmarks/h100.json (one record per model shape, engine and
test), h100-detail.json (checks, kernels, decode and prefill profiles) and h100.png.

Usage: python bench/gpu_report.py GPU_JSON [--out docs/benchmarks] [--name h100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEEP = ("model", "test", "engine", "scheme", "avg_ts", "stddev_ts", "samples_ts", "weight_bytes", "read_bytes_per_token",
        "achieved_gbs",
        "bandwidth_fraction", "copy_bandwidth_gbs", "device")
TESTS = ("pp128", "pp512", "tg128")


def records(run: dict) -> list[dict]:
    return [{k: r.get(k) for k in KEEP} for r in run["bench"]]


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
                ax.bar(x, r["avg_ts"], width, color=f"C{t_i}", alpha=1.0 if eng == "edgellm" else 0.35,
                       hatch=None if eng == "edgellm" else "//", edgecolor="black", linewidth=0.4)
                ax.text(x, r["avg_ts"] * 1.08, f"{r['avg_ts']:.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["avg_ts"] for r in recs) * 8)
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("tokens / s (log)")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=f"C{i}", label=t) for i, t in enumerate(TESTS)]
              + [Patch(facecolor="white", edgecolor="black", label="edgellm q4f16_1"),
                 Patch(facecolor="white", edgecolor="black", hatch="//", label="transformers fp16")],
              fontsize=7, ncol=5, loc="upper center")
    ax.set_title(title, fontsize=9)
    ax = axes[1]
    for e_i, eng in enumerate(engines):
        vals = [next((r["bandwidth_fraction"] or 0 for r in recs if r["model"] == m and r["test"] == "tg128"
                      and r["engine"] == eng), 0) * 100 for m in models]
        xs = [i + (e_i - (len(engines) - 1) / 2) * 0.35 for i in range(len(models))]
        ax.bar(xs, vals, 0.35, color="C3", alpha=1.0 if eng == "edgellm" else 0.35, hatch=None if eng == "edgellm" else "//",
               edgecolor="black", linewidth=0.4)
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
    args = ap.parse_args()
    run = json.loads(args.gpu_json.read_text())
    recs = records(run)
    (args.out / f"{args.name}.json").write_text(json.dumps(recs, indent=1) + "\n")
    detail = {k: run.get(k) for k in ("device", "copy_bw", "checks", "kernels", "profiles", "prefill_profiles", "load_seconds",
                                        "errors")}
    (args.out / f"{args.name}-detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    bw = run.get("copy_bw", 0) / 1e9
    plot(recs, args.out / f"{args.name}.png", f"{run.get('device')}, copy bandwidth {bw:.0f} GB/s, same run")
    for r in recs:
        frac = r.get("bandwidth_fraction")
        print(f"| {r['model']} | {r['engine']} | {r['test']} | {r['avg_ts']:.1f} ± {r['stddev_ts']:.1f} | "
              + (f"{r['achieved_gbs']:.0f} | {frac:.1%} |" if frac else "- | - |"))


if __name__ == "__main__":
    main()
