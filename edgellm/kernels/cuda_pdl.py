"""Programmatic dependent launch (PDL, Hopper sm_90+) for every CUDA kernel of a build (`--opt cuda_pdl`).

A decode step is a chain of a few hundred dependent kernels; between two of them the GPU idles ~1.2 us (the first
kernel drains, its writes are flushed, the next grid is launched and its blocks are placed: docs/benchmarks/h200.md
measured ~310 us of 2,040 per Llama-3-8B token). With PDL the next kernel is launched while the previous one still
runs: its blocks become resident in the previous kernel's tail, do what does not depend on it, and wait in
`griddepcontrol.wait` until it has completed and its memory is visible. Two parts, both needed:

* the launch: TVM's CUDA runtime launches a kernel with cuLaunchKernelEx and
  CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION when its launch parameters carry TVM's tag
  `tirx.use_programtic_dependent_launch` (TVM's spelling). Setting the PrimFunc attribute `tirx.kernel_launch_params`
  to [that tag] makes TVM append it to the thread tags it computes for each kernel of the function (checked with
  TVM 0.27: the dynamic-shared-memory tag still comes last, as its runtime requires) (`mark_module`).
* the kernel: every kernel launched that way must run `griddepcontrol.wait` before it reads anything an earlier
  kernel writes and before it writes anything (a buffer the previous kernel still reads may be the one the memory
  planner gave this kernel's output). `patch_source` puts the wait, then `griddepcontrol.launch_dependents` (the
  next kernel may launch once every block of this one has passed it), at the top of every `__global__` function of
  the generated CUDA source that has no wait of its own (the order: TRIGGER_FIRST). Kernels that
  place their own wait (the decode GEMV issues its first weight loads before it: weights are never written during a
  step) are left as they are.

Why this is safe without a per-kernel dependency analysis: every kernel waits for its predecessor's completion
before it touches memory and before it exits, so completions stay in stream order (kernel n finished implies n - 1
finished); copies, graph launches and kernels of other libraries keep the ordinary full dependency. A kernel built
with the wait but launched without the attribute (or after a non-kernel operation) finds no pending dependency and
goes on at once.
"""

from __future__ import annotations

import re

PDL_TAG = "tirx.use_programtic_dependent_launch"  # sic: TVM's spelling of the launch-parameter tag
LAUNCH_PARAMS_ATTR = "tirx.kernel_launch_params"
MIN_SM = 90  # griddepcontrol is PTX ISA 7.8, sm_90+

# TVM's CUDA codegen prints an extern call as NAME(args): an immediately-invoked device lambda is a statement with
# inline PTX in it (the trick kernels/cuda_gemv.py uses for fp16x2 arithmetic). "memory" keeps the compiler from
# moving loads or stores across the wait.
WAIT = '[]() { asm volatile("griddepcontrol.wait;" ::: "memory"); }'
LAUNCH_DEPENDENTS = '[]() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }'
# The next kernel may launch once every block of this one has passed `launch_dependents`. `wait` first, then
# `launch_dependents` (the default): a kernel lets its successor launch only once its own predecessor has
# completed, so at most two kernels of the chain overlap. The other order (TRIGGER_FIRST = True: launch_dependents,
# then wait) lets the chain run many kernels ahead, and it gave wrong logits on the H200: the owned cache's
# Llama-3.2-1B decode went wrong at random steps in 4 of 12 passes over 8 steps (max logit difference 4-34 against
# TVM's cache, where 0.031 is the normal gap) and SmolLM2's stopped once with an illegal address, while the same
# builds with the wait first, without PDL, with the GEMV's wait at its start, or with the three-kernel decode
# attention passed every pass (docs/benchmarks/h200-pdl.md, "The run-ahead race"). Every kernel waits before it
# reads what an earlier kernel wrote; what it does not see is L1, which is not coherent: a kernel launched two or
# more ahead has blocks on SMs where an older kernel still runs and reads, through L1, storage the memory planner
# later gives to this kernel's input. h200-pdl.md runs 56-59 showed it on one pair (gate_up after a run-ahead norm:
# wrong values from pass to pass; reading its input by __ldcg, L2 only, made every pass bit-equal, and slower than
# waiting first). Run ahead needs every such read from L2; TVM's generated kernels read through L1, so it stays an
# A/B knob. Cost of the safe order (run 10, owned cache): 2.5% of 8B decode (503 against 516 tok/s), 5% of 1B.
TRIGGER_FIRST = False
# The tensor-core prefill GEMMs (PrimFuncs with an `edgellm.gemm` label) keep ordinary launches and no prologue: with
# PDL, Llama-3-8B pp128 fell from 12,824 to 10,221 tok/s on an H200 (pp512 +2%, decode unaffected by them).
SKIP_GEMM = True
GEMM_ATTR = "edgellm.gemm"
_WAIT_ASM = '\n  asm volatile("griddepcontrol.wait;" ::: "memory");'
_LAUNCH_ASM = '\n  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");'
PROLOGUE_MARK = "  // edgellm: PDL (kernels/cuda_pdl.py)"
# a kernel that calls this (empty) device function waits in a device function of its own (owned_kv.cu
# edgellm_decode_attn_warps with EARLY): patch_source counts it as the kernel's wait
WAITS_INSIDE = "edgellm_pdl_waits_inside"


def prologue() -> str:
    first, second = (_LAUNCH_ASM, _WAIT_ASM) if TRIGGER_FIRST else (_WAIT_ASM, _LAUNCH_ASM)
    return first + PROLOGUE_MARK + second


def supported(sm: int) -> bool:
    return sm >= MIN_SM


def mark_function(func):
    """`func` (a tirx PrimFunc) with the PDL tag in its kernel launch parameters (kept once)."""
    attrs = dict(func.attrs) if func.attrs is not None else {}
    tags = [str(t) for t in attrs.get(LAUNCH_PARAMS_ATTR, [])]
    if PDL_TAG in tags:
        return func
    return func.with_attr(LAUNCH_PARAMS_ATTR, [*tags, PDL_TAG])


def mark_module_pass(skipped: set | None = None):
    """A module pass: every tirx PrimFunc of the module marked (`mark_function`), but the GEMMs with SKIP_GEMM,
    whose names go into `skipped` (patch_source leaves their kernels alone); Relax functions are untouched."""
    from .._tvm import compiler

    c = compiler()

    @c.tvm.transform.module_pass(opt_level=0, name="EdgellmMarkPDL")
    def _pass(mod, _ctx):
        updates = {}
        for gv, f in mod.functions.items():
            if not isinstance(f, c.tirx.PrimFunc):
                continue
            if SKIP_GEMM and f.attrs is not None and GEMM_ATTR in f.attrs:
                if skipped is not None:
                    skipped.add(gv.name_hint)
                    if "global_symbol" in f.attrs:
                        skipped.add(str(f.attrs["global_symbol"]))
                continue
            updates[gv] = mark_function(f)
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


def skipped_kernel(name: str, skipped: set) -> bool:
    """Whether kernel `name` of the generated source belongs to a PrimFunc in `skipped` (TVM names a function's
    kernels FUNC_kernel, FUNC_kernel_1, ...)."""
    m = re.fullmatch(r"(\w+?)_kernel(_\d+)?", name)
    return m is not None and m.group(1) in skipped


def _skip_literal(code: str, i: int) -> int:
    """Index after the string / char literal or comment starting at code[i] (i itself when there is none)."""
    if code.startswith("//", i):
        j = code.find("\n", i)
        return len(code) if j < 0 else j + 1
    if code.startswith("/*", i):
        j = code.find("*/", i + 2)
        return len(code) if j < 0 else j + 2
    if code[i] in "\"'":
        q, j = code[i], i + 1
        while j < len(code) and code[j] != q:
            j += 2 if code[j] == "\\" else 1
        return j + 1
    return i


def _match(code: str, i: int, open_: str, close: str) -> int:
    """Index of the bracket closing the one at code[i], skipping literals and comments."""
    depth = 0
    while i < len(code):
        j = _skip_literal(code, i)
        if j != i:
            i = j
            continue
        if code[i] == open_:
            depth += 1
        elif code[i] == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unbalanced {open_!r} in generated CUDA source")


_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


_TOKEN = re.compile(r"\"|'|//|/\*|\b__global__\b")


def kernel_bodies(code: str) -> list[tuple[str, int, int]]:
    """(name, index of the body's '{', index of its '}') of every `__global__` function defined in `code`
    (declarations without a body are skipped; string literals and comments are not code). Raises when a
    `__global__` is not of the form TVM emits (`__global__ void [__launch_bounds__(n)] name(...)`), so no kernel
    can be missed."""
    out, i = [], 0
    while True:
        t = _TOKEN.search(code, i)
        if t is None:
            return out
        if t.group() != "__global__":
            i = _skip_literal(code, t.start())
            continue
        m = _KERNEL.match(code, t.start())
        if m is None:
            raise ValueError(f"unexpected kernel signature in generated CUDA source: {code[t.start():t.start() + 120]!r}")
        end = _match(code, m.end() - 1, "(", ")")
        k = end + 1
        while k < len(code) and code[k].isspace():
            k += 1
        if k < len(code) and code[k] == "{":
            close = _match(code, k, "{", "}")
            out.append((m.group(1), k, close))
            i = close
        else:
            i = k


def patch_source(code: str, skipped: set = frozenset()) -> tuple[str, list[str]]:
    """`code` with prologue() at the top of every kernel that has no `griddepcontrol.wait` and is not `skipped`;
    and the names of the kernels patched."""
    patched, pieces, last = [], [], 0
    for name, open_, close in kernel_bodies(code):
        if _waits(code[open_:close]) or skipped_kernel(name, skipped):
            continue
        pieces += [code[last:open_ + 1], prologue()]
        last = open_ + 1
        patched.append(name)
    pieces.append(code[last:])
    return "".join(pieces), patched


def unwaited_kernels(code: str, skipped: set = frozenset()) -> list[str]:
    """Kernels of `code` with no `griddepcontrol.wait`, `skipped` ones aside: empty after patch_source (the tests
    check a whole build's source with it)."""
    return [name for name, open_, close in kernel_bodies(code)
            if not _waits(code[open_:close]) and not skipped_kernel(name, skipped)]


def _waits(body: str) -> bool:
    """Whether a kernel body places its own wait: inline, or in the device function WAITS_INSIDE marks."""
    return "griddepcontrol.wait" in body or f"{WAITS_INSIDE}()" in body
