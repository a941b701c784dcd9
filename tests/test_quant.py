"""Packing contract, per-tensor precision and every weight kernel against the numpy reference, over awkward shapes."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.quant import SCHEMES, get_scheme
from edgellm.quant import reference as ref
from edgellm.quant.schemes import precision_plan

# act-order twins (GPTQ import, `*_ao`) share their row's packing and kernels (the gather is outside the kernel:
# tests/test_gptq_awq.py), so the per-row kernel tests skip them
ROWS = [s for s in SCHEMES.values() if not s.act_order]
QUANTIZED = [s for s in ROWS if s.quantized]


def test_nibble_layout_is_the_contract():
    # element i of eight at bits [4i, 4i+4)
    q = np.arange(8, dtype=np.uint32).reshape(1, 8)
    packed = ref.pack_nibbles(q)
    assert packed.dtype == np.uint32 and packed.shape == (1, 1)
    assert int(packed[0, 0]) == 0x76543210
    np.testing.assert_array_equal(ref.unpack_nibbles(packed), q)


def test_byte_layout_is_the_contract():
    # 8-bit rows: byte i of four at bits [8i, 8i+8), offset binary (q + 128)
    q = np.array([[0x00, 0x7F, 0x80, 0xFF, 1, 2, 3, 4]], np.uint32)
    packed = ref.pack_bytes(q)
    assert packed.dtype == np.uint32 and packed.shape == (1, 2)
    assert int(packed[0, 0]) == 0xFF807F00 and int(packed[0, 1]) == 0x04030201
    np.testing.assert_array_equal(ref.unpack_bytes(packed), q)
    s = get_scheme("q8f32_2")
    group = ref.pack_bytes(np.pad(q, ((0, 0), (0, 24)), constant_values=128))  # one group of 32
    back = ref.dequantize(group, np.full((1, 1), 0.5, np.float16), 32, s)
    np.testing.assert_array_equal(back[0, :8], np.float32([-64, -0.5, 0, 63.5, -63.5, -63, -62.5, -62]))
    assert (back[0, 8:] == 0).all()


def test_quantize_values_follow_design_formula(monkeypatch):
    """The plain rule (the search's candidate zero): scale = max|w| / 7, q = round(w / scale) + 7."""
    monkeypatch.setattr(ref, "SEARCH_STEPS", np.zeros(1, np.float32))
    s = get_scheme("q4f32_1")
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [7.0, -7.0, 3.4, -0.6]
    qw, qs = ref.quantize(w, s)
    assert qs.shape == (1, 1) and qs[0, 0] == pytest.approx(1.0)
    q = ref.unpack_nibbles(qw)[0]
    assert list(q[:4]) == [14, 0, 10, 6]  # round(w/scale) + 7
    assert (q[4:] == 7).all()


@pytest.mark.parametrize("scheme", QUANTIZED, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(2, 13), (16, 128), (3, 40), (5, 32), (1, 7)])
def test_round_trip_error_bounded_by_half_step(scheme, shape, monkeypatch):
    """The plain rule (min/max, max/qmax, llama.cpp's Q4_0) keeps every weight within half a step; the 4-bit search
    never does worse in total squared error, and its result is a fixed point of dequantize + quantize."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    parts = ref.quantize(w, scheme)
    assert len(parts) == (3 if scheme.zero_point else 2)
    qw, qs, qm = parts[0], parts[1], (parts[2] if scheme.zero_point else None)
    kp = scheme.padded_in(shape[1])
    assert qw.shape == (shape[0], kp // (32 // scheme.bits)) and qw.dtype == np.uint32
    for a in parts[1:]:
        assert a.shape == (shape[0], kp // scheme.group_size) and a.dtype == np.dtype(scheme.scale_dtype)
    back = ref.dequantize(qw, qs, shape[1], scheme, qm)
    assert back.shape == shape
    assert ref.unpack(qw, scheme).max() <= scheme.levels
    if kp == shape[1]:  # dequantizing and quantizing again gives the same values (a fixed point; padding aside)
        again = ref.quantize(back, scheme)
        np.testing.assert_array_equal(ref.dequantize(again[0], again[1], shape[1], scheme,
                                                     again[2] if qm is not None else None), back)
    monkeypatch.setattr(ref, "SEARCH_STEPS", np.zeros(1, np.float32))  # the plain rule alone
    plain = ref.quantize(w, scheme)
    pqs, pqm = plain[1], (plain[2] if scheme.zero_point else None)
    pback = ref.dequantize(plain[0], pqs, shape[1], scheme, pqm)
    assert ((back - w) ** 2).sum() <= ((pback - w) ** 2).sum() * (1 + 1e-6)
    step = np.repeat(np.abs(pqs.astype(np.float32)), scheme.group_size, axis=1)[:, : shape[1]]  # Q4_0 grid: d < 0 too
    slack = 1e-3 * step + 1e-6
    if scheme.zero_point:  # fp16 scale and min: their rounding moves the 15-step grid slightly
        slack = slack + 1e-2 * step + np.repeat(np.abs(pqm.astype(np.float32)), scheme.group_size, axis=1)[:, : shape[1]] * 2**-10
    if scheme.q_offset:  # the Q4_0 grid (llama.cpp's rounding): the side opposite the extreme clips at 7/8 of it
        slack = slack + step / 2
    assert (np.abs(pback - w) <= step / 2 + slack).all()


def test_search_beats_the_plain_rule_and_keeps_grid_sources():
    """On Gaussian weights the 4-bit search cuts the squared error of the plain rule (llama.cpp's Q4_1 ref quantizer
    on that grid, max/7 on the default one) by over 8%; a weight on the plain rule's grid (a GGUF source dequantized)
    packs back to itself. The Q4_0 grid keeps llama.cpp's rule alone (no search)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    q40 = get_scheme("q4f32_0")
    old = ref.SEARCH_STEPS
    with_search = ref.quantize(w, q40)
    try:
        ref.SEARCH_STEPS = np.zeros(1, np.float32)
        plain = ref.quantize(w, q40)
    finally:
        ref.SEARCH_STEPS = old
    for a, b in zip(with_search, plain):
        np.testing.assert_array_equal(a, b)
    for name in ("q4f32_2", "q4f32_g128", "q4f16_1"):
        s = get_scheme(name)
        p = ref.quantize(w, s)
        back = ref.dequantize(p[0], p[1], 256, s, p[2] if s.zero_point else None)
        old = ref.SEARCH_STEPS
        try:
            ref.SEARCH_STEPS = np.zeros(1, np.float32)
            p0 = ref.quantize(w, s)
        finally:
            ref.SEARCH_STEPS = old
        back0 = ref.dequantize(p0[0], p0[1], 256, s, p0[2] if s.zero_point else None)
        assert ((back - w) ** 2).sum() < 0.92 * ((back0 - w) ** 2).sum(), name
        again = ref.quantize(back0, s)  # the plain rule's grid: recovered nibble for nibble
        np.testing.assert_array_equal(ref.unpack(again[0], s), ref.unpack(p0[0], s))


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


def _q8_0_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's own Q8_0 of w (gguf-py's quantizer, the reference implementation): (d fp16 [out, in/32],
    qs int8 [out, in]) read from the raw blocks (2 bytes d, 32 int8)."""
    import gguf

    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    d = raw[:, :2].copy().view(np.float16).reshape(w.shape[0], -1)
    qs = raw[:, 2:].copy().view(np.int8).reshape(w.shape)
    return d, qs


def test_q8_0_source_repacks_bit_for_bit():
    """A GGUF Q8_0 tensor (what llama.cpp writes: d = max|w| / 127 in fp16, q = round(w / d)) comes back as the same
    int8 values and the same fp16 scales in every 8-bit row, and dequantizes to the GGUF's own values."""
    import gguf

    rng = np.random.default_rng(5)
    w = (rng.standard_normal((48, 96)) * rng.uniform(1e-3, 10, (48, 1))).astype(np.float32)
    w[3, :32] = 0  # an all-zero block
    w[4, 40] = -7.0  # a block whose extreme is negative
    d, qs = _q8_0_blocks(w)
    source = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                    gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)  # what the loader yields
    for name in ("q8f32_1", "q8f16_1", "q8f32_2"):
        s = get_scheme(name)
        qw, sc = ref.quantize(source, s)
        np.testing.assert_array_equal(sc, d)
        np.testing.assert_array_equal(ref.unpack_bytes(qw).astype(np.int16) - 128, qs)
        np.testing.assert_array_equal(ref.dequantize(qw, sc, 96, s), source)


def test_precision_plan_is_source_faithful():
    q4c, q4g, q4s = get_scheme("q4f32_2"), get_scheme("q4f16_1"), get_scheme("q4f32_1")
    for src in ("Q8_0", "F16", "BF16", "F32", "float32", "bfloat16"):  # 8-bit and wider sources stay 8-bit
        assert precision_plan(q4c, src, None).embedding.name == "q8f32_2"
        assert precision_plan(q4g, src, None).head.name == "q8f16_1"
        assert precision_plan(q4s, src, None).head.name == "q8f32_1"
    for src in ("Q4_0", "Q4_1"):  # a 4-bit source keeps the layers' 4-bit row
        assert precision_plan(q4c, src, None).embedding == q4c
    plan = precision_plan(q4c, "Q4_1", "Q8_0")  # untied: each tensor from its own source
    assert (plan.embedding.name, plan.head.name, plan.layers) == ("q4f32_2", "q8f32_2", q4c)
    for wide in ("q0f32", "q0f16", "q8f32_1"):  # the layer row is already wide enough
        assert precision_plan(get_scheme(wide), "F32", None).head.name == wide
    # the user's --head wins, in both directions, for embedding and head alike
    assert precision_plan(q4c, "Q8_0", None, "q4").head == q4c
    assert precision_plan(q4c, "Q4_1", "Q4_1", "q8").embedding.name == "q8f32_2"
    assert precision_plan(q4c, "Q8_0", None, "f16").head.name == "q0f16"
    assert precision_plan(q4c, "Q8_0", None).as_dict()["head_choice"] == "auto"
    with pytest.raises(ValueError, match="q4, q8, f16"):
        precision_plan(q4c, "Q8_0", None, "q2")
    # every row's partners keep its activations (the head kernel takes the layers' dtype)
    for s in SCHEMES.values():
        for choice in ("q4", "q8"):
            assert s.partner(choice).act_dtype == s.act_dtype and s.partner(choice).act_quant in (s.act_quant, "none")


@pytest.mark.parametrize("scheme_name", ["q4f32_2", "q4f32_1", "q8f32_2"])
def test_int8_linear_is_the_dequantized_product(scheme_name):
    """The int8-activation linear is exactly dequantized weights times dequantized activations (xq * d): for the
    4-bit rows because the minimum meets d * sum(xq) (llama.cpp's Q4_1 x Q8_1), not the float sum of x."""
    s = get_scheme(scheme_name)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 96)) * 4).astype(np.float32)
    parts = ref.quantize(rng.standard_normal((20, 96)).astype(np.float32), s)
    qm = parts[2] if s.zero_point else None
    w = ref.dequantize(parts[0], parts[1], 96, s, qm).astype(np.float64)
    ag = s.act_group_size  # x values per activation scale (one packed word on the int8 rows)
    xq, d = ref.quantize_activations(x, ag)
    x_deq = xq.astype(np.float64) * np.repeat(d, ag, axis=1)
    got = ref.linear_int8(x, parts[0], parts[1], qm, s)
    np.testing.assert_allclose(got, x_deq @ w.T, rtol=1e-5, atol=1e-5 * np.abs(got).max())
    if s.zero_point:  # the old term (min * exact float sum) is measurably different: the test can tell them apart
        old = got + (x.reshape(3, 3, 32).sum(2) - x_deq.reshape(3, 3, 32).sum(2)) @ qm.astype(np.float64).T
        assert np.abs(old - got).max() > 1e-4 * np.abs(got).max()


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
    for s in QUANTIZED:
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


@pytest.mark.parametrize("scheme", ROWS, ids=lambda s: s.name)
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


@pytest.mark.parametrize("scheme", ROWS, ids=lambda s: s.name)
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


def test_act_group_is_a_row_field_recorded_in_the_manifest_entry():
    """int8 rows quantize x per packed word (8 values for 4-bit, 4 for 8-bit), written into the manifest's quant entry;
    an artifact built before the field (no act_group in its entry) is read with d per weight group; a group that is
    not whole words or does not divide the weight group is refused."""
    from dataclasses import replace

    from edgellm.models.reference import tensor_scheme

    for name, ag in (("q4f32_2", 8), ("q8f32_2", 4), ("q4f32_g128", 8)):
        s = get_scheme(name)
        assert s.act_group_size == ag and s.as_dict()["act_group"] == ag
    assert "act_group" not in get_scheme("q4f16_1").as_dict()
    entry = get_scheme("q4f32_2").as_dict()
    assert tensor_scheme(entry, "model.layers.0.mlp.down_proj.weight").act_group_size == 8
    legacy = {k: v for k, v in entry.items() if k != "act_group"}
    assert tensor_scheme(legacy, "model.layers.0.mlp.down_proj.weight").act_group_size == 32
    for bad in (12, 64, 4):
        with pytest.raises(ValueError, match="act_group"):
            replace(get_scheme("q4f32_2"), act_group=bad)
