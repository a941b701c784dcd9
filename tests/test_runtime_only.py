"""The device runner works with the TVM runtime library alone (what a device has): no libtvm_compiler loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys
import tvm
from edgellm._tvm import compiler_available
from edgellm.device_runners.engine import Engine
eng = Engine(sys.argv[1])
toks = list(eng.generate_ids([1, 5, 7, 100, 42], 8))
maps = open("/proc/self/maps").read()
print(json.dumps({"compiler": compiler_available(), "tokens": toks,
                  "compiler_mapped": "libtvm_compiler" in maps, "runtime_mapped": "libtvm_runtime" in maps}))
"""


def test_engine_runs_without_compiler_library(compiled):
    from edgellm.device_runners.engine import Engine

    art = compiled("llama", "q4f32_1")
    expect = list(Engine(art).generate_ids([1, 5, 7, 100, 42], 8))
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(art)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["compiler"] is False and res["compiler_mapped"] is False and res["runtime_mapped"] is True
    assert res["tokens"] == expect
