"""The step loop of the GPU bench scripts: device time is scarce, so every step runs even when one before it
failed, the failure is recorded, and the results file is rewritten after each step (what a call leaves under $OUT
when it is cut off still holds every finished step)."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path


def run_steps(steps: Iterable[tuple[str, Callable[[], object]]], results: dict, out: Path) -> None:
    """Run each (label, step); a step's exception goes to results["errors"] (the traceback's last 3,000
    characters); prints each step's seconds; writes `results` as JSON to `out` after every step."""
    for label, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception:  # noqa: BLE001 (record it and go on with the next step)
            results.setdefault("errors", []).append(f"{label}: " + traceback.format_exc()[-3000:])
        print(f"[{label}: {time.perf_counter() - t0:.1f}s]", flush=True)
        out.write_text(json.dumps(results, indent=1, default=str))


def print_summary(results: dict, top: int = 8) -> int:
    """Print the checks (JSON), each decode profile (GPU busy / span / kernels a token, its `top` kernels) and the
    errors of a GPU script's `results`; the exit status: 1 when a step failed."""
    print(json.dumps(results.get("checks", {}), indent=1, default=str))
    for label, p in results.get("profiles", {}).items():
        print(f"{label}: GPU busy {p['gpu_busy_us_per_token']:.0f} us of a {p['gpu_span_us_per_token']:.0f} us span, "
              f"{p['kernels_per_token']:.0f} kernels/token, wall {p['wall_ms_per_token_profiled']:.3f} ms")
        for k in p["top_kernels"][:top]:
            print(f"    {k['us_per_token']:8.1f} us {k['per_token']:5.1f}x  {k['name'][:90]}")
    for e in results.get("errors", []):
        print("ERROR:", e)
    return 1 if results.get("errors") else 0
