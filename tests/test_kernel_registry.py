"""KernelOptions (`--opt NAME=VALUE`) and the registry: validated options, forced kernels, and the manifest record of
what was picked. The kernels' numbers are tested against numpy in test_quant, test_cpu_kernels and the GPU tests."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgellm.cli import cli
from edgellm.kernels import KernelOptionError, KernelOptions, KernelRegistry
from edgellm.quant import get_scheme


def _target(mcpu: str, triple: str = "x86_64-unknown-linux-gnu"):
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu})


def test_options_parse_and_refuse_with_the_closest_name():
    assert KernelOptions.parse(["cuda_gemm=simt", "cuda-gemv=te"]) == KernelOptions(cuda_gemm="simt", cuda_gemv="te")
    assert KernelOptions.parse([]).changed() == {}
    with pytest.raises(KernelOptionError, match="cuda_gem is not a kernel option .did you mean cuda_gem[mv]"):
        KernelOptions.parse(["cuda_gem=simt"])
    with pytest.raises(KernelOptionError, match="cuda_gemm=smit .*did you mean simt"):
        KernelOptions.parse(["cuda_gemm=smit"])
    with pytest.raises(KernelOptionError, match="not NAME=VALUE"):
        KernelOptions.parse(["cuda_gemm"])
    with pytest.raises(KernelOptionError, match="given twice"):
        KernelOptions.parse(["cpu_dot=sdot", "cpu_dot=vnni"])


def test_cpu_dot_forces_a_family_or_refuses_it():
    scheme = get_scheme("q4f32_2")
    znver4, a72 = _target("znver4"), _target("cortex-a72", "aarch64-linux-gnu")

    def pick(target, **opts):
        reg = KernelRegistry(target, KernelOptions(**opts))
        reg.linear(1, 576, 960, scheme, "float32", False)
        return sorted(reg.chosen["linear_gemv"])

    assert pick(znver4) == ["int8_dot_vnnix8"]
    assert pick(znver4, cpu_dot="pmadd") == ["int8_dot_pmaddx8"]  # AVX-512BW lanes do not divide 72 words
    assert pick(znver4, cpu_dot="portable") == ["int8_dot_genericx8"]
    assert pick(a72) == ["int8_dot_genericx4"]
    with pytest.raises(ValueError, match="no sdot dot product"):
        pick(znver4, cpu_dot="sdot")
    with pytest.raises(ValueError, match="no vnni"):
        pick(a72, cpu_dot="vnni")


def test_quick_script_parsing_answers_as_inspect_does_and_restores_it():
    """_tvm.quick_script_parsing (kernel builds and the export run in it): inside, inspect.getmodule gives what it
    gives outside for frames (a file of no module: once scanned, then remembered), functions and modules; it nests;
    after the outermost block inspect is as it was. And a kernel parsed inside is the kernel parsed outside."""
    import inspect
    import sys

    from edgellm._tvm import quick_script_parsing
    from edgellm.kernels.cuda_math import silu_mul_gpu

    real = inspect.getmodule
    frames = [f.frame for f in inspect.stack(0)]
    want = [real(f, inspect.getabsfile(f)) for f in frames]
    assert len(frames) > 10 and any(m is not None for m in want)  # pytest's frames: modules, and (python -m) runpy's
    with quick_script_parsing():
        assert inspect.getmodule is not real
        with quick_script_parsing():
            for _ in range(2):  # the second pass answers from what the first remembered
                assert [inspect.getmodule(f, inspect.getabsfile(f)) for f in frames] == want
        assert inspect.getmodule is not real  # still inside the outer block
        assert inspect.getmodule(test_kernels_are_built_once_per_shape) is sys.modules[__name__]
        assert inspect.getmodule(json, "x.py") is json
        inside = silu_mul_gpu(64, "float16").script()
    assert inspect.getmodule is real
    assert inside == silu_mul_gpu(64, "float16").script()


def test_kernels_are_built_once_per_shape():
    reg = KernelRegistry(_target("znver4"))
    scheme = get_scheme("q4f32_1")
    a = reg.linear(None, 64, 128, scheme, "float32", False)
    assert reg.linear(None, 64, 128, scheme, "float32", False) is a
    assert reg.linear(None, 64, 160, scheme, "float32", False) is not a


def test_compile_records_options_and_kernels(checkpoints, tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(checkpoints["llama"]), "-q", "q4f32_2", "--opt", "cpu_dot=portable",
                                 "--context-window", "64", "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "cpu_dot=portable" in r.stderr and "int8_dot_generic" in r.stderr
    kernels = json.loads((tmp_path / "a" / "manifest.json").read_text())["kernels"]
    assert kernels["options"]["cpu_dot"] == "portable"
    # the layers' 4-bit kernel and the 8-bit (source-faithful) head's, both on the forced family
    assert {name.rsplit("_generic", 1)[0] for name in kernels["chosen"]["linear"]} == {"int8_dot", "int8x8_dot"}
    assert kernels["chosen"]["attention_decode"] == ["attention_decode_cpu_splitkv"]
    r = CliRunner().invoke(cli, ["compile", str(checkpoints["llama"]), "--opt", "cuda_gemv=fp16", "-o",
                                 str(tmp_path / "b")])
    assert r.exit_code == 1 and "did you mean fp16x2" in r.stderr and not (tmp_path / "b").exists()
    # a kernel the target cannot run: refused in one line, nothing written
    r = CliRunner().invoke(cli, ["compile", str(checkpoints["llama"]), "--target", "cuda-sm80", "--opt",
                                 "cuda_gemm=wgmma", "-o", str(tmp_path / "c")])
    assert r.exit_code == 1 and not (tmp_path / "c").exists()
    err = [line for line in r.stderr.splitlines() if "Error" in line or "Warning" in line or "Traceback" in line]
    assert err == ["Error: --opt cuda_gemm=wgmma needs an sm_90 target (Hopper's wgmma); this one is sm_80: use "
                   "cuda_gemm=auto or mma-pipelined"], r.stderr
    r = CliRunner().invoke(cli, ["compile", "--list-opts"])
    assert r.exit_code == 0 and "cuda_attention: auto | mma | tvm" in r.stdout
