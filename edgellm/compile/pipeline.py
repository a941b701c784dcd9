"""The Relax pass pipeline, one flat list per target kind, with a log line (and optional IR dump) per phase."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .._tvm import compiler
from ..kernels import cuda_pdl
from .cuda import pdl_build

log = logging.getLogger("edgellm")


def _sink_param_unpacking():
    """Function pass: move each `params[i]` unpacking next to its first use.

    With packed parameters a Relax function starts by unpacking all of them (one VM instruction each: 291 for
    Llama-3-8B) before its first kernel launch, and a GPU waits for that host work at the start of every decode
    step. Unpacked where used, the host issues the first kernels at once and unpacks the rest while the GPU works.
    A TupleGetItem of a parameter is pure, so moving it within its block changes nothing else; one used only by
    later blocks or the body stays at the end of its block. Runs after RewriteCUDAGraph, so the captured regions
    are already fixed (interleaved unpackings do not split them)."""
    c = compiler()
    rx = c.relax

    @rx.transform.function_pass(opt_level=0, name="EdgellmSinkParamUnpacking")
    def _pass(func, _mod, _ctx):
        params = set(func.params)
        if not isinstance(func.body, rx.SeqExpr):
            return func
        blocks = []
        for block in func.body.blocks:
            pending, out = {}, []
            for b in block.bindings:
                if isinstance(b, rx.VarBinding) and isinstance(b.value, rx.TupleGetItem) \
                        and b.value.tuple_value in params:
                    pending[b.var] = b
                    continue
                for v in rx.analysis.free_vars(b.value):
                    if v in pending:
                        out.append(pending.pop(v))
                out.append(b)
            out.extend(pending.values())
            blocks.append(type(block)(out))  # a BindingBlock, or a DataflowBlock (none are left by this phase)
        return rx.Function(func.params, rx.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                           func.attrs, func.span)

    return _pass


RUN_OR_CAPTURE = "vm.builtin.cuda_graph.run_or_capture"


def _is_run_or_capture(rx, value) -> bool:
    """`value` is RewriteCUDAGraph's call: call_builtin_with_ctx(run_or_capture, (capture_fn, args, index, ...))."""
    return isinstance(value, rx.Call) and len(value.args) == 2 and isinstance(value.args[0], rx.ExternFunc) \
        and value.args[0].global_symbol == RUN_OR_CAPTURE and isinstance(value.args[1], rx.Tuple)


def _capture_calls(rx, mod) -> tuple[set, int]:
    """The capture functions called from exactly one place (the ones a pass may rewrite with its caller), and the
    next free RunOrCapture entry index."""
    callers: dict = {}
    next_index = 0
    for gv, func in mod.functions_items():
        if isinstance(func, rx.Function) and isinstance(func.body, rx.SeqExpr):
            for block in func.body.blocks:
                for b in block.bindings:
                    if isinstance(b, rx.VarBinding) and _is_run_or_capture(rx, b.value):
                        callers.setdefault(b.value.args[1].fields[0], []).append(gv)
                        next_index = max(next_index, int(b.value.args[1].fields[2]) + 1)
    return {cap for cap, where in callers.items() if len(where) == 1}, next_index


WHOLE_PARAMS = True  # _whole_params_to_graphs in the finalize phase (False: TVM's per-weight arguments, for A/B)


def _whole_params_to_graphs():
    """Module pass: a CUDA graph's capture function takes the packed parameter tuple whole instead of one argument
    per weight.

    RewriteCUDAGraph hands each captured region its inputs as one tuple, `run_or_capture(capture_fn, (ids, w0, w1,
    ..., storages, cache...), index, shape)`, built by the VM at every call; the weights among them are unpacked
    from the packed parameters one VM instruction each. Replay needs none of it (TVM's RunOrCapture launches the
    cached graph and reads its arguments only at capture). With the whole step in one graph (the owned KV cache),
    the host unpacked 291 weights and built a 300-element tuple before the first kernel of Llama-3-8B's decode
    could launch (H200 run 7, docs/benchmarks/h200-pdl.md: the GPU's idle between steps 280 -> 232 us, 8B decode
    492 -> 504 tok/s with this pass; the rest of that idle was the graph launch, see _split_graphs). Rewritten, the
    call passes `packed_params` itself and the capture function unpacks the weights it uses in a prologue (run once,
    at capture); the caller's unpackings that nothing else uses are dropped. Runs after RewriteCUDAGraph."""
    c = compiler()
    rx = c.relax

    def rewrite_capture(cap, moved: list[tuple[int, object, int]], wholes: list) -> object:
        """cap's parameters at the moved positions become prologue bindings from the whole tuples' new params."""
        new_whole = {w: rx.Var(w.name, w.ty) for w in wholes}
        pos = {k for k, _, _ in moved}
        prologue = [rx.VarBinding(cap.params[k], rx.TupleGetItem(new_whole[w], i)) for k, w, i in moved]
        params = [new_whole[w] for w in wholes] + [p for k, p in enumerate(cap.params) if k not in pos]
        body = rx.SeqExpr([rx.BindingBlock(prologue), *cap.body.blocks], cap.body.body)
        return rx.Function(params, body, cap.ret_ty, cap.is_pure, cap.attrs, cap.span)

    def rewrite_caller(func, mod, single: set):
        params = set(func.params)
        unpacked = {}  # var -> (param tuple, index)
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, rx.VarBinding) and isinstance(b.value, rx.TupleGetItem) \
                        and b.value.tuple_value in params:
                    unpacked[b.var] = (b.value.tuple_value, b.value.index)
        new_caps, blocks, changed = {}, [], False
        for block in func.body.blocks:
            out = []
            for b in block.bindings:
                if isinstance(b, rx.VarBinding) and _is_run_or_capture(rx, b.value) \
                        and b.value.args[1].fields[0] in single:
                    cap_gv, args, *rest = b.value.args[1].fields
                    moved = [(k, *unpacked[a]) for k, a in enumerate(args.fields) if a in unpacked]
                    if moved and isinstance(args, rx.Tuple):
                        wholes = list(dict.fromkeys(w for _, w, _ in moved))
                        pos = {k for k, _, _ in moved}
                        new_args = rx.Tuple(wholes + [a for k, a in enumerate(args.fields) if k not in pos])
                        new_caps[cap_gv] = rewrite_capture(mod[cap_gv], moved, wholes)
                        call = b.value
                        b = rx.VarBinding(b.var, rx.Call(call.op, [call.args[0], rx.Tuple([cap_gv, new_args, *rest])],
                                                         call.attrs, call.ty_args, call.span))
                        changed = True
                out.append(b)
            blocks.append(out)
        if not changed:
            return None, {}
        used = set(rx.analysis.free_vars(rx.SeqExpr([], func.body.body)))
        for out in blocks:
            for b in out:
                if not (isinstance(b, rx.VarBinding) and b.var in unpacked):
                    used.update(rx.analysis.free_vars(b.value))
        kept = [type(block)([b for b in out if not (isinstance(b, rx.VarBinding) and b.var in unpacked
                                                    and b.var not in used)])
                for block, out in zip(func.body.blocks, blocks)]
        new = rx.Function(func.params, rx.SeqExpr(kept, func.body.body), func.ret_ty, func.is_pure,
                          func.attrs, func.span)
        return new, new_caps

    @c.tvm.transform.module_pass(opt_level=0, name="EdgellmWholeParamsToGraphs")
    def _pass(mod, _ctx):
        single, _ = _capture_calls(rx, mod)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, rx.Function) or not isinstance(func.body, rx.SeqExpr):
                continue
            new, caps = rewrite_caller(func, mod, single)
            if new is not None:
                mod[gv] = new
                for cap_gv, cap in caps.items():
                    mod[cap_gv] = cap
        return mod

    return _pass


# _split_graphs: the kernel counts of a large graph's leading pieces (the rest is the last piece); () = one graph
GRAPH_PIECES = (8, 32)
# ... of the owned cache's decode_greedy, which runs only queued ahead (Engine.greedy_chain: the host launches step
# k + 1 while step k runs, so a launch's host time is hidden and only the GPU's cost of a graph boundary is left):
# whole. H200 tg128, same call (docs/benchmarks/h200-pdl.md run 20): one graph against (8, 32) SmolLM2 3,177 ->
# 3,242 tok/s, Llama-3.2-1B 2,280 -> 2,333, Llama-3-8B 580 -> 583; step by step (decode) it lost 6% on SmolLM2.
GREEDY_GRAPH_PIECES = ()
SPLIT_MIN_KERNELS = 64  # graphs with fewer kernels stay whole (TVM's cache path: ~4 kernels a graph)


def _split_graphs(pieces: tuple[int, ...], per_function: dict[str, tuple[int, ...]] | None = None):
    """Module pass: a captured CUDA graph of many kernels becomes a chain of graphs of growing size (`pieces`
    kernels, then the rest), replayed one after the other.

    cudaGraphLaunch costs host time in proportion to the graph's nodes (H200, CUPTI: ~0.8 us a kernel node, 157 us
    for the owned cache's one-graph Llama-3-8B decode step of 234 kernels, 152 us for SmolLM2's 190) and the GPU
    starts the graph only once the launch returns, so a one-graph step idled that long between steps. In pieces,
    the GPU runs the first small graph while the host launches the next: only the first piece's launch is exposed.
    Each piece is a capture function of its own (RunOrCapture, a new entry index); the tensors one piece writes
    and a later one reads are returned by the first and passed to the second (static storage: the same addresses
    at every replay). Runs after RewriteCUDAGraph and _whole_params_to_graphs. `per_function`: other pieces for
    the graphs of the functions it names."""
    c = compiler()
    per_function = per_function or {}
    rx = c.relax
    tirx = c.tirx

    def is_kernel(mod, value) -> bool:
        return isinstance(value, rx.Call) and isinstance(value.op, c.tvm.ir.GlobalVar) \
            and isinstance(mod[value.op], tirx.PrimFunc)

    def cuts_for(mod, bindings, pieces) -> list[int]:
        """Binding indices where each new piece starts: after the kernel that completes a piece's count."""
        targets, acc = [], 0
        for n in pieces:
            acc += n
            targets.append(acc)
        cuts, count = [], 0
        for i, b in enumerate(bindings):
            if is_kernel(mod, b.value):
                count += 1
                if targets and count == targets[0]:
                    cuts.append(i + 1)
                    targets.pop(0)
        return cuts if count >= SPLIT_MIN_KERNELS else []

    def split_call(mod, b, next_index, pieces):
        """The caller's bindings replacing one run_or_capture binding, and the new capture functions."""
        call = b.value
        cap_gv, args, index, *rest = call.args[1].fields
        cap = mod[cap_gv]
        if not all(isinstance(x, rx.VarBinding) for blk in cap.body.blocks for x in blk.bindings):
            return None
        bindings = [x for blk in cap.body.blocks for x in blk.bindings]
        # the weights unpacked from a parameter tuple (_whole_params_to_graphs' prologue): each piece unpacks those
        # it uses itself, so they are not passed from piece to piece (that would be caller instructions again)
        params = set(cap.params)
        unpack = {x.var: x for x in bindings if isinstance(x.value, rx.TupleGetItem) and x.value.tuple_value in params}
        bindings = [x for x in bindings if x.var not in unpack]
        cuts = cuts_for(mod, bindings, pieces)
        if not cuts:
            return None
        bounds = [0, *cuts, len(bindings)]
        parts = [bindings[a:z] for a, z in zip(bounds, bounds[1:])]
        for k, part in enumerate(parts):
            needed = set().union(*(rx.analysis.free_vars(x.value) for x in part))
            if k == len(parts) - 1:
                needed |= set(rx.analysis.free_vars(cap.body.body))
            parts[k] = [x for v, x in unpack.items() if v in needed] + part
        uses = [set().union(*(rx.analysis.free_vars(x.value) for x in part)) for part in parts]
        ret = cap.body.body
        outer = dict(zip(cap.params, args.fields))  # capture param -> the caller's argument
        out_binds, new_funcs = [], {}
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            defined = {x.var for x in part}
            inputs = [v for v in dict.fromkeys(v for x in part for v in rx.analysis.free_vars(x.value))
                      if v not in defined]
            if last:
                inputs += [v for v in rx.analysis.free_vars(ret) if v not in defined and v not in inputs]
            later = set().union(*uses[k + 1:], set(rx.analysis.free_vars(ret)))
            outputs = [x.var for x in part if x.var in later and x.var not in unpack]
            body_ret = ret if last else rx.Tuple(outputs)
            ret_ty = cap.ret_ty if last else rx.TupleType([v.ty for v in outputs])
            name = cap_gv.name_hint if last else f"{cap_gv.name_hint}_part{k}"
            func = rx.Function(inputs, rx.SeqExpr([rx.BindingBlock(part)], body_ret), ret_ty, cap.is_pure,
                               cap.attrs, cap.span)
            if "global_symbol" in (cap.attrs or {}):
                func = func.with_attr("global_symbol", name)
            func = rx.utils.copy_with_new_vars(func)
            gv = cap_gv if last else c.tvm.ir.GlobalVar(name)
            new_funcs[gv] = func
            idx = index if last else c.tirx.IntImm("int64", next_index + k)
            piece_call = rx.Call(call.op, [call.args[0], rx.Tuple([gv, rx.Tuple([outer[v] for v in inputs]), idx,
                                                                    *rest])],
                                 call.attrs, call.ty_args if last else [ret_ty], call.span)
            if last:
                out_binds.append(rx.VarBinding(b.var, piece_call))
            else:
                tv = rx.Var(f"graph_part{k}", ret_ty)
                out_binds.append(rx.VarBinding(tv, piece_call))
                for j, v in enumerate(outputs):
                    nv = rx.Var(v.name, v.ty)
                    out_binds.append(rx.VarBinding(nv, rx.TupleGetItem(tv, j)))
                    outer[v] = nv
        return out_binds, new_funcs, len(parts) - 1

    @c.tvm.transform.module_pass(opt_level=0, name="EdgellmSplitGraphs")
    def _pass(mod, _ctx):
        if not pieces and not any(per_function.values()):
            return mod
        single, next_index = _capture_calls(rx, mod)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, rx.Function) or not isinstance(func.body, rx.SeqExpr):
                continue
            mine = per_function.get(gv.name_hint, pieces)
            if not mine:
                continue
            blocks, changed = [], False
            for blk in func.body.blocks:
                out = []
                for x in blk.bindings:
                    done = None
                    if isinstance(x, rx.VarBinding) and _is_run_or_capture(rx, x.value) \
                            and x.value.args[1].fields[0] in single:
                        done = split_call(mod, x, next_index, mine)
                    if done is None:
                        out.append(x)
                        continue
                    binds, funcs, used = done
                    out.extend(binds)
                    for fgv, f in funcs.items():
                        mod[fgv] = f
                    next_index += used
                    changed = True
                blocks.append(type(blk)(out))
            if changed:
                mod[gv] = rx.Function(func.params, rx.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                                      func.attrs, func.span)
        return mod

    return _pass


def _collapse_reshapes():
    """Function pass: reshape(reshape(x, s1), s2) -> reshape(x, s2) and reshape(x, shape of x) -> x inside dataflow
    blocks, in one walk over the bindings. The result, after DeadCodeElimination, is exactly what TVM's
    RemoveRedundantReshape gives (checked on SmolLM2 and the tiny models), which re-matched its pattern through a
    Python callback per call and took about 5 s of a SmolLM2 compile (this: under 0.1 s)."""
    import tvm_ffi

    c = compiler()
    rx = c.relax
    reshape_op = c.tvm.ir.Op.get("relax.reshape")

    def reparentable(arg, shape) -> bool:  # a literal 0 in a target copies an input dim: it must survive the move
        try:
            return bool(tvm_ffi.structural_equal(rx.op.reshape(arg, shape).args[1], shape))
        except Exception:  # reshape cannot resolve a 0 or -1 without a known input shape
            return False

    def block(b):
        src, alias, out = {}, {}, []

        def sub(e):  # uses of a removed no-op reshape read its input instead
            if isinstance(e, rx.Var):
                return alias.get(e, e)
            if isinstance(e, rx.Call):
                args = [sub(a) for a in e.args]
                return e if all(x is y for x, y in zip(args, e.args)) else rx.Call(e.op, args, e.attrs, e.ty_args,
                                                                                  e.span)
            if isinstance(e, rx.Tuple):
                fields = [sub(a) for a in e.fields]
                return e if all(x is y for x, y in zip(fields, e.fields)) else rx.Tuple(fields, e.span)
            if isinstance(e, rx.TupleGetItem):
                t = sub(e.tuple_value)
                return e if t is e.tuple_value else rx.TupleGetItem(t, e.index)
            return e

        for bind in b.bindings:
            if not isinstance(bind, rx.VarBinding):
                out.append(bind)
                continue
            value = sub(bind.value) if alias else bind.value
            if isinstance(value, rx.Call) and value.op.same_as(reshape_op):
                arg, shape = value.args
                while isinstance(arg, rx.Var) and arg in src and reparentable(src[arg], shape):
                    arg = src[arg]
                    value = rx.op.reshape(arg, shape)
                if arg.ty.shape is not None and tvm_ffi.structural_equal(arg.ty.shape, shape):
                    if isinstance(bind.var, rx.DataflowVar):
                        alias[bind.var] = arg
                    value = arg
                else:
                    src[bind.var] = value.args[0]
            out.append(bind if value is bind.value else rx.VarBinding(bind.var, value))
        return rx.DataflowBlock(out)

    @rx.transform.function_pass(opt_level=0, name="EdgellmCollapseReshapes")
    def _pass(func, _mod, _ctx):
        if (func.attrs is not None and "Primitive" in func.attrs.keys() and func.attrs["Primitive"] != 0) \
                or not isinstance(func.body, rx.SeqExpr):
            return func
        blocks = [block(b) if isinstance(b, rx.DataflowBlock) else b for b in func.body.blocks]
        return rx.Function(func.params, rx.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure, func.attrs,
                           func.span)

    return _pass


def static_decode_inputs(mod):
    """With the owned KV cache (kernels/owned_kv.py) decode, decode_greedy and batch_decode take the cache's
    tensors, the ids and the page table as inputs. Marking every input static (`num_input` 0: RewriteCUDAGraph treats parameters from
    num_input on, normally the weights, as fixed) lets the rewrite capture the whole step as one CUDA graph; the
    Engine then passes the same buffers at every call (a graph replays on the addresses it was captured with) and
    copies the step's ids, positions and page table into them. batch_decode's batch size gets an upper bound
    (`tir_var_upper_bound`), so StaticPlanBlockMemory plans its storage at a fixed size and the rewrite captures
    it too, one graph per batch size met at run time (RunOrCapture keys on the symbolic values); the Engine never
    passes more rows than the bound. Functions with TVM's cache are left as they are."""
    from ..device_runners.kv_pages import GRAPH_BATCH_BOUND

    rx = compiler().relax
    for gv, func in list(mod.functions_items()):
        if gv.name_hint in ("decode", "batch_decode", "decode_greedy") and isinstance(func, rx.Function) \
                and any(p.name == "page_table" for p in func.params):
            func = func.with_attr("num_input", 0)
            if gv.name_hint == "batch_decode":
                func = func.with_attr("tir_var_upper_bound", {"batch_size": GRAPH_BATCH_BOUND})
            mod[gv] = func
    return mod


def phases(target) -> list[tuple[str, list]]:
    """(name, passes) in order. CPU only in this file's host path; GPU kinds add dlight GPU rules."""
    c = compiler()
    rt, backend = c.relax.transform, c.relax.backend
    if target.kind.name == "llvm":
        # dl.cpu.Reduction is left out: on rms_norm it nests the whole normalization inside a parallel loop over
        # the hidden size (O(hidden^2) work: 43% of decode samples in a profile, and SmolLM2
        # decode went from 18.4 to 8.7 ms/token without it). Unscheduled, LLVM's loops
        # do the O(hidden) work.
        dlight_rules = [c.dlight.cpu.GEMV()]
        lib = backend.cpu_generic
        # Chains of reshapes (linear output -> [b, s, h, d] -> the cache's [b*s, h, d], and back) collapse to one
        # before FuseOps would fuse each chain into a copy kernel (2 per layer, each with VM alloc/free
        # instructions); a lone reshape becomes a view in lower-dataflow.
        early_views = [_collapse_reshapes(), rt.DeadCodeElimination()]  # = rt.RemoveRedundantReshape(), faster
        # KillAfterLastUse frees each tensor after its last use: 431 of decode's 1807 VM instructions. Every
        # storage is allocated up front by StaticPlanBlockMemory and reused by plan, so freeing early saves nothing.
        drop_finalize = {"KillAfterLastUse"}
    else:
        dl = c.dlight.gpu
        # dl.gpu.Matmul is left out: its tensorize step segfaults on Metal, and on CUDA with fp16 (TVM_NOTES)
        dlight_rules = [dl.GEMV(), dl.LowBatchGEMV(), dl.Reduction(), dl.GeneralReduction(), dl.Fallback()]
        lib = backend.cuda if target.kind.name == "cuda" else backend.gpu_generic
        early_views = []
        # as on CPU: storage is planned up front (StaticPlanBlockMemory), so early frees only cost VM instructions
        # (a third of decode's, host time the GPU waits for when decode is host-bound)
        drop_finalize = {"KillAfterLastUse"}
    return [
        ("fuse-transpose-matmul", [rt.FuseTransposeMatmul()]),
        ("dispatch", list(lib.library_dispatch_passes(target))),
        ("legalize", [*early_views, rt.LegalizeOps(), rt.AnnotateTIROpPattern(), rt.FoldConstant()]),
        ("fuse", [rt.FuseOps(), rt.FuseTIR(), rt.DeadCodeElimination()]),
        # edgellm's own kernels arrive scheduled from the registry (tirx.is_scheduled); dlight does the rest
        ("schedule", [c.dlight.ApplyDefaultSchedule(*dlight_rules)]),
        ("lower-dataflow", [rt.RewriteDataflowReshape(), rt.ToNonDataflow(), rt.RemovePurityChecking(),
                            rt.CallTIRRewrite()]),
        ("finalize", [p for p in lib.finalize_passes(target) if p.info.name not in drop_finalize]
                     + ([_whole_params_to_graphs()] if WHOLE_PARAMS else [])
                     + [_split_graphs(GRAPH_PIECES, {"decode_greedy": GREEDY_GRAPH_PIECES}),
                        _sink_param_unpacking()]),
    ]


def make_pipeline(target, dump_ir: Path | None = None, on_phase=None):
    """on_phase(i, count, name) before phase i of count (compile progress)."""
    c = compiler()
    plan = phases(target)

    @c.tvm.transform.module_pass(opt_level=0, name="EdgellmPipeline")
    def _pipeline(mod, _ctx):
        with target:
            for i, (name, passes) in enumerate(plan):
                if on_phase is not None:
                    on_phase(i, len(plan) + 1, name)
                t0 = time.perf_counter()
                mod = c.tvm.transform.Sequential(passes, name=name)(mod)
                log.info("phase %d %-22s %.2fs", i, name, time.perf_counter() - t0)
                if dump_ir is not None:
                    dump_ir.mkdir(parents=True, exist_ok=True)
                    (dump_ir / f"phase{i}_{name}.py").write_text(mod.script(show_meta=False))
        return mod

    return _pipeline


def build(mod, target, dump_ir: Path | None = None, system_lib_prefix: str | None = None, on_phase=None,
          pdl: bool = False):
    """IRModule -> relax Executable for `target`.

    With `system_lib_prefix` the host objects register themselves at static-init time (a constructor calling
    TVMFFIEnvModRegisterSystemLibSymbol for `__tvm_ffi_<prefix><func>` and `<prefix>__tvm_ffi__library_bin`), so an
    app that links them statically loads the model with `ffi.SystemLib(prefix)`. TVM 0.27 fails on prefixes of
    7 bytes or fewer (small-string attribute), so callers pass longer ones.

    `pdl` (CUDA sm_90+, the registry's `pdl`): every kernel launched with programmatic dependent launch and given
    its griddepcontrol prologue (kernels/cuda_pdl.py).
    """
    c = compiler()
    if system_lib_prefix is not None:
        mod = mod.with_attr("system_lib_prefix", system_lib_prefix)
    if target.kind.name == "cuda":
        mod = static_decode_inputs(mod)
    # CUDA: the backend's finalize passes hold RewriteCUDAGraph, which captures the static-shape decode into a
    # CUDA graph when this option is on (one graph launch instead of hundreds of kernel launches per token).
    # tirx.disable_cse_tir: TVM 0.27's TIR common-subexpression pass breaks TVM's own tree-attention KV-cache kernel
    # for head_dim 64 on CUDA ("cse_v21 has been used before definition", Llama-3.2-1B); nvcc does its own CSE.
    # webgpu (--target vulkan) needs the same CSE switch: the bug is in TIR, before codegen (Llama-3.2-1B's shape
    # builds with it and not without, docs/vulkan.md).
    config = {"relax.backend.use_cuda_graph": True, "tirx.disable_cse_tir": True} if target.kind.name == "cuda" else {}
    if target.kind.name == "webgpu":
        config = {"tirx.disable_cse_tir": True}
    with target, c.tvm.transform.PassContext(config=config):
        plan = make_pipeline(target, dump_ir, on_phase)

        def codegen_progress(mod, _ctx=None):  # the last step: TIR lowering and codegen inside relax.build
            if on_phase is not None:
                on_phase(len(phases(target)), len(phases(target)) + 1, "codegen")
            return mod

        with pdl_build(pdl) as skipped:
            passes = [plan, *([cuda_pdl.mark_module_pass(skipped)] if pdl else []),
                      c.tvm.transform.module_pass(codegen_progress, opt_level=0, name="EdgellmCodegenProgress")]
            return c.relax.build(mod, target=target, relax_pipeline=c.tvm.transform.Sequential(passes),
                                 system_lib=system_lib_prefix is not None)
