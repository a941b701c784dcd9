"""Which device an artifact runs on: `--device KIND[:N]` checked against the artifact, and what the device needs
before its module loads (the WebGPU plugin for `--target vulkan` artifacts).

User-facing kinds are the artifact's own (`cpu`, `cuda`, ...) plus `vulkan`, which is TVM's device `webgpu`
(kDLWebGPU): a `--target vulkan` artifact holds WGSL kernels that edgellm's plugin runs on wgpu-native's Vulkan
backend (docs/vulkan.md). Nothing here imports the TVM compiler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALIASES = {"vulkan": "webgpu", "gpu": None}  # user word -> TVM device kind (None: the artifact's own GPU kind)


class DeviceError(ValueError):
    """A device the artifact cannot run on here (wrong kind, no such adapter, a missing feature); one line."""


@dataclass
class DeviceInfo:
    kind: str  # TVM device kind: cpu | cuda | webgpu ...
    index: int
    name: str  # what bench records and `edgellm run` show: the adapter / GPU name, or the kind
    driver: str = ""
    backend: str = ""
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        lanes = self.details.get("kernel_subgroup_lanes")
        extra = ", ".join(x for x in (self.backend and f"{self.backend} backend",
                                      self.driver and f"driver {self.driver}",
                                      lanes and f"kernels with subgroups of {lanes} lanes") if x)
        user = "vulkan" if self.kind == "webgpu" else self.kind
        return f"{user}:{self.index} {self.name}" + (f" ({extra})" if extra else "")


def parse_device(spec: str | None, artifact_device: str) -> tuple[str, int]:
    """'vulkan:1' -> ('webgpu', 1) for an artifact whose device is `artifact_device`; None -> (artifact's, 0)."""
    if not spec:
        return artifact_device, 0
    word, _, idx = spec.strip().lower().partition(":")
    if idx and not idx.isdigit():
        raise DeviceError(f"--device {spec!r}: the index after ':' must be a number, e.g. vulkan:0")
    kind = ALIASES.get(word, word) or artifact_device
    if kind != artifact_device:
        have = "vulkan" if artifact_device == "webgpu" else artifact_device
        fix = " (compile it with --target vulkan)" if kind == "webgpu" else ""
        raise DeviceError(f"--device {spec}: this artifact was compiled for {have}, not {word}{fix}; run it with "
                          f"--device {have}:N or leave --device out")
    return kind, int(idx or 0)


def open_device(spec: str | None, manifest: dict, param_index: list[dict] | None = None) -> DeviceInfo:
    """Resolve `spec` for the artifact and prepare the device: load the WebGPU plugin and check the adapter (fp16,
    binding sizes) for webgpu, the CUDA runtime for cuda. Raises DeviceError with one line."""
    kind, index = parse_device(spec, manifest["target"]["device"])
    if kind == "webgpu":
        return _open_webgpu(index, manifest, param_index or [])
    if kind == "cuda":
        from .. import _tvm

        _tvm.load_cuda_runtime()
    return DeviceInfo(kind, index, kind)


def _vulkan_adapters(what: str) -> list[dict]:
    """The WebGPU plugin loaded (built on first use) and its adapters; a DeviceError `what: reason` otherwise."""
    from .webgpu_plugin import PluginError, adapters, load_plugin

    try:
        load_plugin()
        return adapters()
    except PluginError as exc:
        raise DeviceError(f"{what}: {exc}") from None


def _open_webgpu(index: int, manifest: dict, param_index: list[dict]) -> DeviceInfo:
    found = _vulkan_adapters(f"--device vulkan:{index}")
    if index >= len(found):
        names = "; ".join(f"vulkan:{i} {a['name']}" for i, a in enumerate(found))
        raise DeviceError(f"--device vulkan:{index}: there is no such Vulkan adapter here ({len(found)} found: {names})")
    a = found[index]
    scheme = manifest.get("quant", {})
    if scheme.get("act_dtype") == "float16" and not a.get("shader_f16"):
        raise DeviceError(f"artifact uses fp16 activations ({scheme.get('scheme')}) and Vulkan adapter {a['name']!r} "
                          "has no shader-f16; recompile with --quant q4f32_1 (the fp32 twin)")
    halves = [e for e in param_index if e.get("dtype") == "float16"]
    if halves and not a.get("shader_f16"):  # WGSL reads an f16 buffer only with the f16 extension
        body = [e for e in halves if not any(k in e["name"] for k in ("embed_tokens", "lm_head"))]
        if body:  # the layers' own scales (the GGUF grids' rows keep the file's fp16 scale / min): --head is not enough
            raise DeviceError(f"weight {body[0]['name']} is stored in float16 ({scheme.get('scheme')} keeps the "
                              f"source's fp16 scales) and Vulkan adapter {a['name']!r} has no shader-f16; recompile "
                              "with --quant q4f32_1 --head q4 (fp32 scales throughout; from a GGUF that re-quantizes, "
                              "so check it with `edgellm verify`)")
        raise DeviceError(f"weight {halves[0]['name']} is stored in float16 (the 8-bit embedding/head rows keep fp16 "
                          f"scales) and Vulkan adapter {a['name']!r} has no shader-f16; recompile with "
                          "--head q4 (fp32 scales with q4f32_*)")
    limit = int(a.get("max_storage_buffer_binding_size") or 0)
    big = max(param_index, key=lambda e: int(e.get("nbytes", 0)), default=None)
    if limit and big is not None and int(big["nbytes"]) > limit:
        raise DeviceError(f"weight {big['name']} is {int(big['nbytes']) / 2**20:.0f} MiB, over Vulkan adapter "
                          f"{a['name']!r}'s storage-buffer binding limit of {limit / 2**20:.0f} MiB; use a GPU with a "
                          "larger limit or a smaller model")
    details = {k: a[k] for k in ("adapter_type", "shader_f16", "subgroups") if k in a}
    need = int((manifest.get("kernels") or {}).get("subgroup_lanes") or 0)
    if need or (manifest.get("lib_variants") and a.get("subgroups")):
        # kernels built with --opt webgpu_subgroups=N: runs of N lanes must share a subgroup; twins (auto): the
        # widest that runs here is loaded (Artifact.lib_for_subgroups)
        from .webgpu_plugin import subgroup_lanes

        have = subgroup_lanes(index)
        details["subgroup_lanes"] = have
        if have < need:
            fix = f"--opt webgpu_subgroups={subgroup_option(have)}"
            raise DeviceError(f"artifact's kernels reduce over subgroups of {need} lanes (--opt webgpu_subgroups="
                              f"{need}) and Vulkan adapter {a['name']!r} "
                              + (f"keeps only {have} consecutive lanes in a subgroup" if have > 1 else
                                 "has no usable subgroups") + f"; recompile with {fix}")
    return DeviceInfo("webgpu", index, a["name"], driver=a.get("driver", ""), backend=a.get("backend", ""),
                      details=details)


def subgroup_option(lanes: int) -> str:
    """The widest `--opt webgpu_subgroups` value an adapter whose subgroups span `lanes` consecutive lanes runs."""
    return next((str(n) for n in (32, 16, 8, 4) if lanes >= n), "off")


def vulkan_devices() -> list[dict]:
    """The Vulkan adapters here, device 0 first: `device` (the --device spec), name, driver, adapter type,
    shader-f16, the consecutive lanes a subgroup spans (the plugin's probe: opens each device) and the widest
    `--opt webgpu_subgroups` that runs there. Raises DeviceError (one line) without a driver or a compiler."""
    from .webgpu_plugin import subgroup_lanes

    rows = []
    for i, a in enumerate(_vulkan_adapters("Vulkan")):
        lanes = subgroup_lanes(i) if a.get("subgroups") else 1
        rows.append({"device": f"vulkan:{i}", "name": a["name"], "driver": a.get("driver", ""),
                     "type": a.get("adapter_type", ""), "shader_f16": bool(a.get("shader_f16")),
                     "subgroup_lanes": lanes, "webgpu_subgroups": subgroup_option(lanes)})
    return rows
