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
    parts = ref.quantize(w, scheme)
    assert len(parts) == (3 if scheme.zero_point else 2)
    qw, qs, qm = parts[0], parts[1], (parts[2] if scheme.zero_point else None)
    kp = scheme.padded_in(shape[1])
    assert qw.shape == (shape[0], kp // 8) and qw.dtype == np.uint32
    for a in parts[1:]:
        assert a.shape == (shape[0], kp // 32) and a.dtype == np.dtype(scheme.scale_dtype)
    back = ref.dequantize(qw, qs, shape[1], scheme, qm)
    assert back.shape == shape
    step = np.repeat(qs.astype(np.float32), 32, axis=1)[:, : shape[1]]
    slack = 1e-3 * step + 1e-6
    if scheme.zero_point:  # fp16 scale and min: their rounding moves the 15-step grid slightly
        slack = slack + 1e-2 * step + np.repeat(np.abs(qm.astype(np.float32)), 32, axis=1)[:, : shape[1]] * 2**-10
    assert (np.abs(back - w) <= step / 2 + slack).all()
    assert ref.unpack_nibbles(qw).max() <= scheme.levels
    # re-quantizing the dequantized weight is exact (a fixed point), nibbles included
    qw2 = ref.quantize(back, scheme)[0]
    np.testing.assert_array_equal(ref.unpack_nibbles(qw2), ref.unpack_nibbles(qw))


def test_asymmetric_grid_reproduces_a_q4_1_block_exactly():
    """A group already on a 16-level grid (what a GGUF Q4_1 block decodes to) survives q4f32_2 unchanged."""
    s = get_scheme("q4f32_2")
    rng = np.random.default_rng(3)
    d, m = np.float16(0.0123), np.float16(-0.091)
    q = rng.integers(0, 16, (4, 64)).astype(np.float32)
    q[:, ::32], q[:, 1::32] = 0, 15  # both ends in every group, as in a block quantized from its min and max
    w = q * np.float32(d) + np.float32(m)
    qw, qs, qm = ref.quantize(w, s)
    np.testing.assert_array_equal(ref.unpack_nibbles(qw), q.astype(np.uint8))
    assert (qs == d).all() and (qm == m).all()
    np.testing.assert_array_equal(ref.dequantize(qw, qs, 64, s, qm), w)


def test_int8_activation_quantization_is_symmetric_per_group():
    x = np.zeros((2, 64), np.float32)
    x[0, :32] = np.linspace(-2.0, 1.0, 32)
    x[1, 32:] = 0.5
    xq, d = ref.quantize_activations(x, 32)
    assert xq.dtype == np.int8 and d.shape == (2, 2)
    assert xq[0, 0] == -127 and d[0, 0] == pytest.approx(2.0 / 127)
    assert (xq[0, 32:] == 0).all() and d[0, 1] == 0  # an all-zero group: scale 0, values 0
    assert (xq[1, 32:] == 127).all()
    np.testing.assert_allclose(xq[0, :32] * d[0, 0], x[0, :32], atol=d[0, 0] / 2 + 1e-7)


def test_padding_nibbles_decode_to_zero():
    s = get_scheme("q4f32_1")
    qw, qs = ref.quantize(np.ones((2, 13), np.float32), s)
    assert (ref.unpack_nibbles(qw)[:, 13:] == s.qmax).all()  # zero after the -qmax offset


def test_zero_group_has_zero_scale_and_decodes_to_zero():
    for s in Q4:
        parts = ref.quantize(np.zeros((2, 64), np.float32), s)
        assert (parts[1] == 0).all()
        assert (ref.dequantize(parts[0], parts[1], 64, s, parts[2] if s.zero_point else None) == 0).all()


def test_unknown_scheme_error_lists_choices():
    with pytest.raises(ValueError, match="q4f32_1"):
        get_scheme("q3f8")


# ---- TIR kernels (compiled for the host CPU through the same schedules the pipeline uses) -----------------

def _build(make_func):
    """The kernel the registry gives for the host target (scheduled for it), compiled."""
    import tvm

    from edgellm.kernels import KernelRegistry
    from edgellm.targets import resolve

    target = resolve("host").tvm()
    scheduled = make_func(KernelRegistry(target))
    assert scheduled is not None and scheduled.attrs["tirx.is_scheduled"]
    return tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=target)


def _stored_and_effective(w, scheme):
    """The arrays the kernel reads for weight w, and the float32 weight they stand for (numpy reference)."""
    if scheme.quantized:
        stored = list(ref.quantize(w, scheme))
        return stored, ref.dequantize(stored[0], stored[1], w.shape[1], scheme, stored[2] if scheme.zero_point else None)
    stored = [w.astype(scheme.weight_dtype)]
    return stored, stored[0].astype(np.float32)


@pytest.mark.parametrize("scheme", list(SCHEMES.values()), ids=lambda s: s.name)
@pytest.mark.parametrize("rows,in_f,out_f,bias", [(1, 13, 2, False), (1, 96, 40, True), (5, 13, 6, True),
                                                   (9, 200, 80, False), (1, 64, 320, False)])
def test_linear_kernel_matches_numpy(scheme, rows, in_f, out_f, bias):
    import tvm

    rng = np.random.default_rng(rows * 1000 + in_f)
    act = scheme.act_dtype
    mod = _build(lambda kernels: kernels.linear(1 if rows == 1 else None, in_f, out_f, scheme, act, bias))
    x = rng.standard_normal((rows, in_f)).astype(act)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(act)
    stored, w_eff = _stored_and_effective(w, scheme)
    if scheme.act_quant == "int8":  # the kernel quantizes x per group: its numpy definition
        expect = ref.linear_int8(x, *stored, scheme) if scheme.zero_point else ref.linear_int8(x, *stored, None, scheme)
        expect = expect + (b if bias else 0)
    else:
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

    rng = np.random.default_rng(vocab)
    mod = _build(lambda kernels: kernels.embedding(vocab, hidden, scheme, scheme.act_dtype))
    w = rng.standard_normal((vocab, hidden)).astype(np.float32)
    stored, w_eff = _stored_and_effective(w, scheme)
    ids = rng.integers(0, vocab, 11).astype(np.int32)
    dev = tvm.cpu()
    out = tvm.runtime.empty((11, hidden), scheme.act_dtype, dev)
    mod["main"](*[tvm.runtime.tensor(a, dev) for a in [ids, *stored]], out)
    np.testing.assert_allclose(out.numpy().astype(np.float32), w_eff[ids].astype(scheme.act_dtype).astype(np.float32))
