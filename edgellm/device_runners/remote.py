"""Device-side entry point: `python -m edgellm.device_runners.remote ARTIFACT REQUEST_JSON`.

Runs on the device (or under qemu) with the TVM runtime only. Every output line that carries data starts with
`edgellm:` followed by JSON, so a host can parse it out of whatever else the process prints.
Requests: {"op": "generate_ids", "ids": [...], "max_new_tokens": n}
          {"op": "score", "ids": [...], "out": "path.npy"}               (logits [n, vocab] saved as .npy)
          {"op": "run", "prompt": "...", "chat": true, "max_new_tokens": n, "sampling": {...}}  (streams pieces)
REQUEST_JSON may be a list of requests: each runs in order on one engine (the artifact loaded once; under qemu the
runtime's start alone is ~8 s), with the first one's "threads"; the first that fails ends the process (exit 1).
"""

from __future__ import annotations

import json
import sys

import numpy as np

PREFIX = "edgellm:"
OPS = ("generate_ids", "score", "run")


def emit(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    from .engine import Engine

    artifact, reqs = argv[0], json.loads(argv[1])
    reqs = reqs if isinstance(reqs, list) else [reqs]
    if not reqs:
        raise SystemExit("no request: give one, or a non-empty list of them")
    for req in reqs:  # before the engine loads: a bad request costs nothing
        if not isinstance(req, dict) or req.get("op") not in OPS:
            raise SystemExit(f"unknown request {req!r}: each needs an op, one of {', '.join(OPS)}")
    eng = Engine(artifact, threads=reqs[0].get("threads"))
    for req in reqs:
        _serve(eng, req)
    return 0


def _serve(eng, req: dict) -> None:
    from .sampling import SamplingParams

    op = req["op"]
    if op == "generate_ids":
        toks = list(eng.generate_ids(req["ids"], int(req["max_new_tokens"])))
        emit({"tokens": toks, "finish_reason": eng.last_stats.finish_reason})
    elif op == "score":
        np.save(req["out"], eng.score(req["ids"]))
        emit({"saved": req["out"]})
    elif op == "run":
        sampling = SamplingParams(**req.get("sampling", {}))
        for piece in eng.generate(req["prompt"], int(req["max_new_tokens"]), sampling, chat=req.get("chat", True)):
            emit({"piece": piece})
        s = eng.last_stats
        emit({"stats": {"prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                        "prefill_tps": s.prefill_tps, "decode_tps": s.decode_tps, "finish_reason": s.finish_reason,
                        "token_ids": s.token_ids}})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
