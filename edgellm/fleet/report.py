"""`edgellm report`: bench records (JSON list or JSONL, local or from fleet devices) -> one llama-bench style table
over devices and artifacts (only the columns that vary; the rest on one line above it; a build line below) and a
grouped bar chart of pp and tg t/s per device and artifact."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import FleetError

NEEDED = ("test", "avg_ts", "stddev_ts", "model", "scheme", "target")


def load_records(paths) -> list[dict]:
    """Records from each file: a JSON list (bench --format json) or JSON lines (--format jsonl)."""
    out: list[dict] = []
    for p in paths:
        text = Path(p).read_text()
        try:
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        except ValueError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except ValueError as exc:
                raise FleetError(f"{p} is neither JSON nor JSON lines ({exc}); give the output of "
                                 "`edgellm bench --format json` or `--format jsonl`") from None
        for i, r in enumerate(rows):
            missing = [k for k in NEEDED if not isinstance(r, dict) or k not in r]
            if missing:
                raise FleetError(f"{p}: record {i} has no {', '.join(missing)}; not an edgellm bench record")
            out.append(r)
    if not out:
        raise FleetError("no records in " + ", ".join(map(str, paths)))
    return out


def device_label(r: dict) -> str:
    ident = r.get("identity") or {}
    name = ident.get("name") or r.get("device") or "?"
    return f"{name} (emulated {ident['emulated']})" if ident.get("emulated") else name


def _cells(r: dict) -> dict[str, str]:
    ident = r.get("identity") or {}
    return {
        "device": device_label(r),
        "machine": ident.get("machine") or "?",
        "cpu": f"{ident.get('cpu_model', r.get('device', '?'))} ({ident.get('physical_cores', '?')} cores)",
        "gpu": ", ".join(ident.get("gpus") or []) or "-",
        "model": r["model"], "scheme": r["scheme"],
        "params": f"{r.get('params', 0) / 1e6:.1f}M", "size": f"{r.get('weight_bytes', 0) / 2**20:.1f} MiB",
        "target": r["target"], "threads": str(r.get("threads", "?")),
        "artifact": (ident.get("artifact_digest") or "?")[:12],
    }


def format_report(records: list[dict]) -> str:
    cells = [_cells(r) for r in records]
    cols = list(cells[0])
    varying = [c for c in cols if len({x[c] for x in cells}) > 1]
    same = [c for c in cols if c not in varying]
    head = varying + ["test", "t/s"]
    lines = []
    if same:
        lines.append("All rows: " + "; ".join(f"{c} {cells[0][c]}" for c in same) + "\n")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---:" if c in ("params", "size", "threads", "t/s") else "---" for c in head) + "|")
    for r, c in zip(records, cells):
        emu = " (emulated)" if (r.get("identity") or {}).get("emulated") else ""
        lines.append("| " + " | ".join([*(c[k] for k in varying), r["test"],
                                         f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}{emu}"]) + " |")
    builds = sorted({(f"edgellm {(r.get('identity') or {}).get('edgellm_version', '?')}, TVM "
                      f"{(r.get('identity') or {}).get('tvm_version') or r.get('tvm_version', '?')}, git "
                      f"{(r.get('git_sha') or 'unknown')[:10]}") for r in records})
    lines.append("")
    lines.append("build: " + " | ".join(builds))
    if any((r.get("identity") or {}).get("emulated") for r in records):
        lines.append("")
        lines.append("Emulated rows ran under qemu on another machine: their speeds say nothing about the board.")
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_report(records: list[dict], path: Path) -> None:
    """Two panels (pp, tg): one group of bars per device, one bar per artifact (model scheme target), log t/s."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FleetError("--plot needs matplotlib: pip install 'edgellm[bench]'") from None
    devices = sorted({device_label(r) for r in records})
    arts = sorted({f"{r['model']} {r['scheme']} {r['target']}" for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3 * len(devices)), 4.5))
    width = 0.8 / max(1, len(arts))
    for ax, kind in zip(axes, ("pp", "tg")):
        for j, art in enumerate(arts):
            xs, ys, es = [], [], []
            for i, dev in enumerate(devices):
                hit = [r for r in records if r["test"].startswith(kind) and device_label(r) == dev
                       and f"{r['model']} {r['scheme']} {r['target']}" == art]
                if hit:
                    xs.append(i + (j - (len(arts) - 1) / 2) * width)
                    ys.append(hit[0]["avg_ts"])
                    es.append(hit[0]["stddev_ts"])
            if xs:
                ax.bar(xs, ys, width, yerr=es, label=art, capsize=2)
        tests = sorted({r["test"] for r in records if r["test"].startswith(kind)})
        ax.set_title(f"{kind} ({', '.join(tests) or 'none'})")
        ax.set_xticks(range(len(devices)), devices, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s (log)")
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_report(records: list[dict], output: Path, plot: Path | None = None) -> None:
    text = format_report(records)
    if plot:
        plot_report(records, plot)
        text += f"\n![pp and tg per device]({os.path.relpath(Path(plot), Path(output).parent or '.')})\n"
    _atomic_write(Path(output), lambda tmp: Path(tmp).write_text(text))
