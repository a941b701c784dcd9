"""GPTQ and AWQ import (issue 14 item 4): tiny Llama checkpoints written here in each format from known float weights,
compiled with no --quant, must (1) pick the exact import row, (2) hold packed params that dequantize bit for bit to
the source's (q - z) * s, and (3) give the numpy model's logits on those weights.

The packers below are written from the formats' specs (auto-gptq / GPTQModel `pack`, AutoAWQ `WQLinear_GEMM.
from_linear`), not from edgellm's reader: GPTQ packs q along `in` (nibble j of qweight[i, o] = q[8i + j, o]) and the
zeros along `out`, v1 storing zero - 1; AWQ packs both along `out` in the order [0, 2, 4, 6, 1, 3, 5, 7].

transformers cannot read these checkpoints here: it needs gptqmodel (GPTQ) or autoawq (AWQ), neither of which is
installed (both build CUDA / torch extensions), so the reference is numpy (models/reference.py) on the weights the
packers started from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgellm.artifact import Artifact
from edgellm.cli import cli
from edgellm.compile import CompileArgs, compile_model
from edgellm.config import ModelConfig, RuntimeOptions
from edgellm.device_runners.engine import Engine
from edgellm.loaders import SourceError, open_model
from edgellm.models.reference import float_weights, forward, int8_linear
from edgellm.quant import get_scheme
from edgellm.quant.reference import dequantize

PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
# hidden 256 / intermediate 384: two and three groups of 128; GQA 2:1; untied fp32 head
SPEC = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
# linears that share their input share GPTQ's Hessian, hence its act-order permutation
SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu", "up_proj": "gu",
                "down_proj": "down"}


# ---- the formats, from their specs -----------------------------------------------------------------------------

def quantize_rtn(w: np.ndarray, g_idx: np.ndarray, groups: int, sym: bool, min_zero: int):
    """GPTQ's grid without the Hessian step, per group of input columns: scale = (max(0, hi) - min(0, lo)) / 15,
    zero = round(-lo' / scale) (8 when sym), q = clamp(round(w / scale) + zero, 0, 15). w [out, in] ->
    q [out, in], zero int [groups, out], scale fp16 [groups, out]."""
    out_f, _ = w.shape
    q = np.zeros(w.shape, np.int64)
    zero = np.zeros((groups, out_f), np.int64)
    scale = np.zeros((groups, out_f), np.float16)
    for g in range(groups):
        cols = np.nonzero(g_idx == g)[0]
        wg = w[:, cols]
        lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
        if sym:
            hi = np.maximum(np.abs(lo), hi)
            lo = -hi
        s = ((hi - lo) / 15).astype(np.float16)
        s = np.where(s == 0, np.float16(1e-3), s)
        z = np.full(out_f, 8) if sym else np.clip(np.round(-lo / s.astype(np.float32)), min_zero, 15).astype(np.int64)
        q[:, cols] = np.clip(np.round(wg / s.astype(np.float32)[:, None]) + z[:, None], 0, 15)
        zero[g], scale[g] = z, s
    return q, zero, scale


def pack_gptq(q, zero, scale, g_idx, v1: bool) -> dict[str, np.ndarray]:
    """auto-gptq QuantLinear.pack: qweight [in/8, out] along in, qzeros [G, out/8] along out (v1: zero - 1)."""
    intw = q.T.astype(np.uint32)  # [in, out]
    qweight = np.zeros((intw.shape[0] // 8, intw.shape[1]), np.uint32)
    for j in range(8):
        qweight |= intw[j::8] << np.uint32(4 * j)
    zs = (zero - (1 if v1 else 0)).astype(np.uint32)
    qzeros = np.zeros((zs.shape[0], zs.shape[1] // 8), np.uint32)
    for j in range(8):
        qzeros |= (zs[:, j::8] & np.uint32(15)) << np.uint32(4 * j)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scale,
            "g_idx": g_idx.astype(np.int32)}


def pack_awq(q, zero, scale) -> dict[str, np.ndarray]:
    """AutoAWQ WQLinear_GEMM: qweight [in, out/8] and qzeros [G, out/8], both along out in AWQ_ORDER."""
    def along_out(v):  # v [rows, out] -> [rows, out/8]
        v = v.astype(np.uint32)
        words = np.zeros((v.shape[0], v.shape[1] // 8), np.uint32)
        for i in range(8):
            words |= v[:, AWQ_ORDER[i]::8] << np.uint32(4 * i)
        return words.view(np.int32)

    return {"qweight": along_out(q.T), "qzeros": along_out(zero), "scales": scale}


# ---- tiny checkpoints -------------------------------------------------------------------------------------------

def _float_model(seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5,
                               bos_token_id=1, eos_token_id=2, **SPEC)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return cfg.to_dict(), {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def write_checkpoint(out: Path, method: str, group: int, act_order: bool = False, v1: bool = True,
                     sym: bool = True, seed: int = 0, head: bool = False) -> dict[str, np.ndarray]:
    """A tiny Llama in `method` (gptq | awq), the untied lm_head packed too when `head` (GPTQModel's lm_head=True);
    returns {X.weight: float32 (q - z) * s} of every packed linear."""
    from safetensors.numpy import save_file
    from tiny_models import _tokenizer

    cfg, sd = _float_model(seed)
    rng = np.random.default_rng(seed)
    tensors, deq, perms = {}, {}, {}
    for name, w in sd.items():
        part = name.split(".")
        if (len(part) == 6 and part[3] in LINEARS and part[4] in LINEARS[part[3]]) or (head and name == "lm_head.weight"):
            prefix, in_f = name[: -len(".weight")], w.shape[1]
            groups = -(-in_f // group)
            if act_order:
                key = (part[2], SHARED_INPUT[part[4]]) if len(part) == 6 else "lm_head"
                perm = perms.setdefault(key, rng.permutation(in_f))
                g_idx = np.empty(in_f, np.int64)
                g_idx[perm] = np.arange(in_f) // group
            else:
                g_idx = np.arange(in_f) // group
            q, zero, scale = quantize_rtn(w, g_idx, groups, sym, 1 if v1 else 0)
            packed = pack_gptq(q, zero, scale, g_idx, v1) if method == "gptq" else pack_awq(q, zero, scale)
            tensors.update({f"{prefix}.{k}": v for k, v in packed.items()})
            deq[name] = ((q - zero.T[:, g_idx]) * scale.T[:, g_idx].astype(np.float32)).astype(np.float32)
        else:
            tensors[name] = w
    qc = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": sym,
           "checkpoint_format": "gptq" if v1 else "gptq_v2"} if method == "gptq" else
          {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    _tokenizer(out, 320)
    return deq


VARIANTS = {  # name -> (write_checkpoint kwargs, the CPU row it must pick)
    "gptq_g128": (dict(method="gptq", group=128), "q4f32_g128"),
    "gptq_g32_act_v2": (dict(method="gptq", group=32, act_order=True, v1=False, sym=False, head=True),
                        "q4f32_g32_ao"),
    "awq_g128": (dict(method="awq", group=128, sym=False, v1=False), "q4f32_g128"),
    "gptq_g128_act": (dict(method="gptq", group=128, act_order=True, sym=False), "q4f32_g128_ao"),
    "gptq_g32_v2_asym": (dict(method="gptq", group=32, v1=False, sym=False), "q4f32_g32"),
}
COMPILED = ["gptq_g32_act_v2", "awq_g128"]  # host builds; test_cuda_build compiles gptq_g128_act for CUDA


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """name -> (checkpoint, artifact, {X.weight: the source's dequantized weight}), compiled lazily for the host."""
    root = tmp_path_factory.mktemp("gptq_awq")
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            kwargs, _ = VARIANTS[name]
            deq = write_checkpoint(root / name, **kwargs)
            art = root / f"{name}-art"
            compile_model(CompileArgs(model=str(root / name), output=art,
                                      runtime=RuntimeOptions(context_window=64, prefill_chunk=32)))
            cache[name] = (root / name, art, deq)
        return cache[name]

    return get


def _fused(deq: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The source's dequantized linears under edgellm's fused names (qkv_proj, gate_up_proj)."""
    out = {}
    for i in range(SPEC["num_hidden_layers"]):
        p = f"model.layers.{i}"
        a, m = f"{p}.self_attn", f"{p}.mlp"
        out[f"{a}.qkv_proj.weight"] = np.concatenate([deq[f"{a}.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")])
        out[f"{a}.o_proj.weight"] = deq[f"{a}.o_proj.weight"]
        out[f"{m}.gate_up_proj.weight"] = np.concatenate([deq[f"{m}.{n}.weight"] for n in ("gate_proj", "up_proj")])
        out[f"{m}.down_proj.weight"] = deq[f"{m}.down_proj.weight"]
    if "lm_head.weight" in deq:  # a packed head keeps the layers' row (4-bit source), act-order included
        out["lm_head.weight"] = deq["lm_head.weight"]
    return out


def _assert_bit_exact(art: Artifact, deq: dict[str, np.ndarray], row) -> None:
    """Every packed linear of `art` dequantizes (numpy reference) bit for bit to the source's (q - z) * s; act-order
    rows hold a true permutation and the columns in its order."""
    raw = {e["name"]: np.asarray(a) for e, a in art.iter_params()}
    for wname, want in _fused(deq).items():
        base = wname[: -len(".weight")]
        got = dequantize(raw[f"{base}.q_weight"], raw[f"{base}.q_scale"], want.shape[1], row, raw[f"{base}.q_min"])
        if row.act_order:
            perm = raw[f"{base}.q_perm"]
            assert sorted(perm.tolist()) == list(range(want.shape[1])) and not np.array_equal(perm, np.sort(perm))
            want = want[:, perm]
        else:
            assert f"{base}.q_perm" not in raw
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32)), wname


@pytest.mark.parametrize("name", COMPILED)
def test_import_is_bit_exact_and_matches_numpy(builds, name):
    _, art_path, deq = builds(name)
    art = Artifact.open(art_path)
    quant = art.manifest["quant"]
    row = get_scheme(VARIANTS[name][1])
    assert quant["scheme"] == row.name  # picked from the checkpoint, no --quant
    _assert_bit_exact(art, deq, row)
    layers = quant["classes"]["layers"]
    assert layers["scheme"] == row.name and row.bits_per_weight() == 4 + 64 / row.group_size
    assert quant["classes"]["head"]["scheme"] == (row.name if VARIANTS[name][0].get("head") else "q8f32_2")
    # the compiled model against the numpy model: int8 activations exactly as the kernels take them (5e-2: int8
    # rounding noise, as test_precision), and against fp32 activations on the source's own dequantized weights
    cfg = ModelConfig.from_dict(art.manifest["model"]["config"])
    got = Engine(art_path).score(PROMPT)
    ref = forward(cfg, float_weights(art), PROMPT, linear=int8_linear(art))
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 5e-2
    with Engine(art_path).sequence() as seq:  # decode (GEMV kernels, the gather per token) agrees with prefill
        steps = np.stack([seq.prefill(PROMPT[:4])] + [seq.decode(t) for t in PROMPT[4:]])
    assert float(np.abs(steps - got[3:]).max() / np.abs(got).max()) < 5e-2
    fw = float_weights(art)
    for wname, w in _fused(deq).items():
        assert np.array_equal(fw[wname], w), wname  # float_weights un-permutes act-order columns
    ref32 = forward(cfg, fw, PROMPT, linear=lambda x, n: x @ fw[n].T)
    assert float(np.abs(got - ref32).max() / np.abs(ref32).max()) < 0.15
    assert (got.argmax(-1) == ref32.argmax(-1)).mean() >= 0.75


def test_loader_reads_each_layout(tmp_path):
    """The reader alone (no compile): every variant's PackedRef dequantizes to the packer's (q - z) * s."""
    for name, (kwargs, _) in VARIANTS.items():
        deq = write_checkpoint(tmp_path / name, **kwargs, seed=1)
        src = open_model(tmp_path / name)
        for wname, want in deq.items():
            ref = src.tensors[wname]
            assert ref.shape == want.shape and np.array_equal(ref.load(), want), (name, wname)
            assert ref.act_order == kwargs.get("act_order", False)


@pytest.mark.parametrize("field,value,words", [
    ("bits", 8, "bits=8"), ("checkpoint_format", "marlin", "checkpoint_format='marlin'"),
    ("group_size", -1, "group_size=-1"), ("quant_method", "exl2", "quant_method='exl2'"),
])
def test_unsupported_variants_are_refused_in_one_line(tmp_path, field, value, words):
    write_checkpoint(tmp_path / "m", method="gptq", group=128)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError) as e:
        open_model(tmp_path / "m")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_awq_gemv_and_v1_zero_wrap_are_refused(tmp_path):
    write_checkpoint(tmp_path / "awq", method="awq", group=128, sym=False, v1=False)
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (tmp_path / "awq" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="version='gemv'"):
        open_model(tmp_path / "awq")
    # gptq v1 with a zero point of 0: the old packer stored -1 (nibble 15), which runtimes disagree on
    from safetensors.numpy import load_file, save_file

    write_checkpoint(tmp_path / "v1", method="gptq", group=32)
    f = tmp_path / "v1" / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.1.mlp.down_proj.qzeros"
    t[name] = (t[name].view(np.uint32) | np.uint32(0xF0)).view(np.int32)  # column 1 of every group: stored 15
    save_file(t, str(f))
    src = open_model(tmp_path / "v1")
    with pytest.raises(SourceError, match="down_proj.qzeros.*gptq_v2"):
        src.tensors["model.layers.1.mlp.down_proj.weight"].packed()


def test_scales_and_words_that_no_row_holds_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    deq = write_checkpoint(tmp_path / "m", method="gptq", group=128)
    f = tmp_path / "m" / "model.safetensors"
    t = load_file(str(f))
    name = "model.layers.0.mlp.up_proj"
    t[f"{name}.scales"] = t[f"{name}.scales"].astype(np.float32)  # fp32 holding fp16 values: still exact
    save_file(t, str(f))
    assert np.array_equal(open_model(tmp_path / "m").tensors[f"{name}.weight"].load(), deq[f"{name}.weight"])
    t[f"{name}.scales"][0, 0] *= np.float32(1 + 2**-20)  # a value fp16 cannot hold
    save_file(t, str(f))
    with pytest.raises(SourceError, match="up_proj.scales are float32"):
        open_model(tmp_path / "m").tensors[f"{name}.weight"].packed()
    t[f"{name}.scales"] = t[f"{name}.scales"].astype(np.float16)
    t[f"{name}.qweight"] = t[f"{name}.qweight"].astype(np.int64)  # another pack_dtype: another layout
    save_file(t, str(f))
    with pytest.raises(SourceError, match="up_proj.qweight is I64"):
        open_model(tmp_path / "m")


def test_other_quant_is_refused_or_dequantized(tmp_path):
    ckpt = tmp_path / "gptq_g128"
    write_checkpoint(ckpt, method="gptq", group=128)
    r = CliRunner().invoke(cli, ["compile", str(ckpt), "-q", "q4f32_2", "-o", str(tmp_path / "x")])
    err = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(err) == 1 and "q4f32_g128" in err[0] and "lose" in err[0]
    assert not (tmp_path / "x").exists()
    # a wider row is re-quantized from the dequantized weights (q0f32 holds them exactly: the loader test)
    from edgellm.quant.gptq_awq import source_scheme

    src = open_model(ckpt)
    for quant in ("q0f32", "q8f32_2", "q4f32_g128_ao"):
        assert source_scheme(src.tensors, "llvm", True, quant, get_scheme(quant), "m") is get_scheme(quant)
    assert source_scheme(src.tensors, "cuda", True, None, get_scheme("q4f16_1"), "m").name == "q4f16_g128"


def test_cuda_build_is_bit_exact(tmp_path):
    """GPTQ g128 act-order (v1 zeros) for CUDA (nvcc, no GPU needed): the GPU row (fp16 activations, the gather on
    the device) with params that dequantize bit for bit to the source. Its numerics on a GPU:
    bench/gpu_gptq_check.py."""
    import shutil

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    kwargs, _ = VARIANTS["gptq_g128_act"]
    deq = write_checkpoint(tmp_path / "ckpt", **kwargs)
    out = tmp_path / "cuda"
    compile_model(CompileArgs(model=str(tmp_path / "ckpt"), output=out, target="cuda-sm90",
                              runtime=RuntimeOptions(context_window=64, prefill_chunk=32)))
    cuda = Artifact.open(out)
    assert cuda.manifest["quant"]["scheme"] == "q4f16_g128_ao"
    assert cuda.manifest["quant"]["per_tensor"]["lm_head.weight"] == "q8f16_1"  # the fp32 head stays 8-bit
    _assert_bit_exact(cuda, deq, get_scheme("q4f16_g128_ao"))
