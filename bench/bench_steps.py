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
