"""compile_model: model source -> Relax -> INT4-packed params + built library -> artifact directory."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import __version__
from .._tvm import compiler, quick_script_parsing, tvm_version
from ..artifact import FORMAT_VERSION, Artifact, atomic_dir, check_output, file_table, write_manifest, write_params
from ..config import RuntimeOptions
from ..kernels import KernelOptions, KernelRegistry
from ..loaders import ModelSource, SourceError, default_model_path, open_model
from ..models import get_architecture
from ..quant import get_scheme
from ..quant.convert import convert, source_row
from ..targets import ResolvedTarget, resolve

log = logging.getLogger("edgellm")


@dataclass
class CompileArgs:
    model: str | None  # checkpoint folder, .gguf file, or None for the embedded default
    output: Path
    target: str = "host"
    quant: str | None = None  # None: the target preset's default (q4f32_2 on CPUs, q4f16_1 on GPUs)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    dump_ir: Path | None = None
    overwrite: bool = False
    kernel_options: KernelOptions = field(default_factory=KernelOptions)  # `--opt NAME=VALUE`
    # benchmark builds of models too big to ship: params/index.json lists shapes and dtypes, no shard is written,
    # and the artifact runs only with Engine(random_weights=SEED). Never the default.
    shapes_only: bool = False
    # embedding / head precision: q4 | q8 | f16, or None = source-faithful (8-bit from a Q8_0/F16/BF16/F32 source)
    head: str | None = None

    def display(self) -> str:
        d = asdict(self)
        d["model"] = self.model or "(embedded SmolLM2-135M-Instruct)"
        d["kernel_options"] = ", ".join(f"{k}={v}" for k, v in self.kernel_options.changed().items()) or "defaults"
        return "\n".join(f"  {k:<14} {v}" for k, v in d.items())


@dataclass
class CompileResult:
    artifact: Path
    params: int
    weight_bytes: int
    bits_per_weight: float
    build_seconds: float
    total_seconds: float
    artifact_bytes: int
    kernels: dict = field(default_factory=dict)  # the registry's manifest entry: options and kernels picked
    digest: str = ""  # the artifact's root digest (sha256 of manifest.json)
    tensor_classes: dict = field(default_factory=dict)  # manifest quant.classes: scheme, params, bytes per class
    scheme_choice: dict = field(default_factory=dict)  # manifest quant.choice: the layers' row and why
    lib_variants: list = field(default_factory=list)  # manifest lib_variants: twin libraries picked at load

    def summary(self) -> str:
        picked = "; ".join(f"{op}: {', '.join(names)}" for op, names in self.kernels.get("chosen", {}).items())
        choice = self.scheme_choice
        why = f"\nscheme: {choice['scheme']} ({choice['why']})" if choice else ""
        twins = "".join(f"\ntwin: {v['lib']} (subgroups of {v['subgroup_lanes']} lanes, loaded where the adapter's "
                        "span that many)" for v in self.lib_variants)
        return (f"artifact {self.artifact}: {self.params / 1e6:.1f}M params, {self.weight_bytes / 2**20:.1f} MiB weights "
                f"({self.bits_per_weight:.2f} bits/weight), build {self.build_seconds:.1f}s, total {self.total_seconds:.1f}s, "
                f"{self.artifact_bytes / 2**20:.1f} MiB on disk{why}\nprecision: {describe_classes(self.tensor_classes)}"
                f"\nkernels: {picked}{twins}\nroot digest {self.digest}")


def describe_classes(classes: dict) -> str:
    """'embedding q8f32_2 8.50 b/w 27.0 MiB; head tied to embedding; layers q4f32_2 5.00 b/w 54.0 MiB'."""
    parts = []
    for name, c in classes.items():
        if c.get("tied_to"):
            parts.append(f"{name} {c['scheme']} tied to {c['tied_to']}")
        else:
            parts.append(f"{name} {c['scheme']} {c['bits_per_weight']:.2f} bits/weight {c['bytes'] / 2**20:.1f} MiB")
    return "; ".join(parts)


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _float_shapes(model, schemes: dict | None = None) -> dict[str, tuple[int, int]]:
    """'X.weight' -> (out, in) for every weight-carrying layer (quantized params don't show it); fills `schemes`
    with 'X.weight' -> the layer's row."""
    from ..quant.nn import Embedding, Linear

    shapes = {}
    schemes = {} if schemes is None else schemes

    def walk(mod, prefix):
        if isinstance(mod, Linear):
            shapes[f"{prefix}weight"] = (mod.out_features, mod.in_features)
            schemes[f"{prefix}weight"] = mod.scheme
        elif isinstance(mod, Embedding):
            shapes[f"{prefix}weight"] = (mod.vocab, mod.hidden)
            schemes[f"{prefix}weight"] = mod.scheme
        items = enumerate(mod) if isinstance(mod, compiler().nn.ModuleList) else vars(mod).items()
        for name, child in items:
            if isinstance(child, compiler().nn.Module):
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return shapes


def _scheme_for(tgt: ResolvedTarget, scheme_name: str):
    """The scheme to build: an fp16 scheme on a target with fp16 off falls back to its fp32 twin, logged."""
    scheme = get_scheme(scheme_name)
    if scheme.cpu_only and tgt.target_json.get("kind") != "llvm":
        raise ValueError(f"quantization scheme {scheme.name} has CPU kernels only (int8 activations with integer dot "
                         f"products); target {tgt.preset} is {tgt.target_json.get('kind')}: use --quant "
                         f"{tgt.default_quant} (or q4f16_1 / q4f32_1) for it")
    if scheme.act_dtype == "float16" and not tgt.features.get("fp16", True):
        twin = _fp32_twin(scheme)
        log.warning("target %s has fp16 off: building %s instead of %s (same weight format, fp32 activations)",
                    tgt.preset, twin.name, scheme.name)
        return twin
    return scheme


def _fp32_twin(scheme):
    """The row with `scheme`'s weight grid (bits, group, zero point, offset) and fp32 activations (no int8)."""
    from ..quant.schemes import SCHEMES

    def grid(s):
        return s.bits, s.group_size, s.zero_point, s.offset if s.bits else 0

    return next(s for s in SCHEMES.values() if s.act_dtype == "float32" and s.act_quant == "none"
                and grid(s) == grid(scheme))


def _layer_source_types(src: ModelSource, smap: dict, model_cls) -> dict[str, int]:
    """Source type -> how many 2-D layer weights (every mapped weight but the embedding and the head) have it."""
    counts: dict[str, int] = {}
    for name, srcs in smap.items():
        if name in (model_cls.EMBEDDING, model_cls.HEAD) or not name.endswith(".weight"):
            continue
        for s in srcs:
            t = src.tensors.get(s)
            if t is not None and len(t.shape) == 2:
                counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return counts


def _pick_scheme(tgt: ResolvedTarget, args: CompileArgs, src: ModelSource, smap: dict, model_cls):
    """(row, manifest quant.choice): the user's --quant, else `source_row` from the target's default."""
    from ..quant.schemes import SCHEMES

    types = _layer_source_types(src, smap, model_cls)
    if args.quant:
        scheme = _scheme_for(tgt, args.quant)
        why = "--quant"
    else:
        default = _scheme_for(tgt, tgt.default_quant)
        row, why = source_row(default, types, SCHEMES)
        scheme = _scheme_for(tgt, row.name)
    from ..quant.gptq_awq import source_scheme  # GPTQ / AWQ: the exact import row, or a refusal of a lossy --quant

    picked = source_scheme(src.tensors, tgt.target_json.get("kind"), tgt.features.get("fp16", True), args.quant,
                           scheme, str(src.path))
    if picked is not scheme:
        counts = ", ".join(f"{t} x {n}" for t, n in sorted(types.items()))
        scheme, why = picked, why if args.quant else f"source layers {counts}: the exact GPTQ/AWQ import row"
    return scheme, {"scheme": scheme.name, "requested": args.quant, "target_default": tgt.default_quant,
                    "source_layer_types": types, "why": why}


def _check_toolchain(tgt: ResolvedTarget) -> None:
    """Fail before any weight is read when the linker or CUDA compiler the target needs is missing."""
    import shutil

    if tgt.toolchain and shutil.which(tgt.toolchain) is None:
        raise ValueError(
            f"target {tgt.preset} links with {tgt.toolchain}, which is not on PATH; on Debian/Ubuntu: "
            f"`apt-get install g++-{tgt.toolchain.rsplit('-g++', 1)[0]}`"
        )
    if tgt.kind == "cuda":
        if shutil.which("nvcc") is None:
            raise ValueError(f"target {tgt.preset} builds its fatbin with nvcc, which is not on PATH; install the CUDA toolkit")
        from .cuda import check_arch

        try:
            check_arch(tgt.target_json["arch"])
        except RuntimeError as exc:
            raise ValueError(f"target {tgt.preset}: {exc}") from None


def system_lib_prefix(tgt: ResolvedTarget, arch: str, scheme: str, source_sha256: str | None) -> str | None:
    """Symbol prefix for a model linked statically into an Android/iOS app (None for every other target).

    Derived from the model's identity, so a device and a simulator build of one model share it and two models in one
    app do not collide: `edgellm_<arch>_<scheme>_<sha8>_`.
    """
    triple = tgt.host_triple or ""
    if tgt.export != "tar" or not ("android" in triple or "apple-ios" in triple):
        return None
    ident = "_".join(x for x in (arch, scheme, (source_sha256 or "")[:8]) if x)
    return "edgellm_" + "".join(ch if ch.isalnum() else "_" for ch in ident) + "_"


def _tar_keep_names(output, files):
    """TVM's tar packer, with the system-lib `<prefix>devc.o` stored as `devc.o` (one layout for every .tar)."""
    import os
    import shutil
    import tempfile

    from .._tvm import compiler

    with tempfile.TemporaryDirectory() as tmp:
        renamed = []
        for f in files:
            base = os.path.basename(f)
            dst = os.path.join(tmp, "devc.o" if base.endswith("devc.o") else base)
            shutil.copy(f, dst)
            renamed.append(dst)
        compiler().tvm.support.tar.tar(output, renamed)


def _export(ex, root: Path, tgt: ResolvedTarget, stem: str = "model") -> str:
    """Write lib/<stem>.so (linked by the target's toolchain) or lib/<stem>.tar (objects for static linking)."""
    (root / "lib").mkdir(exist_ok=True)
    if tgt.export == "tar":
        ex.export_library(str(root / "lib" / f"{stem}.tar"), fcompile=_tar_keep_names)
        return f"lib/{stem}.tar"
    fcompile = None
    if tgt.toolchain:
        from .._tvm import compiler

        fcompile = compiler().tvm.support.cc.cross_compiler(tgt.toolchain)
    ex.export_library(str(root / "lib" / f"{stem}.so"), fcompile=fcompile)
    return f"lib/{stem}.so"


def _subgroup_twins(args: CompileArgs, tgt: ResolvedTarget, export, root: Path, prefix: str, params: dict,
                    step) -> list[dict]:
    """--opt webgpu_subgroups=auto on a WebGPU target: the model built again with subgroup reductions at each twin
    width, as lib/model-sg<N>.so beside the portable library; the manifest's `lib_variants` entries. `export`
    re-exports the model for a registry: (mod, named params, ...), the parameters checked equal to `params`."""
    from .pipeline import build

    if tgt.kind != "webgpu":
        return []
    out = []
    for lanes in args.kernel_options.subgroup_twins:
        opts = args.kernel_options.with_subgroups(lanes)
        target = tgt.tvm(subgroup_lanes=lanes)
        kernels = KernelRegistry(target, opts)
        step("build", detail=f"twin with subgroups of {lanes} lanes")
        with target:
            mod, twin_params, *_ = export(kernels)
        if {n: (tuple(int(x) for x in p.shape), str(p.dtype)) for n, p in twin_params} != params:
            raise RuntimeError(f"the {lanes}-lane twin exports other parameters than the main build; report this")
        ex = build(mod, target, None, prefix, pdl=kernels.pdl)
        out.append({"lib": _export(ex, root, tgt, stem=f"model-sg{lanes}"), "subgroup_lanes": lanes,
                    "tvm_target": tgt.tvm_json(lanes), "kernels": kernels.manifest_entry()})
    return out


def _check_tokenizer(src: ModelSource) -> None:
    """Load the tokenizer and render the chat template once now, so a broken one fails the compile, not a run."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(src.tokenizer_json)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"the tokenizer.json of {src.path} does not load ({first}); replace it with the model's "
                          "own tokenizer.json") from None
    if src.chat_template:
        from ..device_runners.text import ChatTemplateError, render_chat_template

        try:
            render_chat_template(src.chat_template, [{"role": "user", "content": "hi"}], src.tokenizer_config)
        except ChatTemplateError as exc:
            raise SourceError(f"the chat template of {src.path} does not render: {exc}; fix tokenizer_config.json's "
                              "chat_template (or chat_template.jinja)") from None


def _tokenizer_files(src: ModelSource, root: Path) -> dict:
    tdir = root / "tokenizer"
    tdir.mkdir()
    (tdir / "tokenizer.json").write_text(src.tokenizer_json)
    tcfg = {k: v for k, v in src.tokenizer_config.items() if isinstance(v, (str, int, float, bool, list, dict))}
    (tdir / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    return {"files": ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"],
            "chat_template": bool(src.chat_template), "add_bos_token": bool(tcfg.get("add_bos_token", False)),
            "bos_token_id": src.config.bos_token_id, "eos_token_ids": src.config.eos_token_ids}


def compile_model(args: CompileArgs, progress=None) -> CompileResult:
    """Compile `args.model` for `args.target`; the artifact appears at `args.output` only when complete.

    progress(name, detail="", done=None, total=None) is called as the compile goes: once per phase (load, export,
    quantize, build), then with done/total counts inside it (kernels built, tensors packed, pipeline passes)."""
    t_start = time.perf_counter()
    tgt = resolve(args.target)  # fail fast on a bad target, scheme, toolchain or output, before touching weights
    scheme = _scheme_for(tgt, args.quant or tgt.default_quant)
    _check_toolchain(tgt)
    model_path = Path(args.model) if args.model else default_model_path()
    check_output(args.output, args.overwrite, protect=[model_path])
    step = progress or (lambda name, detail="", done=None, total=None: None)
    step("load", detail=str(args.model or "embedded SmolLM2"))
    src = open_model(model_path)
    _check_tokenizer(src)
    cfg = src.config
    runtime = args.runtime
    if runtime.context_window > cfg.max_position_embeddings:
        log.warning("context_window %d > model max_position_embeddings %d; clamping", runtime.context_window,
                    cfg.max_position_embeddings)
        window = cfg.max_position_embeddings
        runtime = replace(runtime, context_window=window, prefill_chunk=min(runtime.prefill_chunk, window))
    model_cls, source_map = get_architecture(cfg)
    smap, unused = source_map(cfg)
    scheme, choice = _pick_scheme(tgt, args, src, smap, model_cls)
    if not args.quant and scheme.name != tgt.default_quant:
        log.info("scheme %s: %s", scheme.name, choice["why"])
    plan = _plan(scheme, src, smap, model_cls, args.head)
    target = tgt.tvm(subgroup_lanes=args.kernel_options.subgroup_lanes)
    kernels = KernelRegistry(target, args.kernel_options,
                             on_build=lambda name, n: step("export", detail=f"kernel {name}", done=n))
    step("export", detail=f"{cfg.num_hidden_layers} layers for {tgt.preset}")
    def export(registry):
        with quick_script_parsing():  # TVM's own kernels (the KV cache's) are parsed in the export too
            model = model_cls(cfg, scheme, registry, plan)
            spec = model.export_spec()
            return (*model.export_tvm(spec=spec), model, spec)

    with target:
        mod, named_params, model, spec = export(kernels)
    params = {name: (tuple(int(x) for x in p.shape), str(p.dtype)) for name, p in named_params}
    tensor_schemes: dict = {}
    float_shapes = _float_shapes(model, tensor_schemes)
    per_tensor = {n: s for n, s in tensor_schemes.items() if s != scheme}
    with atomic_dir(args.output, overwrite=args.overwrite, protect=[model_path]) as tmp:
        step("quantize", detail=f"{len(params)} tensors -> {scheme.name}")
        if args.shapes_only:
            index = _shape_index(tmp, params)
        else:
            packed = convert(src.tensors, smap, unused, params, float_shapes, scheme, per_tensor)
            index = write_params(tmp, _counted(packed, lambda i: step("quantize", done=i, total=len(params))))
        step("build", detail=f"{tgt.preset}: {json.dumps(tgt.target_json)}")
        t_build = time.perf_counter()
        from .pipeline import build

        if tgt.kind == "cuda":
            from .cuda import prepare_cuda_build

            prepare_cuda_build()
        prefix = system_lib_prefix(tgt, cfg.arch, scheme.name, src.sha256)
        ex = build(mod, target, args.dump_ir, prefix,
                   on_phase=lambda i, n, name: step("build", detail=name, done=i, total=n), pdl=kernels.pdl)
        lib_name = _export(ex, tmp, tgt)
        twins = _subgroup_twins(args, tgt, export, tmp, prefix, params, step)
        build_seconds = time.perf_counter() - t_build
        tok = _tokenizer_files(src, tmp)
        n_params = _count_params(params, float_shapes)
        weight_bytes = sum(e["nbytes"] for e in index)
        classes = _tensor_classes(index, params, float_shapes, tensor_schemes, model_cls, cfg.tie_word_embeddings)
        manifest = {
            "format_version": FORMAT_VERSION,
            "edgellm_version": __version__,
            "git_sha": _git_sha(),
            "tvm_version": tvm_version(),
            "built_on": {"machine": platform.machine(), "system": platform.system()},
            "model": {"arch": cfg.arch, "source": str(src.path), "source_kind": src.kind, "source_sha256": src.sha256,
                      "config": cfg.as_dict(), "params": n_params},
            "quant": {**scheme.as_dict(), "padding": _padding(float_shapes, tensor_schemes),
                      "precision": plan.as_dict(), "per_tensor": {n: s.name for n, s in per_tensor.items()},
                      "classes": classes, "choice": choice},
            "target": {**tgt.as_dict(), "tvm_target": tgt.tvm_json(args.kernel_options.subgroup_lanes)},
            "runtime": asdict(runtime),
            "tokenizer": tok,
            "lib": lib_name,
            "lib_variants": twins,  # twins of `lib` picked at load (runtime/devices.py): subgroup widths
            "system_lib_prefix": prefix,
            "functions": list(spec),
            "kernels": kernels.manifest_entry(),
            "weight_bytes": weight_bytes,
            "shapes_only": args.shapes_only,
        }
        manifest["files"] = file_table(tmp)
        digest = write_manifest(tmp, manifest)
    art_bytes = sum(p.stat().st_size for p in Path(args.output).rglob("*") if p.is_file())
    return CompileResult(Path(args.output), n_params, weight_bytes, weight_bytes * 8 / max(n_params, 1),
                         build_seconds, time.perf_counter() - t_start, art_bytes, manifest["kernels"], digest, classes,
                         choice, twins)


def _counted(items, tick):
    """`items`, calling tick(i) after the i-th one."""
    for i, item in enumerate(items, 1):
        yield item
        tick(i)


def _shape_index(root: Path, params: dict) -> list[dict]:
    """params/index.json with every parameter's name, shape, dtype and size, and no shard (shapes-only builds)."""
    index = [{"name": name, "shape": list(shape), "dtype": dtype, "shard": None, "offset": 0,
              "nbytes": int(np.prod(shape)) * np.dtype(dtype).itemsize} for name, (shape, dtype) in params.items()]
    (root / "params").mkdir(parents=True, exist_ok=True)
    (root / "params" / "index.json").write_text(json.dumps({"params": index}, indent=1))
    return index


def _count_params(params: dict, float_shapes: dict) -> int:
    """Logical parameter count: a packed weight counts its float [out, in], its scales count nothing."""
    total = 0
    for name, (shape, _) in params.items():
        if name.endswith(".q_weight"):
            out_f, in_f = float_shapes[name[: -len("q_weight")] + "weight"]
            total += out_f * in_f
        elif not name.endswith((".q_scale", ".q_min", ".q_perm")):
            total += int(np.prod(shape))
    return total


def _padding(float_shapes: dict[str, tuple[int, int]], schemes: dict) -> dict[str, int]:
    """Weights whose `in` was zero-padded to whole groups: name -> padded `in` (schemes: name -> its row)."""
    return {n: schemes[n].padded_in(i) for n, (_, i) in float_shapes.items() if schemes[n].padded_in(i) != i}


def _plan(scheme, src: ModelSource, smap: dict, model_cls, head: str | None):
    """The rows of the embedding and head beside `scheme` (quant.schemes.precision_plan) from the source tensors'
    types; head=None: source-faithful."""
    from ..quant.schemes import precision_plan

    def source_type(name: str) -> str | None:
        srcs = smap.get(name)
        return src.tensors[srcs[0]].dtype if srcs and srcs[0] in src.tensors else None

    head_type = source_type(model_cls.HEAD) if model_cls.HEAD in smap else None
    return precision_plan(scheme, source_type(model_cls.EMBEDDING), head_type, head)


def _tensor_classes(index: list[dict], params: dict, float_shapes: dict, schemes: dict, model_cls,
                    tied: bool) -> dict:
    """embedding / head / layers -> {scheme, params, bytes, bits_per_weight[, act_quant, act_group]} (norms and
    biases count in layers; act_* where the class's row rounds activations to int8); a tied head is {scheme,
    tied_to: embedding}."""
    def cls(name: str) -> str:
        base = name.rsplit(".", 1)[0] + ".weight"
        return {model_cls.EMBEDDING: "embedding", model_cls.HEAD: "head"}.get(base, "layers")

    out = {c: {"scheme": None, "params": 0, "bytes": 0} for c in ("embedding", "head", "layers")}
    for e in index:
        out[cls(e["name"])]["bytes"] += e["nbytes"]
    for name, (shape, _) in params.items():
        c, base = cls(name), name.rsplit(".", 1)[0] + ".weight"
        if name.endswith(".q_weight"):
            out[c]["params"] += int(np.prod(float_shapes[base]))
        elif not name.endswith((".q_scale", ".q_min", ".q_perm")):
            out[c]["params"] += int(np.prod(shape))
    for base, s in schemes.items():
        c = cls(base)
        if c != "layers" or out[c]["scheme"] is None:
            out[c]["scheme"] = s.name
    if tied:
        out["head"] = {"scheme": out["embedding"]["scheme"], "tied_to": "embedding"}
    rows = {s.name: s for s in schemes.values()}
    for c in out.values():
        if "bytes" in c:
            c["bits_per_weight"] = round(c["bytes"] * 8 / max(c["params"], 1), 3)
        row = rows.get(c["scheme"])
        if row is not None and row.act_quant != "none":  # x values per activation scale in this class's kernels
            c.update(act_quant=row.act_quant, act_group=row.act_group_size)
    return out


__all__ = ["CompileArgs", "CompileResult", "compile_model", "Artifact"]
