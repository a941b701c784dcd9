"""The real SmolLM2 built for the Raspberry Pi 5 (Cortex-A76, sdot) in the Pi presets' default scheme, run under
qemu-aarch64, against the host build of the same scheme on the README's prompt. (The Pi 4's portable integer path
gives the Pi 5's logits bit for bit, and a q4f32_1 Pi build gives the host's to fp32 summation order, 1e-4 of the
largest logit: tests/test_targets_emulated.py on the tiny model. The q4f32_1 check ran on this model too, at 1.9e-6,
until CI time asked for one emulated SmolLM2 build less.)

What decides the bounds (measured; docs/tvm-notes.md "Pi builds under qemu" has the whole investigation):
- q4f32_1 (fp32 activations): every kernel is continuous in its inputs, so the Pi and host builds differ only by
  fp32 summation order (NEON 4 lanes vs AVX-512 16): 1.9e-6 of the largest logit over the prompt.
- q4f32_2 (int8 activations, the CPU default, with the source-faithful 8-bit tied head q8f32_2): each linear kernel
  rounds its input to int8 (per group of 32 when the envelope below was measured; per packed word, the row's
  act_group, since), which is discontinuous. An fp32-order difference of 1e-7 flips a few
  roundings, and 30 layers amplify them. The numpy model of the scheme (models/reference.py) against itself with
  1e-7 relative noise on every linear input, 12 seeds, on this prompt: max logit difference 0.044-0.072 of the
  largest logit, top-1 agreement 91.9-97.3% (34-36 of 37). The Pi 5 build against the host build: 0.041 and 91.9%
  (the host build against the numpy model: 0.085 and 91.9%). With the 4-bit head and the min * sum(x) term before
  issue 14 the same envelope was 0.10-0.25 / 84-92% (Pi vs host 0.12 / 86.5%): the 8-bit head and llama.cpp's min
  term tightened it. A faulty kernel is far outside this (a udot for the sdot garbles 99.9% of a layer's outputs);
  the exact checks are the bit-equality of the sdot and portable builds (tests/test_targets_emulated.py) and the
  per-kernel qemu tests in tests/test_cpu_kernels.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.compile import CompileArgs, compile_model
from edgellm.config import RuntimeOptions
from edgellm.device_runners.engine import Engine
from pi_emulation import arm64_root  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

PROMPT = "What is the capital of France?"  # the README's `edgellm run ... --emulate` example, chat template: 37 ids
INT8_NOISE_MAX_DIFF = 0.15  # of the largest host logit; noise envelope above: 0.072 (host vs numpy model 0.085)
INT8_NOISE_TOP1 = 0.86  # envelope above: 0.919 (34 of 37 positions); 0.86 allows 5 of 37 to differ


@pytest.fixture(scope="module")
def scored(arm64_root, compiled, tmp_path_factory):  # noqa: F811
    """scored(board, scheme) -> (Pi logits, host logits) of PROMPT: the Pi build scored under qemu, once each."""
    from edgellm.device_runners.emulate import run_remote

    root = tmp_path_factory.mktemp("pi-smollm2")
    cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def get(board: str, scheme: str):
        if (board, scheme) not in cache:
            host = Engine(compiled("smollm2", scheme))
            ids = host.prompt_ids(PROMPT)
            art = root / f"{board}-{scheme}"
            compile_model(CompileArgs(model=None, output=art, target=board, quant=scheme,
                                      runtime=RuntimeOptions(512, 128)))
            run_remote(art, {"op": "score", "ids": ids, "out": str(root / f"{board}-{scheme}.npy")})
            cache[(board, scheme)] = np.load(root / f"{board}-{scheme}.npy"), host.score(ids)
        return cache[(board, scheme)]

    return get


def _compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.abs(got - ref).max() / np.abs(ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean())


def test_pi5_q4f32_2_within_int8_noise_of_host(scored):
    """The default scheme on the Pi 5 against the host build: inside the envelope that fp32-order noise spreads int8
    activations over (module docstring). The Pi 4's build of it gives the Pi 5's logits bit for bit (its portable
    integer path against sdot: tests/test_targets_emulated.py, on the tiny model since CI time asked for it)."""
    got, ref = scored("rpi5", "q4f32_2")
    diff, top1 = _compare(got, ref)
    assert diff < INT8_NOISE_MAX_DIFF and top1 >= INT8_NOISE_TOP1, (diff, top1)
