"""GGUF Q4_0 / Q4_1 / Q8_0 sources repack losslessly for every target's default row (issue 14 item 2).

The GGUFs are written with tests/gguf_writer.py from hand-made blocks: random stored integers that mostly avoid the
grid's ends and random fp16 scales / minimums, so a float round trip (dequantize, then re-quantize from the group's
min / max or max |w|) cannot find the same grid: only a repack of the stored blocks (quant/convert.repack_blocks)
gives back the GGUF's values. For each target preset the default row is picked from the source's layer types
(`compile._pick_scheme`), the weights are packed as `compile_model` packs them (`quant.convert.convert`), and numpy's
dequantization of the packed parameters must equal gguf-py's dequantization of the file bit for bit. CPU only.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.quant import reference as ref

LAYER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _blocks(kind: str, rows: int, cols: int, rng) -> np.ndarray:
    """Raw GGUF blocks [rows, cols / 32 * block bytes] of `kind` with random contents (see the module doc)."""
    g = cols // 32
    d = (rng.uniform(0.005, 0.05, (rows, g)) * rng.choice([-1, 1], (rows, g))).astype(np.float16)
    if kind == "Q8_0":
        q = rng.integers(-100, 101, (rows, g, 32)).astype(np.int8)
        return np.concatenate([np.abs(d)[:, :, None].view(np.uint8), q.view(np.uint8)], axis=2).reshape(rows, -1)
    q = rng.integers(1, 15, (rows, g, 32)).astype(np.uint8)  # 1..14: the extremes 0 and 15 mostly absent
    q[:, :, 5] = rng.integers(0, 16, (rows, g))  # ... but some groups reach them
    nib = q[:, :, :16] | (q[:, :, 16:] << 4)
    head = [d[:, :, None].view(np.uint8)] if kind == "Q4_0" else [
        np.abs(d)[:, :, None].view(np.uint8), rng.uniform(-0.3, 0.1, (rows, g, 1)).astype(np.float16).view(np.uint8)]
    return np.concatenate([*head, nib], axis=2).reshape(rows, -1)


def _encoder(layer_type, embed="Q8_0", head="Q8_0", seed=0):
    import gguf

    rng = np.random.default_rng(seed)

    def encode(name: str, arr: np.ndarray):
        if arr.ndim != 2:
            return None
        kind = embed if "embed_tokens" in name else head if name == "lm_head.weight" else layer_type(name)
        return _blocks(kind, *arr.shape, rng), gguf.GGMLQuantizationType[kind]

    return encode


SOURCES = {  # name -> (layer type per HF name, embedding type, head type)
    "q4_1": (lambda n: "Q4_1", "Q8_0", "Q8_0"),
    "q4_0": (lambda n: "Q4_0", "Q8_0", "Q4_0"),
    "mixed": (lambda n: "Q4_0" if "q_proj" in n or "down_proj" in n else "Q4_1", "Q8_0", "Q4_1"),
    "q8_0": (lambda n: "Q8_0", "Q8_0", "Q8_0"),
}
# preset -> source -> the layers' row picked without --quant
EXPECTED = {
    "host": {"q4_1": "q4f32_2", "q4_0": "q4f32_2", "mixed": "q4f32_2", "q8_0": "q8f32_2"},
    "rpi5": {"q4_1": "q4f32_2", "q4_0": "q4f32_2", "mixed": "q4f32_2", "q8_0": "q8f32_2"},
    "cuda-sm90": {"q4_1": "q4f16_2", "q4_0": "q4f16_0", "mixed": "q4f16_2", "q8_0": "q8f16_1"},
    "jetson-orin": {"q4_1": "q4f16_2", "q4_0": "q4f16_0", "mixed": "q4f16_2", "q8_0": "q8f16_1"},
    "metal": {"q4_1": "q4f16_2", "q4_0": "q4f16_0", "mixed": "q4f16_2", "q8_0": "q8f16_1"},
    "android": {"q4_1": "q4f16_2", "q4_0": "q4f16_0", "mixed": "q4f16_2", "q8_0": "q8f16_1"},
    "vulkan": {"q4_1": "q4f32_3", "q4_0": "q4f32_0", "mixed": "q4f32_3", "q8_0": "q8f32_1"},
}


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, checkpoints):
    from gguf_writer import write_gguf

    root = tmp_path_factory.mktemp("lossless")
    return {name: write_gguf(checkpoints["llama"], root / f"{name}.gguf", encode=_encoder(*spec, seed=i))
            for i, (name, spec) in enumerate(SOURCES.items())}


def _pack(path, preset):
    """(row choice, {HF float name: (row, dequantized packed weight)}, {HF float name: gguf's dequantization}) as
    compile_model packs the 2-D weights for `preset` with no --quant."""
    from edgellm.compile import CompileArgs, _pick_scheme, _plan
    from edgellm.loaders import open_model
    from edgellm.models import get_architecture
    from edgellm.quant.convert import convert
    from edgellm.targets import resolve

    src = open_model(path)
    model_cls, source_map = get_architecture(src.config)
    smap, _ = source_map(src.config)
    scheme, choice = _pick_scheme(resolve(preset), CompileArgs(model=str(path), output=path.parent / "x",
                                                               target=preset), src, smap, model_cls)
    plan = _plan(scheme, src, smap, model_cls, None)
    weights = {n: s for n, s in smap.items() if n.endswith(".weight") and len(src.tensors[s[0]].shape) == 2}
    rows = {n: plan.embedding if n == model_cls.EMBEDDING else plan.head if n == model_cls.HEAD else plan.layers
            for n in weights}
    params, shapes = {}, {}
    for n, srcs in weights.items():
        out_f = sum(src.tensors[s].shape[0] for s in srcs)
        in_f = src.tensors[srcs[0]].shape[1]
        shapes[n], r, base = (out_f, in_f), rows[n], n[: -len(".weight")]
        params[f"{base}.q_weight"] = ((out_f, in_f // r.elems_per_word), "uint32")
        params[f"{base}.q_scale"] = ((out_f, in_f // r.group_size), r.scale_dtype)
        if r.zero_point:
            params[f"{base}.q_min"] = ((out_f, in_f // r.group_size), r.scale_dtype)
    packed = dict(convert(src.tensors, weights, ["*"], params, shapes, scheme, {n: r for n, r in rows.items()}))
    got, want = {}, {}
    for n, srcs in weights.items():
        base, r = n[: -len(".weight")], rows[n]
        got[n] = (r, ref.dequantize(packed[f"{base}.q_weight"], packed[f"{base}.q_scale"], shapes[n][1], r,
                                    packed.get(f"{base}.q_min")))
        want[n] = np.concatenate([src.tensors[s].load() for s in srcs], axis=0)
    return choice, got, want


@pytest.mark.parametrize("preset", sorted(EXPECTED))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_default_row_repacks_bit_for_bit(gguf_files, preset, source):
    choice, got, want = _pack(gguf_files[source], preset)
    assert choice["scheme"] == EXPECTED[preset][source], choice
    assert choice["requested"] is None and ("lossless" in choice["why"] or "exactly" in choice["why"]), choice
    assert choice["source_layer_types"]  # recorded for the manifest
    for n, (row, w) in got.items():
        assert np.array_equal(w, want[n]), f"{preset} {source}: {n} in {row.name} differs from the GGUF's values"
    # the embedding / head keep their 8-bit (or 4-bit) source grids too
    emb = got["model.embed_tokens.weight"][0]
    assert emb.bits == 8


def test_float_round_trip_would_not_be_exact(gguf_files):
    """The hand-made blocks defeat re-quantization from the float values (so the test above measures the repack)."""
    from edgellm.loaders import open_model
    from edgellm.quant.schemes import get_scheme

    src = open_model(gguf_files["q4_0"])
    for name, row in (("model.layers.0.mlp.up_proj.weight", "q4f16_0"), ("model.embed_tokens.weight", "q8f16_1")):
        w, s = src.tensors[name].load(), get_scheme(row)
        parts = ref.quantize(w, s)
        assert not np.array_equal(ref.dequantize(parts[0], parts[1], w.shape[1], s), w), name
    w, s = src.tensors["model.layers.0.mlp.up_proj.weight"].load(), get_scheme("q4f32_2")
    qw, qs, qm = ref.quantize(w, s)
    assert not np.array_equal(ref.dequantize(qw, qs, w.shape[1], s, qm), w)


def test_quant_flag_overrides_the_pick(gguf_files):
    from edgellm.compile import CompileArgs, _pick_scheme
    from edgellm.loaders import open_model
    from edgellm.models import get_architecture
    from edgellm.targets import resolve

    path = gguf_files["q4_1"]
    src = open_model(path)
    model_cls, source_map = get_architecture(src.config)
    smap, _ = source_map(src.config)
    scheme, choice = _pick_scheme(resolve("cuda-sm90"), CompileArgs(model=str(path), output=path.parent / "x",
                                                                    target="cuda-sm90", quant="q4f16_1"),
                                  src, smap, model_cls)
    assert scheme.name == "q4f16_1" and choice["why"] == "--quant" and choice["source_layer_types"] == {"Q4_1": 14}
