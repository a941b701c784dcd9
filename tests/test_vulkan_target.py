"""`--target vulkan` end to end on lavapipe (Mesa's software Vulkan device; scripts/test.sh installs it): the
compile pipeline builds host code plus WGSL, `Engine` / `edgellm run` load it through the WebGPU plugin
(docs/vulkan.md), and the results equal the host build, the numpy model and the known answer.

Artifacts are built once per module (tiny models: ~6 s each; the real SmolLM2: ~20 s) and shared by the tests.
Tests that need a device skip only when wgpu-native finds no Vulkan adapter.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgellm.artifact import Artifact
from edgellm.cli import cli
from edgellm.compile import CompileArgs, compile_model
from edgellm.config import ModelConfig, RuntimeOptions
from edgellm.device_runners.engine import Engine
from edgellm.kernels import KernelOptions
from edgellm.models.reference import float_weights, forward
from edgellm.runtime import webgpu_plugin
from edgellm.runtime.devices import DeviceError

pytestmark = pytest.mark.vulkan

PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]
STEPS = 16
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def adapter():
    try:
        webgpu_plugin.load_plugin()
    except webgpu_plugin.PluginError as e:
        if e.reason == "vulkan":
            pytest.skip(f"no Vulkan adapter: {e}")
        raise
    return webgpu_plugin.adapters()[0]


@pytest.fixture(scope="module")
def vk(checkpoints, tmp_path_factory):
    """vk(model, scheme) -> a --target vulkan artifact (max_batch 2), built once per module, without the 32-lane twin
    (--opt webgpu_subgroups=off: the default's main library is this build, tests/test_webgpu_subgroups.py checks
    that; the twin would only double the build here)."""
    root = tmp_path_factory.mktemp("vulkan")
    cache = {}

    def build(name: str, scheme: str):
        if (name, scheme) not in cache:
            out = root / f"{name}-{scheme}"
            src = None if name == "smollm2" else str(checkpoints[name])
            rt = RuntimeOptions(context_window=1024 if name == "smollm2" else 256, prefill_chunk=128, max_batch=2)
            compile_model(CompileArgs(model=src, output=out, target="vulkan", quant=scheme, runtime=rt,
                                      kernel_options=KernelOptions(webgpu_subgroups="off")))
            cache[(name, scheme)] = out
        return cache[(name, scheme)]

    return build


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _steps(eng: Engine, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Logits of a prefill of `prompt`, then of one decode step per token of `tokens`."""
    with eng.sequence() as seq:
        return np.stack([seq.prefill(prompt)] + [seq.decode(t) for t in tokens])


# ---- the preset ------------------------------------------------------------------------------------------------


def test_preset_is_listed_with_its_backend():
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["targets", "--json"]).stdout)}
    v = rows["vulkan"]
    assert v["device"] == "webgpu" and json.loads(v["target"])["kind"] == "webgpu"
    assert v["features"]["backend"] == "wgpu-native on Vulkan" and v["default_quant"] == "q4f32_1"
    assert v["export"] == "so" and v["toolchain"] == "host c++"


def test_manifest_records_target_and_activation_dtype(vk):
    m = Artifact.open(vk("llama", "q0f32")).manifest
    assert m["target"]["preset"] == "vulkan" and m["target"]["device"] == "webgpu" and m["lib"] == "lib/model.so"
    assert m["target"]["tvm_target"]["kind"] == "webgpu" and m["target"]["tvm_host"]["kind"] == "llvm"
    assert m["quant"]["act_dtype"] == "float32"
    assert m["kernels"]["chosen"]["linear_gemv"]  # the registry picked (and recorded) webgpu kernels
    # TVM's decode attention with a workgroup per query head (the tiny Llama's group is 2)
    assert m["kernels"]["chosen"]["attention_decode"] == ["attention_decode_tvm_q1"]


# ---- numerics on lavapipe ----------------------------------------------------------------------------------------


def test_q0f32_matches_host_build_over_prefill_and_16_decode_steps(adapter, vk, compiled):
    host = Engine(compiled("llama", "q0f32"))
    tokens = list(host.generate_ids(PROMPT, STEPS))
    ref = _steps(host, PROMPT, tokens[:-1])
    eng = Engine(vk("llama", "q0f32"))
    assert eng.device_info.kind == "webgpu" and eng.device_info.name == adapter["name"]
    got = _steps(eng, PROMPT, tokens[:-1])
    assert got.shape == (STEPS, ref.shape[1])
    assert np.abs(got - ref).max() < 1e-4
    assert list(eng.generate_ids(PROMPT, STEPS)) == tokens


def test_plugin_counters_flush_and_profile(adapter, vk):
    """The plugin's counters per greedy decode step: a submit every N dispatches (the GPU starts while the host
    records), one 4-byte read (the device argmax), a bind group per dispatch found or made; profile mode times every
    kernel on the GPU. The tokens do not depend on any of it."""
    from edgellm import _tvm

    g = _tvm.get_global_func
    stats, flush = g("edgellm.webgpu.stats"), g("edgellm.webgpu.set_flush_every")
    profile = g("edgellm.webgpu.set_profile")
    eng = Engine(vk("llama", "q0f32"))
    assert eng.has_device_argmax

    def step(every: int, prof: bool = False) -> tuple[int, dict]:
        with eng.sequence() as seq:
            tok = seq.decode_greedy(int(seq.prefill(PROMPT).argmax()))  # warm: pipelines and bind groups
            flush(0, every)
            profile(0, int(prof))
            stats(0, 1)
            try:
                tok = seq.decode_greedy(tok)
                return tok, json.loads(str(stats(0, 1)))
            finally:
                profile(0, 0)
                flush(0, 64)

    tok0, s0 = step(0)
    tok2, s2 = step(2)
    tok_p, sp = step(0, prof=True)
    assert tok0 == tok2 == tok_p
    n = s0["dispatches"]
    assert n > 10 and s2["dispatches"] == n and sp["dispatches"] == n
    assert s0["submits"] <= 2 and s2["submits"] >= n // 2  # flush 0: at the read only; flush 2: every 2 dispatches
    assert s0["reads"] == 1 and s0["bind_groups_created"] + s0["bind_group_hits"] == n
    assert s0["record_ns"] > 0 and not s0["kernels"]
    assert sum(c for c, _ in sp["kernels"].values()) == n and sp["passes"] == n
    assert "argmax_partial_kernel" in sp["kernels"] and "add_rms_norm_kernel" in sp["kernels"]


def test_greedy_chain_reads_each_token_while_the_next_step_runs(adapter, vk):
    """Engine.greedy_chain through Vulkan keeps one step queued ahead: step k + 1 is recorded and submitted on the
    device ids step k's argmax wrote before step k's token is read (the plugin's async read), and the tokens equal
    the step-by-step chain's over 40 steps (three KV pages). Closed early, the queued step drains into the cache."""
    from edgellm import _tvm

    eng = Engine(vk("llama", "q0f32"))
    n = 40
    with eng.sequence() as seq:
        tok = int(seq.prefill(PROMPT).argmax())
        eng.decode_ahead = False
        ref = list(seq.greedy_chain(tok, n))
    eng.decode_ahead = True
    begin, end = eng._webgpu_reads()
    calls = []

    def rec_begin(t):
        calls.append("b")
        return begin(t)

    def rec_end(d, ticket):
        calls.append("e")
        return end(d, ticket)

    eng._reads = (rec_begin, rec_end)
    with eng.sequence() as seq:
        assert int(seq.prefill(PROMPT).argmax()) == tok
        assert list(seq.greedy_chain(tok, n)) == ref
        assert seq.length == len(PROMPT) + n
    assert calls == ["b", "b"] + ["e", "b"] * (n - 2) + ["e", "e"]  # step k + 1 queued before token k is read
    with eng.sequence() as seq:
        seq.prefill(PROMPT)
        chain = seq.greedy_chain(tok, 30)
        assert [next(chain) for _ in range(5)] == ref[:5]
        chain.close()  # steps 0..5 ran: the 6th (feeding ref[4]) was queued when ref[4] came back
        assert seq.length == len(PROMPT) + 6
        assert list(seq.greedy_chain(ref[5], 4)) == ref[6:10]
    g = _tvm.get_global_func
    stats, flush = g("edgellm.webgpu.stats"), g("edgellm.webgpu.set_flush_every")
    flush(0, 2)  # batches of 2 dispatches, except while queued ahead: a step is submitted whole at its read
    try:
        with eng.sequence() as seq:
            seq.prefill(PROMPT)
            stats(0, 1)
            assert list(seq.greedy_chain(tok, 8)) == ref[:8]
            s = json.loads(str(stats(0, 1)))
    finally:
        flush(0, 64)
    per_step = s["dispatches"] // 8
    # step 0 in batches of 2 (nothing queued ahead yet), steps 1-7 one submit each (at their reads)
    assert s["reads"] == 8 and per_step > 10 and s["submits"] <= (per_step + 1) // 2 + 1 + 7, s
    with pytest.raises(ValueError, match="not outstanding"):
        g("edgellm.webgpu.read_end")(0, 10**9)
    with pytest.raises(ValueError, match="webgpu tensor"):
        g("edgellm.webgpu.read_begin")(_tvm.tensor(np.zeros(4, np.int32), _tvm.runtime.cpu()))


# llama3: rope scaling (the build needs tirx.disable_cse_tir) and a tied head; qwen2: q/k/v bias and `in` padded
# to whole groups. q4f16_1 runs fp16 activations (lavapipe has shader-f16).
@pytest.mark.parametrize("name,scheme,tol", [("llama3", "q4f32_1", 1e-4), ("qwen2", "q4f16_1", 2e-2)])
def test_q4_matches_numpy_model(adapter, vk, name, scheme, tol):
    if scheme == "q4f16_1" and not adapter["shader_f16"]:
        pytest.skip(f"adapter {adapter['name']} has no shader-f16")
    art = Artifact.open(vk(name, scheme))
    if name == "llama3":  # the webgpu kernels of the registry are among the ones checked here
        chosen = art.manifest["kernels"]["chosen"]
        assert "gemm_tiled_webgpu" in chosen["linear"] and "int4_gemv_dp4a_webgpu" in chosen["linear_gemv"]
        assert chosen["add_rms_norm"] == ["add_rms_norm_webgpu"] and chosen["argmax"] == ["argmax_two_stage"]
    cfg = ModelConfig.from_dict(art.manifest["model"]["config"])
    ref = forward(cfg, float_weights(art), PROMPT)
    eng = Engine(art.root)
    got = eng.score(PROMPT)
    assert _rel(got, ref) < tol
    # the decode path (GEMV kernels) agrees with the prefill path (GEMM kernels) position by position; the default
    # dp4a GEMV rounds activations to int8 (a scale per 8): its own exact model is tests/test_webgpu_dp4a.py
    steps = _steps(eng, PROMPT[:4], PROMPT[4:])
    dp4a = any("dp4a" in k for k in art.manifest["kernels"]["chosen"]["linear_gemv"])
    assert _rel(steps, got[3:]) < (max(tol, 2e-2) if dp4a else tol)


def test_paged_kv_cache_two_sequences(adapter, vk):
    """Two sequences in one paged cache: prefills of different lengths (one over several 16-token pages), batched
    decode steps of both, and a second prefill chunk on cached pages; each equals the sequence run alone."""
    eng = Engine(vk("llama", "q0f32"))
    a_ids, b_ids = PROMPT * 3, PROMPT[:5]  # 39 tokens: three pages
    a_tok, b_tok = [11, 12, 13, 14], [21, 22, 23, 24]
    alone_a = _steps(eng, a_ids, a_tok)
    alone_b = _steps(eng, b_ids + b_tok[:1], b_tok[1:])  # b's last step is a 1-token prefill chunk, below
    a, b = eng.add_sequence(), eng.add_sequence()
    try:
        got_a, got_b = [eng.prefill(a, a_ids)], [eng.prefill(b, b_ids)]
        for i in range(3):
            la, lb = eng.decode([a, b], [a_tok[i], b_tok[i]], batched=True)
            got_a.append(la)
            got_b.append(lb)
        got_a.append(eng.decode([a], [a_tok[3]], batched=False)[0])
        got_b.append(eng.prefill(b, b_tok[3:]))  # prefill on top of cached pages
        assert eng.sequence_length(a) == len(a_ids) + 4 and eng.sequence_length(b) == len(b_ids) + 4
    finally:
        eng.remove_sequence(a)
        eng.remove_sequence(b)
    np.testing.assert_allclose(np.stack(got_a), alone_a, atol=1e-5, rtol=0)
    # b alone: prefill(b_ids + first token) then 3 decodes; together: prefill, 3 decodes, a 1-token chunk
    np.testing.assert_allclose(np.stack(got_b)[1:], alone_b, atol=1e-5, rtol=0)
    assert eng.pages_in_use() == 0


def test_kernel_options_pick_the_generic_webgpu_kernels(monkeypatch):
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant import get_scheme
    from edgellm.targets import resolve

    # the picks only: a kernel is recorded, not built (its TVMScript took ~35 s of this test; the builds: the
    # end-to-end tests above and tests/test_webgpu_*.py)
    def pick_only(self, key, op, name, build):
        self.chosen[op].add(name)
        return name

    monkeypatch.setattr(KernelRegistry, "_once", pick_only)

    scheme, target = get_scheme("q4f16_1"), resolve("vulkan").tvm()
    for opts, gemv, gemm in ((KernelOptions(), "int4_gemv_dp4a_webgpu", "gemm_tiled_webgpu"),
                             (KernelOptions(webgpu_gemv="h2"), "int4_gemv_h2_webgpu", "gemm_tiled_webgpu"),
                             (KernelOptions(webgpu_gemv="coalesced"), "int4_gemv_coalesced_webgpu",
                              "gemm_tiled_webgpu"),
                             (KernelOptions(webgpu_gemv="group"), "int4_gemv_group_webgpu", "gemm_tiled_webgpu"),
                             (KernelOptions(webgpu_gemv="simple", webgpu_gemm="simple"), "gemv_te_gpu",
                              "gemm_te_gpu")):
        reg = KernelRegistry(target, opts)
        reg.linear(1, 128, 256, scheme, "float16", False)
        reg.linear(None, 128, 256, scheme, "float16", False)
        assert reg.chosen["linear_gemv"] == {gemv} and reg.chosen["linear"] == {gemm}
    reg = KernelRegistry(target)
    reg.linear(1, 128, 256, get_scheme("q4f32_1"), "float32", False)  # fp32 activations: dp4a too
    assert reg.chosen["linear_gemv"] == {"int4_gemv_dp4a_webgpu"}
    reg = KernelRegistry(target, KernelOptions(webgpu_gemv="h2"))
    reg.linear(1, 128, 256, get_scheme("q4f32_1"), "float32", False)  # h2 needs fp16: the coalesced GEMV
    assert reg.chosen["linear_gemv"] == {"int4_gemv_coalesced_webgpu"}
    # the decode fusions (registry.fused_gemv, asked for by models/llama.py): auto = all
    for opts, norm_small, norm_big, silu in ((KernelOptions(), True, True, True),
                                             (KernelOptions(webgpu_fuse="all"), True, True, True),
                                             (KernelOptions(webgpu_fuse="silu"), False, False, True),
                                             (KernelOptions(webgpu_fuse="off"), False, False, False),
                                             (KernelOptions(webgpu_gemv="h2"), True, True, True),
                                             (KernelOptions(webgpu_gemv="coalesced"), False, False, False)):
        reg = KernelRegistry(target, opts)
        got = (reg.fused_gemv(2048, 512, scheme, "float16", False, 1e-5, False) is not None,
               reg.fused_gemv(4096, 512, scheme, "float16", False, 1e-5, False) is not None,
               reg.fused_gemv(2048, 1024, scheme, "float16", False, None, True) is not None)
        assert got == (norm_small, norm_big, silu), opts
        # fp32 activations: dp4a takes the fusions too; h2 (fp16 only) does not
        fp32 = reg.fused_gemv(2048, 1024, get_scheme("q4f32_1"), "float32", False, None, True)
        assert (fp32 is not None) == (silu and opts.webgpu_gemv in ("auto", "dp4a")), opts


def test_decode_attention_has_a_workgroup_per_query_head(monkeypatch):
    """The registry puts TVM's decode attention with bdy 1 in place of TVM's for webgpu: at the 8B's heads the grid
    is batch x 32 query heads (TVM's: batch x 8 KV heads, 4 heads a workgroup); TVM's own kernel where capping
    changes nothing (group 1), where it would not fit WebGPU's 64 threads in z (head_dim 8) and for the bench's A/B."""
    import re

    from edgellm._tvm import compiler
    from edgellm.kernels import KernelRegistry
    from edgellm.kernels import webgpu_attention as wa
    from edgellm.targets import resolve

    target = resolve("vulkan").tvm()
    shape = dict(v_head_dim=128, dtype="float16", attn_kind="mha", rope_inline=False, rope=None, rope_scaling={})

    def grid(func) -> dict[str, str]:  # thread axis -> extent
        found = re.findall(r'thread_binding\((\w+), thread="(\w+\.\w)"', func.script())
        return {axis: extent for extent, axis in found}

    reg = KernelRegistry(target)
    ours = reg.kv_cache_kernels(heads=32, kv_heads=8, head_dim=128, **shape)
    assert set(ours) == {"tir_attention_decode", "tir_attention_decode_sliding_window"}
    assert reg.chosen["attention_decode"] == {"attention_decode_tvm_q1"}
    assert grid(ours["tir_attention_decode"]) == {"blockIdx.x": "B", "blockIdx.y": "32", "threadIdx.x": "32",
                                                  "threadIdx.y": "1", "threadIdx.z": "8"}
    tvm = compiler().llm_kv_cache._attention_decode(8, 32, 128, "float16", False, {}, target)
    assert grid(tvm)["blockIdx.y"] == "8" and grid(tvm)["threadIdx.y"] == "4"
    for heads, kv_heads, head_dim in ((8, 8, 128), (4, 2, 8)):
        reg = KernelRegistry(target)
        assert reg.kv_cache_kernels(heads=heads, kv_heads=kv_heads, head_dim=head_dim, **shape) == {}
        assert reg.chosen["attention_decode"] == {"attention_decode_tvm"}
    monkeypatch.setattr(wa, "DECODE_BDY_MAX", None)
    reg = KernelRegistry(target)
    assert reg.kv_cache_kernels(heads=32, kv_heads=8, head_dim=128, **shape) == {}
    assert reg.chosen["attention_decode"] == {"attention_decode_tvm"}


def test_decode_source_patch_replaces_exactly_one_line():
    """patch_decode_source changes TVM's one `bdy = GROUP_SIZE` line and nothing else; a source without that line,
    or with two, is refused in one line that names the TVM pin."""
    import difflib
    import inspect
    from pathlib import Path

    from edgellm._tvm import PINNED_TVM, compiler
    from edgellm.kernels.webgpu_attention import patch_decode_source

    src = Path(inspect.getsourcefile(compiler().llm_kv_cache._attention_decode)).read_text()
    diff = [d for d in difflib.ndiff(src.splitlines(), patch_decode_source(src, 1).splitlines()) if d[0] in "+-"]
    assert diff == ["-     bdy = GROUP_SIZE", "+     bdy = min(GROUP_SIZE, 1)"]
    for bad in (src.replace("    bdy = GROUP_SIZE\n", "    bdy = GROUP_SIZE // 2\n"),
                src + "    bdy = GROUP_SIZE\n"):
        with pytest.raises(RuntimeError) as e:
            patch_decode_source(bad, 1)
        assert "\n" not in str(e.value) and f"apache-tvm=={PINNED_TVM}" in str(e.value)
    with pytest.raises(ValueError, match="at least 1"):
        patch_decode_source(src, 0)


# ---- the CLI ------------------------------------------------------------------------------------------------------


def _numpy_greedy_answer(path, question: str, n: int) -> str:
    """The numpy model of an fp32-activation artifact's packed weights (models/reference.py), greedy for n tokens
    after the chat-templated question, decoded as `edgellm run` prints it."""
    from edgellm.device_runners.text import TextCodec

    art = Artifact.open(path)
    m = art.info
    codec = TextCodec.of_artifact(art)
    cfg, w = ModelConfig.from_dict(art.manifest["model"]["config"]), float_weights(art)
    ids = codec.encode(codec.apply_chat_template([{"role": "user", "content": question}]), add_bos=False)
    new: list[int] = []
    for _ in range(n):
        t = int(forward(cfg, w, ids + new)[-1].argmax())
        if t in set(m.eos_token_ids):
            break
        new.append(t)
    return codec.decode(new).strip()


def test_smollm2_default_answers_through_edgellm_run(adapter, tmp_path):
    """What `edgellm compile --target vulkan` picks (SmolLM2-135M GGUF: q4f32_3, the file's Q4_1 grid with fp32
    activations) answers the question on Vulkan, word for word as the numpy model of the same packed weights does
    (a host build of the scheme was the comparison until CI time asked for one SmolLM2 build less). Without the
    32-lane twin library (`webgpu_subgroups=off`: lavapipe's subgroups are narrower, so the default build's runner
    loads the same lib/model.so; tests/test_webgpu_subgroups.py covers the twin): one SmolLM2 build less again."""
    out = tmp_path / "smollm2-vulkan"
    r = CliRunner().invoke(cli, ["compile", "--target", "vulkan", "-o", str(out), "--context-window", "512",
                                 "--prefill-chunk", "64", "--opt", "webgpu_subgroups=off"])
    assert r.exit_code == 0, r.output + r.stderr
    assert Artifact.open(out).manifest["quant"]["scheme"] == "q4f32_3"
    r = CliRunner().invoke(cli, ["run", str(out), QUESTION, "-n", "12", "--device", "vulkan:0"])
    assert r.exit_code == 0, r.output + r.stderr
    answer = r.stdout.strip()
    assert answer.startswith("The capital of France is Paris")
    assert answer == _numpy_greedy_answer(out, QUESTION, 12)
    assert f"device vulkan:0 {adapter['name']}" in r.stderr and adapter["driver"] in r.stderr


def test_bench_records_name_the_adapter(adapter, vk):
    r = CliRunner().invoke(cli, ["bench", str(vk("llama", "q0f32")), "-p", "8", "-n", "4", "--reps", "1",
                                 "--warmup", "0", "--format", "json", "--device", "vulkan:0"])
    assert r.exit_code == 0, r.output + r.stderr
    recs = json.loads(r.stdout)
    assert [x["test"] for x in recs] == ["pp8", "tg4"]
    assert all(adapter["name"] in x["device"] and adapter["driver"] in x["device"] for x in recs)


def _one_line_error(args) -> str:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.output + r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_device_errors_are_one_line(adapter, vk, compiled):
    art = str(vk("llama", "q0f32"))
    err = _one_line_error(["run", art, "hi", "-n", "1", "--device", "vulkan:7"])
    assert "vulkan:7" in err and "no such Vulkan adapter" in err and adapter["name"] in err
    err = _one_line_error(["run", str(compiled("llama", "q0f32")), "hi", "-n", "1", "--device", "vulkan:0"])
    assert "compiled for cpu" in err and "--target vulkan" in err
    err = _one_line_error(["run", art, "hi", "-n", "1", "--device", "vulkan:x"])
    assert "must be a number" in err


def test_fp16_artifact_refused_without_shader_f16(adapter, vk, monkeypatch):
    art = vk("qwen2", "q4f16_1")
    real = webgpu_plugin.adapters
    monkeypatch.setattr(webgpu_plugin, "adapters", lambda: [{**a, "shader_f16": False} for a in real()])
    with pytest.raises(DeviceError, match=r"fp16 activations \(q4f16_1\).*no shader-f16.*--quant q4f32_1"):
        Engine(art)
    err = _one_line_error(["run", str(art), "hi", "-n", "1"])
    assert "shader-f16" in err
    # fp32 activations, but the 8-bit embedding keeps fp16 scales: WGSL reads them only with the f16 extension
    # (seen on Mesa's arm64 lavapipe, which has no shader-f16: the first kernel's WGSL compile failed)
    art32 = Artifact.open(vk("llama3", "q4f32_1"))
    assert any(e["dtype"] == "float16" for e in art32.param_index())
    with pytest.raises(DeviceError, match=r"weight \S+ is stored in float16.*no shader-f16.*--head q4"):
        Engine(art32.root)
    # the GGUF Q4_1 grid's Vulkan row keeps fp16 scale + min in every layer: --head q4 alone would not do
    art_grid = Artifact.open(vk("llama3", "q4f32_3"))
    with pytest.raises(DeviceError, match=r"weight model\.layers\.\S+ is stored in float16 \(q4f32_3 .*no shader-f16"
                                          r".*--quant q4f32_1 --head q4"):
        Engine(art_grid.root)


def test_weight_over_the_binding_limit_is_refused(adapter, vk, monkeypatch):
    real = webgpu_plugin.adapters
    monkeypatch.setattr(webgpu_plugin, "adapters",
                        lambda: [{**a, "max_storage_buffer_binding_size": 1024} for a in real()])
    with pytest.raises(DeviceError, match=r"weight \S+ is .* over Vulkan adapter .*binding limit"):
        Engine(vk("llama", "q0f32"))


def test_missing_compiler_or_driver_is_one_line(adapter, vk, monkeypatch):
    """With the plugin not yet loaded in the process: no C++ compiler, then no Vulkan adapter."""
    art = str(vk("llama", "q0f32"))
    monkeypatch.setattr(webgpu_plugin, "_loaded", None)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    err = _one_line_error(["run", art, "hi", "-n", "1"])
    assert "/nonexistent/c++" in err and "install g++" in err
    monkeypatch.delenv("CXX")  # the cached library loads again (dlopen of a loaded library is a no-op)
    monkeypatch.setattr(webgpu_plugin, "adapters", lambda: [])
    err = _one_line_error(["run", art, "hi", "-n", "1"])
    assert "Vulkan" in err and ("driver" in err or "loader" in err)

