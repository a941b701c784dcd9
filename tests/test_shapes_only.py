"""Shapes-only builds (benchmarks of models too big to ship): no shard is written, the Engine refuses to run the
artifact without the explicit random-weights mode and runs it with one."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.artifact import Artifact, ArtifactError
from edgellm.compile import CompileArgs, compile_model
from edgellm.config import RuntimeOptions
from edgellm.device_runners.engine import Engine


def test_shapes_only_artifact_runs_only_with_random_weights(checkpoints, compiled, tmp_path):
    full = Artifact.open(compiled("llama", "q4f32_1"))  # the session's full build of the same model and scheme
    res = compile_model(CompileArgs(model=str(checkpoints["llama"]), output=tmp_path / "shapes", quant="q4f32_1",
                                    runtime=RuntimeOptions(64, 16), shapes_only=True))
    assert not list((tmp_path / "shapes" / "params").glob("shard_*"))
    assert res.weight_bytes == full.weight_bytes  # same index: names, shapes, dtypes, sizes
    with pytest.raises(ArtifactError, match="random weights"):
        Engine(tmp_path / "shapes")
    eng = Engine(tmp_path / "shapes", random_weights=0)
    assert eng.art.manifest["shapes_only"] is True
    logits = eng.score([1, 2, 3])
    assert logits.shape == (3, eng.art.manifest["model"]["config"]["vocab_size"]) and np.isfinite(logits).all()
