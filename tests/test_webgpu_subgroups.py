"""Subgroup reductions in the WebGPU decode GEMVs (`--opt webgpu_subgroups=N`, kernels/webgpu_linear.py `sg`) on a
Vulkan device (lavapipe in CI: 8 lanes a subgroup on AVX2, 16 on AVX-512): the plugin's probe of how many
consecutive lanes share a subgroup, each kernel with its sums met by xor shuffles against the same kernel without
them, a width past the probe's giving wrong sums (so the shuffles really run), and the load-time refusal.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def lanes(webgpu_dev):
    from edgellm.runtime.webgpu_plugin import subgroup_lanes

    n = subgroup_lanes(0)
    assert n in (1, 2, 4, 8, 16, 32)
    assert subgroup_lanes(0) == n  # cached, and the probe is deterministic
    if n < 4:
        pytest.skip(f"adapter keeps only {n} consecutive lanes in a subgroup")
    return n


def _build(kind: str, case: dict, sg: int):
    from edgellm.kernels.webgpu_linear import int4_gemv_dp4a, int4_gemv_h2

    f = int4_gemv_h2 if kind == "h2" else int4_gemv_dp4a
    return f(**case, sg=sg)


def _args(case: dict):
    from edgellm.quant import get_scheme
    from edgellm.quant.reference import quantize

    in_f, out_f = case["in_f"], case["out_f"]
    scheme = get_scheme("q8f16_1" if case.get("bits") == 8 else "q4f16_1")
    rng = np.random.default_rng(in_f * 7 + out_f)
    qw, qs = quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    x, dl = (rng.standard_normal((2, 1, in_f)) * 2).astype(np.float16)
    n_out = out_f // 2 if case.get("silu") else out_f
    if case.get("norm_eps") is not None:
        w = (rng.random(in_f) + 0.5).astype(np.float16)
        head = [x, dl, w]
    else:
        head = [x]
    bias = [rng.standard_normal(out_f).astype(np.float16)] if case["bias"] else []
    tail = [np.zeros((1, in_f), np.float16)] if case.get("norm_eps") is not None else []
    return head + [qw, qs.astype(np.float16)] + bias + [np.zeros((1, n_out), np.float16)] + tail, len(head) + 2 + len(bias)


def _run(webgpu_dev, tmp_path, func, args, name):
    from edgellm._tvm import compiler, load_module, runtime

    c = compiler()
    path = tmp_path / f"{name}.so"
    c.tvm.compile(c.tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                  target=c.Target("webgpu", host="llvm")).export_library(str(path))
    mod = load_module(path)
    tensors = [runtime.tensor(a, webgpu_dev) for a in args]
    mod["main"](*tensors)
    return mod.imports[0].inspect_source(), [t.numpy() for t in tensors]


CASES = [
    ("h2", dict(in_f=2048, out_f=600, bias=False, warps=8, rows=2, unroll=1)),  # 2 steps, clamped rows
    ("h2", dict(in_f=288, out_f=70, bias=True)),                               # 9 groups, bias
    ("h2", dict(in_f=1024, out_f=4096, bias=False, norm_eps=1e-5)),            # the norm's sum of squares
    ("h2", dict(in_f=544, out_f=400, bias=False, norm_eps=1e-5, silu=True, passes=3)),  # silu, 3 row blocks
    ("h2", dict(in_f=4096, out_f=72, bias=False, warps=4, rows=2, unroll=1, ksplit=2, passes=2)),  # warp teams
    ("h2", dict(in_f=2048, out_f=300, bias=False, bits=8)),                    # the 8-bit head rows
    ("dp4a", dict(in_f=2048, out_f=600, bias=False, warps=8, rows=2, unroll=1)),  # a d per word
    ("dp4a", dict(in_f=2048, out_f=600, bias=False, warps=8, rows=2, unroll=1, act_group=32)),  # group max by shuffles
    ("dp4a", dict(in_f=544, out_f=400, bias=False, norm_eps=1e-5, silu=True, passes=3)),
    ("dp4a", dict(in_f=4160, out_f=72, bias=True)),                            # one staging thread a group
]


@pytest.mark.parametrize("kind,case", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_subgroup_sums_match_the_workgroup_memory_kernel(webgpu_dev, tmp_path, lanes, kind, case):
    """Every output (and x + delta) of the kernel at sg 4 and at the adapter's width equals the sg 0 kernel's
    within the fp16 output's rounding: only the order of the float32 sums changed (dp4a's group maxima are exact,
    so its int8 activations are the same)."""
    args, out_at = _args(case)
    src0, ref = _run(webgpu_dev, tmp_path, _build(kind, case, 0), args, f"{kind}_sg0")
    assert "subgroupShuffleXor" not in src0
    want = ref[out_at].astype(np.float64)
    assert np.isfinite(want).all() and np.abs(want).max() > 0
    for sg in sorted({4, min(lanes, 32)}):
        src, got = _run(webgpu_dev, tmp_path, _build(kind, case, sg), args, f"{kind}_sg{sg}")
        assert "subgroupShuffleXor" in src
        g = got[out_at].astype(np.float64)
        tol = 2 * np.spacing(np.maximum(np.abs(want), np.abs(g)).astype(np.float16)).astype(np.float64)
        assert (np.abs(g - want) <= tol + 1e-4 * np.abs(want).max()).all(), (sg, np.abs(g - want).max())
        if case.get("norm_eps") is not None:
            assert np.array_equal(got[-1], ref[-1])  # x + delta, written by workgroup 0


def test_a_width_past_the_probe_gives_wrong_sums(webgpu_dev, tmp_path, lanes):
    """Built for twice the lanes the probe found, the butterfly reaches lanes of another subgroup: the sums are
    wrong. So the shuffles do run, and the probe is no more conservative than the device."""
    if lanes >= 32:
        pytest.skip("the adapter's subgroups hold a whole warp")
    case = dict(in_f=2048, out_f=600, bias=False, warps=8, rows=2, unroll=1)
    args, out_at = _args(case)
    _, ref = _run(webgpu_dev, tmp_path, _build("h2", case, 0), args, "wide_sg0")
    _, got = _run(webgpu_dev, tmp_path, _build("h2", case, 2 * lanes), args, "wide_sg")
    want, g = ref[out_at].astype(np.float64), got[out_at].astype(np.float64)
    assert not np.allclose(g, want, rtol=1e-2, atol=1e-2 * np.abs(want).max(), equal_nan=False)


def test_bad_widths_are_refused():
    from edgellm.kernels.webgpu_linear import int4_gemv_h2

    with pytest.raises(ValueError, match="sg 12 is not one of"):
        int4_gemv_h2(2048, 600, False, sg=12)


def test_the_option_reaches_the_manifest_and_the_device_check(webgpu_dev, lanes):
    """--opt webgpu_subgroups=N records subgroup_lanes N in the manifest's kernels entry (only where a kernel used
    it); opening the device refuses an adapter with fewer lanes in one line naming the fix, and accepts enough."""
    from edgellm._tvm import compiler
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant import get_scheme
    from edgellm.runtime.devices import DeviceError, open_device

    target = compiler().Target("webgpu", host="llvm")
    reg = KernelRegistry(target, KernelOptions.parse(["webgpu_subgroups=8"]))
    assert "subgroup_lanes" not in reg.manifest_entry()
    reg.linear(1, 2048, 600, get_scheme("q4f16_1"), "float16", False)
    assert reg.manifest_entry()["subgroup_lanes"] == 8
    assert "subgroup_lanes" not in KernelRegistry(target).manifest_entry()
    from edgellm.targets import resolve

    assert not resolve("vulkan").tvm(subgroup_lanes=8).attrs.get("supports_subgroups", False)  # TVM's are 32 only
    sg32 = resolve("vulkan").tvm(subgroup_lanes=32)  # TVM's own reductions in shuffles too: recorded at once
    assert bool(sg32.attrs["supports_subgroups"]) and int(sg32.attrs["thread_warp_size"]) == 32
    assert KernelRegistry(sg32, KernelOptions.parse(["webgpu_subgroups=32"])).manifest_entry()["subgroup_lanes"] == 32
    with pytest.raises(ValueError, match="subgroup warp is 32 lanes"):
        KernelRegistry(sg32, KernelOptions.parse(["webgpu_subgroups=16"])).webgpu_sg

    manifest = {"target": {"device": "webgpu"}, "quant": {"act_dtype": "float32"}, "kernels": {"subgroup_lanes": 32}}
    if lanes < 32:
        with pytest.raises(DeviceError) as e:
            open_device("vulkan:0", manifest)
        msg = str(e.value)
        assert "\n" not in msg and "subgroups of 32 lanes" in msg and f"--opt webgpu_subgroups={lanes}" in msg
    manifest["kernels"]["subgroup_lanes"] = lanes
    info = open_device("vulkan:0", manifest)
    assert info.details["subgroup_lanes"] == lanes


def test_tiny_llama_with_subgroups_matches_the_build_without(webgpu_dev, lanes, checkpoints, tmp_path):
    """`edgellm compile --target vulkan --opt webgpu_subgroups=N` end to end (N = the adapter's lanes) with the
    default decode GEMV (dp4a; h2's shuffles: the kernel tests above): TVM's own kernels and edgellm's GEMVs reduce
    by shuffles, the manifest records N, and over a prefill and 16 decode steps the logits equal the build without
    subgroups within fp16 summation order, with the same greedy tokens."""
    gemv = "dp4a"
    from edgellm.artifact import Artifact
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.device_runners.engine import Engine
    from edgellm.kernels import KernelOptions
    from edgellm.runtime.webgpu_plugin import adapters

    if not adapters()[0].get("shader_f16"):
        pytest.skip("adapter has no shader-f16 (the h2 GEMVs are q4f16_1's)")
    prompt = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3]
    logits, tokens, arts = {}, {}, {}
    for sg in ("off", str(min(lanes, 32))):
        out = tmp_path / f"sg-{sg}"
        compile_model(CompileArgs(model=str(checkpoints["llama"]), output=out, target="vulkan", quant="q4f16_1",
                                  runtime=RuntimeOptions(context_window=256, prefill_chunk=128, max_batch=1),
                                  kernel_options=KernelOptions.parse([f"webgpu_subgroups={sg}",
                                                                      f"webgpu_gemv={gemv}"])))
        arts[sg] = Artifact.open(out)
        eng = Engine(out)
        tokens[sg] = list(eng.generate_ids(prompt, 16))
        with eng.sequence() as seq:
            logits[sg] = np.stack([seq.prefill(prompt)] + [seq.decode(t) for t in tokens[sg][:-1]])
    on = str(min(lanes, 32))
    assert "subgroup_lanes" not in arts["off"].manifest["kernels"]
    assert arts[on].manifest["kernels"]["subgroup_lanes"] == int(on)
    assert f"int4_gemv_{gemv}_webgpu_norm_silu" in arts[on].manifest["kernels"]["chosen"]["linear_gemv"]
    # the target as built: TVM's own kernels take subgroups only at 32 lanes (its webgpu warp is fixed at 32)
    assert arts[on].manifest["target"]["tvm_target"].get("supports_subgroups", False) == (on == "32")
    ref, got = logits["off"], logits[on]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 5e-3
    assert tokens[on] == tokens["off"]


def test_adapters_command_lists_the_widest_option_each_adapter_runs(webgpu_dev, lanes, monkeypatch):
    """`edgellm adapters --json`: each Vulkan adapter as its --device spec, with the probe's lanes and the widest
    --opt webgpu_subgroups value that runs there; without a driver one line naming the fix."""
    import json

    from click.testing import CliRunner

    from edgellm.cli import cli
    from edgellm.runtime import webgpu_plugin
    from edgellm.runtime.devices import subgroup_option

    assert [subgroup_option(n) for n in (1, 2, 4, 8, 16, 32, 64)] == ["off", "off", "4", "8", "16", "32", "32"]
    res = CliRunner().invoke(cli, ["adapters", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["device"] == "vulkan:0" and rows[0]["subgroup_lanes"] == lanes
    assert rows[0]["webgpu_subgroups"] == subgroup_option(lanes)
    assert CliRunner().invoke(cli, ["adapters"]).exit_code == 0

    def no_driver():
        raise webgpu_plugin.PluginError("vulkan", "wgpu-native found no Vulkan device: install a Vulkan driver")

    monkeypatch.setattr(webgpu_plugin, "load_plugin", no_driver)
    res = CliRunner().invoke(cli, ["adapters"])
    assert res.exit_code == 1 and res.output.strip().count("\n") == 0 and "install a Vulkan driver" in res.output


def test_auto_builds_a_32_lane_twin_and_loads_what_the_adapter_runs(webgpu_dev, lanes, checkpoints, tmp_path,
                                                                    monkeypatch):
    """The default `--opt webgpu_subgroups=auto`: lib/model.so without subgroups and lib/model-sg32.so with them,
    both in the file table (hash-checked); the runner loads the twin only where the adapter's probed subgroups
    span 32 lanes (this lavapipe: the portable one, with the logits of an `off` build), and the describe line says
    which. A twin path leaving the artifact, a malformed entry or an altered twin is refused."""
    import json

    from edgellm.artifact import Artifact, ArtifactError, write_manifest
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.device_runners.engine import Engine
    from edgellm.kernels import KernelOptions
    from edgellm.runtime import webgpu_plugin

    rt = RuntimeOptions(context_window=256, prefill_chunk=128, max_batch=1)
    out, off = tmp_path / "auto", tmp_path / "off"
    result = compile_model(CompileArgs(model=str(checkpoints["llama"]), output=out, target="vulkan", quant="q4f32_1",
                                       runtime=rt))
    assert "twin: lib/model-sg32.so (subgroups of 32 lanes" in result.summary()
    compile_model(CompileArgs(model=str(checkpoints["llama"]), output=off, target="vulkan", quant="q4f32_1",
                              runtime=rt, kernel_options=KernelOptions(webgpu_subgroups="off")))
    art = Artifact.open(out)
    (twin,) = art.manifest["lib_variants"]
    assert twin["lib"] == "lib/model-sg32.so" and twin["subgroup_lanes"] == 32
    assert twin["kernels"]["subgroup_lanes"] == 32 and twin["tvm_target"]["supports_subgroups"]
    assert "lib/model-sg32.so" in art.manifest["files"] and "subgroup_lanes" not in art.manifest["kernels"]
    assert Artifact.open(off).manifest["lib_variants"] == []
    prompt = [1, 5, 7, 100, 42, 9]
    eng = Engine(out)
    assert eng.lib == ("lib/model-sg32.so" if lanes >= 32 else "lib/model.so")
    with eng.sequence() as s, Engine(off).sequence() as r:
        np.testing.assert_array_equal(np.stack([s.prefill(prompt), s.decode(3), s.decode(4)]),
                                      np.stack([r.prefill(prompt), r.decode(3), r.decode(4)]))
    del eng
    # an adapter whose subgroups span 32 lanes gets the twin (not run here: lavapipe's span fewer)
    monkeypatch.setattr(webgpu_plugin, "subgroup_lanes", lambda index: 32)
    eng = Engine(out)
    assert eng.lib == "lib/model-sg32.so" and "kernels with subgroups of 32 lanes" in eng.device_info.describe()
    del eng
    manifest = json.loads((out / "manifest.json").read_text())
    for bad, match in (([{"lib": "../../elsewhere.so", "subgroup_lanes": 32}], "not a normalized path"),
                       ([{"lib": "lib/model-sg32.so", "subgroup_lanes": "32"}], "lib_variants is malformed"),
                       ([{"lib": "lib/other.so", "subgroup_lanes": 32}], "not in the manifest's file table")):
        write_manifest(out, {**manifest, "lib_variants": bad})
        with pytest.raises(ArtifactError, match=match):
            Artifact.open(out)
    write_manifest(out, manifest)
    with open(out / "lib" / "model-sg32.so", "r+b") as f:  # an altered twin fails the hash check
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="model-sg32.so fails its sha256 check"):
        Artifact.open(out, verify=True)
