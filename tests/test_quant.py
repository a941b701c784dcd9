"""Packing contract and every weight kernel against the numpy reference, over awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.quant import SCHEMES, get_scheme
from edgellm.quant import reference as ref

Q4 = [s for s in SCHEMES.values() if s.quantized]


def test_nibble_layout_is_the_contract():
    # element i of eight at bits [4i, 4i+4)
    q = np.arange(8, dtype=np.uint32).reshape(1, 8)
    packed = ref.pack_nibbles(q)
    assert packed.dtype == np.uint32 and packed.shape == (1, 1)
    assert int(packed[0, 0]) == 0x76543210
    np.testing.assert_array_equal(ref.unpack_nibbles(packed), q)


def test_quantize_values_follow_design_formula():
    s = get_scheme("q4f32_1")
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [7.0, -7.0, 3.4, -0.6]
    qw, qs = ref.quantize(w, s)
    assert qs.shape == (1, 1) and qs[0, 0] == pytest.approx(1.0)
    q = ref.unpack_nibbles(qw)[0]
    assert list(q[:4]) == [14, 0, 10, 6]  # round(w/scale) + 7
    assert (q[4:] == 7).all()


@pytest.mark.parametrize("scheme", Q4, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(2, 13), (16, 128), (3, 40), (5, 32), (1, 7)])
def test_round_trip_error_bounded_by_half_step(scheme, shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    qw, qs = ref.quantize(w, scheme)
    kp = scheme.padded_in(shape[1])
    assert qw.shape == (shape[0], kp // 8) and qw.dtype == np.uint32
    assert qs.shape == (shape[0], kp // 32) and qs.dtype == np.dtype(scheme.scale_dtype)
    back = ref.dequantize(qw, qs, shape[1], scheme)
    assert back.shape == shape
    step = np.repeat(qs.astype(np.float32), 32, axis=1)[:, : shape[1]]
    assert (np.abs(back - w) <= step / 2 + 1e-3 * step + 1e-6).all()
    # re-quantizing the dequantized weight is exact (a fixed point), nibbles included
    qw2, _ = ref.quantize(back, scheme)
    np.testing.assert_array_equal(ref.unpack_nibbles(qw2), ref.unpack_nibbles(qw))


def test_padding_nibbles_decode_to_zero():
    s = get_scheme("q4f32_1")
    qw, qs = ref.quantize(np.ones((2, 13), np.float32), s)
    assert (ref.unpack_nibbles(qw)[:, 13:] == s.qmax).all()  # zero after the -qmax offset


def test_zero_group_has_zero_scale_and_decodes_to_zero():
    s = get_scheme("q4f16_1")
    qw, qs = ref.quantize(np.zeros((2, 64), np.float32), s)
    assert (qs == 0).all()
    assert (ref.dequantize(qw, qs, 64, s) == 0).all()


def test_unknown_scheme_error_lists_choices():
    with pytest.raises(ValueError, match="q4f32_1"):
        get_scheme("q3f8")


# ---- TIR kernels (compiled for the host CPU through the same schedules the pipeline uses) -----------------

def _build(func):
    import tvm

    from edgellm.compile.schedules import schedule_kernel
    from edgellm.targets import resolve

    target = resolve("host").tvm()
    scheduled = schedule_kernel(func, target)
    assert scheduled is not None and scheduled.attrs["tir.is_scheduled"]
    return tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)


def _stored_and_effective(w, scheme):
    """The arrays the kernel reads for weight w, and the float32 weight they stand for (numpy reference)."""
    if scheme.quantized:
        stored = list(ref.quantize(w, scheme))
        return stored, ref.dequantize(*stored, w.shape[1], scheme)
    stored = [w.astype(scheme.weight_dtype)]
    return stored, stored[0].astype(np.float32)


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=lambda s: s.name)
@pytest.mark.parametrize("rows,in_f,out_f,bias", [(1, 13, 2, False), (1, 96, 40, True), (5, 13, 6, True),
                                                   (9, 200, 80, False), (1, 64, 320, False)])
def test_linear_kernel_matches_numpy(scheme, rows, in_f, out_f, bias):
    import tvm

    from edgellm.quant import kernels

    rng = np.random.default_rng(rows * 1000 + in_f)
    act = scheme.act_dtype
    mod = _build(kernels.linear(1 if rows == 1 else None, in_f, out_f, scheme, act, bias))
    x = rng.standard_normal((rows, in_f)).astype(act)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(act)
    stored, w_eff = _stored_and_effective(w, scheme)
    expect = x.astype(np.float32) @ w_eff.T + (b.astype(np.float32) if bias else 0)
    dev = tvm.cpu()
    out = tvm.runtime.empty((rows, out_f), act, dev)
    mod["main"](*[tvm.runtime.tensor(a, dev) for a in [x, *stored] + ([b] if bias else [])], out)
    tol = 2e-3 if act == "float16" else 1e-5
    np.testing.assert_allclose(out.numpy().astype(np.float32), expect, rtol=tol, atol=tol * np.abs(expect).max())


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=lambda s: s.name)
@pytest.mark.parametrize("vocab,hidden", [(50, 13), (300, 64), (7, 80)])
def test_embedding_kernel_matches_numpy(scheme, vocab, hidden):
    import tvm

    from edgellm.quant import kernels

    rng = np.random.default_rng(vocab)
    mod = _build(kernels.embedding(vocab, hidden, scheme, scheme.act_dtype))
    w = rng.standard_normal((vocab, hidden)).astype(np.float32)
    stored, w_eff = _stored_and_effective(w, scheme)
    ids = rng.integers(0, vocab, 11).astype(np.int32)
    dev = tvm.cpu()
    out = tvm.runtime.empty((11, hidden), scheme.act_dtype, dev)
    mod["main"](*[tvm.runtime.tensor(a, dev) for a in [ids, *stored]], out)
    np.testing.assert_allclose(out.numpy().astype(np.float32), w_eff[ids].astype(scheme.act_dtype).astype(np.float32))
