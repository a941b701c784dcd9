"""The int8-activation CPU linear kernels (kernels/cpu_linear_int8.py, and cpu_linear_int8_q8.py for 8-bit weights):
every dot-product path against numpy.

Each x86 path runs here when this CPU has its instructions (the test names the path it expects, so a silent
fallback to a slower path fails); the AArch64 paths are built and checked for their instructions (running them
under qemu is tests/test_targets.py's job).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.quant import get_scheme
from edgellm.quant import reference as ref
from pi_emulation import arm64_root, run_on_board  # noqa: F401  (arm64_root: a fixture)

X86 = "x86_64-linux-gnu"
A64 = "aarch64-linux-gnu"


def _target(mcpu: str, triple: str = X86):
    import tvm

    t = {"kind": "llvm", "mcpu": mcpu, "mtriple": triple}
    if triple == A64:
        t["mattr"] = ["+neon"]
    return tvm.target.Target(t)


def _host_has(features: list[str]) -> bool:
    import tvm

    from edgellm.targets import resolve

    host = resolve("host").tvm()
    return all(bool(tvm.target.codegen.target_has_features(f, host)) for f in features)


def _build(target, rows, in_f, out_f, scheme, bias):
    import tvm

    from edgellm.kernels.cpu_linear_int8 import linear_int8
    from edgellm.kernels.cpu_linear_int8_q8 import linear_int8_q8

    func = (linear_int8_q8 if scheme.bits == 8 else linear_int8)(rows, in_f, out_f, scheme, bias, target=target)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    return func, lib


# (mcpu, in_features, expected path, host features needed to run it)
PATHS = [
    ("znver4", 1024, "vnnix16", ["avx512vnni", "avx512vl"]),
    ("znver4", 576, "vnnix8", ["avx512vnni", "avx512vl"]),
    ("znver4", 96, "vnnix4", ["avx512vnni", "avx512vl"]),
    ("skylake-avx512", 1024, "pmaddx16", ["avx512bw"]),
    ("haswell", 576, "pmaddx8", ["avx2"]),
    ("x86-64-v2", 96, "pmaddx4", ["ssse3"]),
    ("x86-64", 576, "genericx4", []),
]


@pytest.mark.parametrize("scheme_name", ["q4f32_2", "q4f32_1"])
@pytest.mark.parametrize("mcpu,in_f,path,needs", PATHS, ids=[f"{p[0]}-{p[2]}" for p in PATHS])
# GEMM with 6 rows of x: one block of 4 on a decoded weight tile + 2 tail rows; with 2 rows: straight from the
# packed weights (a decoded tile does not pay off below 4 rows)
@pytest.mark.parametrize("rows,m,out_f,bias", [(1, 1, 24, False), (None, 6, 13, True), (None, 2, 16, False)])
def test_dot_path_matches_numpy(scheme_name, mcpu, in_f, path, needs, rows, m, out_f, bias):
    import tvm

    scheme = get_scheme(scheme_name)  # q4f32_1's symmetric grid through the same kernel: min = -7 * scale
    func, lib = _build(_target(mcpu), rows, in_f, out_f, scheme, bias)
    assert func.attrs["edgellm.dot"] == path
    if not _host_has(needs):
        pytest.skip(f"this CPU lacks {needs}: built only")
    rng = np.random.default_rng(in_f + out_f)
    x = (rng.standard_normal((m, in_f)) * rng.uniform(0.1, 3, (m, 1))).astype(np.float32)
    x[0, : min(32, in_f)] = 0  # an all-zero activation group
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(np.float32)
    parts = ref.quantize(w, scheme)
    dev = tvm.cpu()
    out = tvm.runtime.empty((m, out_f), "float32", dev)
    args = [x, *parts] + ([b] if bias else [])
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in args], out)
    qm = parts[2] if scheme.zero_point else None
    expect = ref.linear_int8(x, parts[0], parts[1], qm, scheme) + (b if bias else 0)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


# 8-bit weights (the Q8_0 grid: the embedding / tied head beside q4f32_2): a row has in/4 words, a multiple of 8, so
# the same widths pick wider vectors than above (4 lanes only where nothing wider exists). (mcpu, in_features, expected path, host features needed to run it)
PATHS8 = [
    ("znver4", 1024, "vnnix16", ["avx512vnni", "avx512vl"]),
    ("znver4", 96, "vnnix8", ["avx512vnni", "avx512vl"]),
    ("skylake-avx512", 576, "pmaddx16", ["avx512bw"]),
    ("haswell", 96, "pmaddx8", ["avx2"]),
    ("x86-64-v2", 48, "pmaddx4", ["ssse3"]),
    ("x86-64", 40, "genericx4", []),  # 40 -> one padded group of 32 + 8
]


@pytest.mark.parametrize("mcpu,in_f,path,needs", PATHS8, ids=[f"{p[0]}-{p[2]}" for p in PATHS8])
@pytest.mark.parametrize("rows,m,out_f,bias", [(1, 1, 24, False), (None, 6, 13, True), (None, 2, 16, False)])
def test_q8_dot_path_matches_numpy(mcpu, in_f, path, needs, rows, m, out_f, bias):
    """int8 x int8: the offset-binary weight bytes at both ends (0 = -128, 255 = +127) and random bytes, through
    every path's correction (vnni / pmadd: u * xq - 128 * sum(xq); sdot / portable: the sign-flipped byte)."""
    import tvm

    scheme = get_scheme("q8f32_2")
    func, lib = _build(_target(mcpu), rows, in_f, out_f, scheme, bias)
    assert func.attrs["edgellm.dot"] == path
    if not _host_has(needs):
        pytest.skip(f"this CPU lacks {needs}: built only")
    rng = np.random.default_rng(in_f * 7 + out_f)
    x = (rng.standard_normal((m, in_f)) * rng.uniform(0.1, 3, (m, 1))).astype(np.float32)
    x[0, : min(32, in_f)] = 0
    x[-1, : min(32, in_f)] = 5.0  # a constant group: every byte 127
    qw, qs = ref.quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    qw[0], qw[1] = 0, 0xFFFFFFFF
    qw[2] = rng.integers(0, 2**32, qw.shape[1], dtype=np.uint64).astype(np.uint32)
    b = rng.standard_normal(out_f).astype(np.float32)
    dev = tvm.cpu()
    out = tvm.runtime.empty((m, out_f), "float32", dev)
    lib["main"](*[tvm.runtime.tensor(a, dev) for a in [x, qw, qs] + ([b] if bias else [])], out)
    expect = ref.linear_int8(x, qw, qs, None, scheme) + (b if bias else 0)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


@pytest.mark.parametrize("scheme_name", ["q4f32_2", "q8f32_2"])
@pytest.mark.parametrize("rows,m", [(1, 1), (None, 5)])
def test_activation_group_is_the_rows_act_group(scheme_name, rows, m):
    """The kernels quantize x with one d per `act_group` values (a packed word: 8 for 4-bit rows, 4 for 8-bit), as
    quant.reference does; the same row with act_group=0 (d per weight group of 32) gives measurably other numbers, so
    a kernel that ignored the field would fail here."""
    import tvm

    from dataclasses import replace

    row = get_scheme(scheme_name)
    assert row.act_group_size == row.elems_per_word
    rng = np.random.default_rng(3)
    in_f, out_f = 576, 40
    x = rng.standard_normal((m, in_f)).astype(np.float32)
    x[:, ::32] *= 30  # one outlier per group of 32: d per word keeps the other words' resolution
    parts = ref.quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), row)
    qm = parts[2] if row.zero_point else None
    got = {}
    for s in (row, replace(row, act_group=0)):
        _, lib = _build(_target("znver4") if _host_has(["avx512vnni", "avx512vl"]) else _target("x86-64"), rows,
                        in_f, out_f, s, False)
        dev = tvm.cpu()
        out = tvm.runtime.empty((m, out_f), "float32", dev)
        lib["main"](*[tvm.runtime.tensor(a, dev) for a in [x, *parts]], out)
        expect = ref.linear_int8(x, parts[0], parts[1], qm, s)
        np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
        got[s.act_group_size] = out.numpy()
    exact = x @ ref.dequantize(parts[0], parts[1], in_f, row, qm).T
    fine, coarse = got[row.act_group_size], got[32]
    assert np.abs(fine - coarse).max() > 1e-3 * np.abs(exact).max()  # far beyond the 1e-5 match above
    err = {ag: np.sqrt(((y - exact) ** 2).mean()) for ag, y in got.items()}  # rms error against fp32 x
    assert err[row.act_group_size] < 0.85 * err[32], err


def test_int8_kernel_is_close_to_the_float_product():
    """Quantizing activations to int8 per group of 32 costs about 1% relative error on a random layer."""
    s = get_scheme("q4f32_2")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 576)).astype(np.float32)
    qw, qs, qm = ref.quantize(rng.standard_normal((64, 576)).astype(np.float32), s)
    exact = x @ ref.dequantize(qw, qs, 576, s, qm).T
    got = ref.linear_int8(x, qw, qs, qm, s)
    assert np.abs(got - exact).max() / np.abs(exact).max() < 0.02


@pytest.mark.parametrize("scheme_name", ["q4f32_2", "q8f32_2"])
@pytest.mark.parametrize("mcpu,path,instr", [("cortex-a76", "sdotx4", "sdot"), ("cortex-a72", "genericx4", "mul")])
def test_aarch64_paths_build_with_their_instructions(mcpu, path, instr, scheme_name):
    func, lib = _build(_target(mcpu, A64), 1, 576, 64, get_scheme(scheme_name), False)
    assert func.attrs["edgellm.dot"] == path
    asm = lib.mod.inspect_source("asm")
    assert f"\t{instr}\t" in asm


def test_int8_scheme_refuses_gpu_targets(tmp_path):
    from edgellm.compile import CompileArgs, compile_model

    with pytest.raises(ValueError, match="q4f32_2 has CPU kernels only.*--quant"):
        compile_model(CompileArgs(model=None, output=tmp_path / "a", target="cuda-sm90", quant="q4f32_2"))
    assert not (tmp_path / "a").exists()


# ---- the AArch64 paths, run under qemu-aarch64 -----------------------------------------------------------------

# SmolLM2-135M's linear shapes (in, out): fused qkv 576 -> 960 (decode: one row), down_proj 1536 -> 576 (prefill: a
# block of 4 rows on a decoded weight tile + 2 tail rows), fused gate_up 576 -> 3072 (batch decode of 2 sequences:
# straight from the packed weights)
# and the 8-bit tied head 576 -> 49152 (decode GEMV) and 576 -> 960 on 6 rows (prefill_logits-shaped GEMM)
PI_CASES = [("q4f32_2", 1, 1, 576, 960), ("q4f32_2", None, 6, 1536, 576), ("q4f32_2", None, 2, 576, 3072),
            ("q8f32_2", 1, 1, 576, 49152), ("q8f32_2", None, 6, 576, 960)]
PI_BOARDS = [("cortex-a76", "sdotx4"), ("cortex-a72", "genericx4")]
_BOARD_SCRIPT = """
import sys, numpy as np, tvm
d = sys.argv[1]
for i in range(int(sys.argv[2])):
    z = np.load(f"{d}/case{i}.npz")
    lib = tvm.runtime.load_module(f"{d}/case{i}_{sys.argv[3]}.so")
    out = tvm.runtime.empty(z["expect"].shape, "float32", tvm.cpu())
    lib["main"](*[tvm.runtime.tensor(z[k], tvm.cpu()) for k in ("x", "qw", "qs", "qm") if k in z], out)
    np.save(f"{d}/case{i}_{sys.argv[3]}.npy", out.numpy())
"""


def _adversarial(rng, m: int, in_f: int, out_f: int, scheme):
    """x with groups of very different size (1e-6 .. 1e5), an all-zero group, a constant group (every byte 127),
    a group of +-max (bytes +-127) and exact rounding ties (x * 127 / max = k + 0.5); weights with every nibble 15,
    every nibble 0 (8-bit rows: every byte 255 / 0, i.e. +127 / -128), random words and extreme fp16 scale / min."""
    x = rng.standard_normal((m, in_f)).astype(np.float32)
    g = x.reshape(m, -1, 32)
    g *= rng.choice(np.float32([1e-6, 1e-3, 1, 1e3, 1e5]), size=(m, g.shape[1], 1))
    g[0, 0] = 0
    g[0, 1] = 3.5
    g[-1, 2] = np.where(np.arange(32) % 2, 1e4, -1e4)
    g[0, 3] = np.float32([127] + [k + 0.5 for k in range(-15, 16)])  # ties: rint goes to even (llama.cpp's too)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    qw, qs, *rest = ref.quantize(w, scheme)
    qm = rest[0] if rest else None  # asymmetric rows only
    qw[0] = 0xFFFFFFFF
    qw[1] = 0
    qw[2] = rng.integers(0, 2**32, qw.shape[1], dtype=np.uint64).astype(np.uint32)
    qs[3] = np.float16(6e4)
    if qm is not None:
        qm[3] = np.float16(-6e4)
    return x, qw, qs, qm


def test_aarch64_paths_match_numpy_under_qemu(arm64_root, tmp_path):
    """The Pi 5's sdot path and the Pi 4's portable path, built for their cores and run under qemu on SmolLM2's
    shapes with adversarial values: both equal the numpy definition to float rounding, and each other bit for bit
    (their integer dot products are exact, and everything after them is the same float code)."""
    import tvm

    rng = np.random.default_rng(7)
    expects = []
    for i, (scheme_name, rows, m, in_f, out_f) in enumerate(PI_CASES):
        scheme = get_scheme(scheme_name)
        x, qw, qs, qm = _adversarial(rng, m, in_f, out_f, scheme)
        expects.append(ref.linear_int8(x, qw, qs, qm, scheme))
        np.savez(tmp_path / f"case{i}.npz", x=x, qw=qw, qs=qs, expect=expects[-1], **({"qm": qm} if qm is not None
                                                                                       else {}))
        for mcpu, path in PI_BOARDS:
            func, lib = _build(_target(mcpu, A64), rows, in_f, out_f, scheme, False)
            assert func.attrs["edgellm.dot"] == path
            lib.export_library(str(tmp_path / f"case{i}_{mcpu}.so"),
                               fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    for mcpu, _ in PI_BOARDS:
        run_on_board(arm64_root, mcpu, _BOARD_SCRIPT, str(tmp_path), str(len(PI_CASES)), mcpu)
    for i, expect in enumerate(expects):
        got = {mcpu: np.load(tmp_path / f"case{i}_{mcpu}.npy") for mcpu, _ in PI_BOARDS}
        for mcpu, out in got.items():
            np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max(),
                                       err_msg=f"{mcpu} case {PI_CASES[i]}")
        np.testing.assert_array_equal(got["cortex-a76"], got["cortex-a72"], err_msg=f"sdot vs generic {PI_CASES[i]}")
