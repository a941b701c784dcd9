// edgellm WebGPU runtime plugin: the loader of TVM's "webgpu" device module.
//
// What TVM 0.27's webgpu codegen serializes (module kind "webgpu", little-endian, strings as u64 length + bytes):
//   u64 n, then n x { key, FunctionInfo }   FunctionInfo = name, u64 k + k x DLDataType (4 bytes: code, bits,
//                                           lanes u16), u64 t + t x launch_param_tag, u64 e + e x i32 extra tag
//   u64 m, then m x { function name, WGSL source of that function's shader module }
// Calling protocol of a kernel (what the host code passes): one argument per PrimFunc parameter (buffers as the
// DLTensor data pointer, scalars as int/float), then one integer per launch tag "blockIdx.*"/"threadIdx.*".
// Bindings: buffer parameters at @binding(0..b-1) in order, read-only or read-write per the tag
// "paramWriteAccess:[..]", then a uniform struct of the scalars (i32/u32/f32, 4 bytes each) followed by
// `packGridDimX: u32`. The shader returns early when blockIdx.z * gridDim.x + blockIdx.x > packGridDimX,
// which lets the runtime fold a blockIdx.x beyond the adapter's per-dimension limit into z.
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "context.h"

namespace edgellm {
namespace webgpu {
namespace {

namespace ffi = tvm::ffi;

class Reader {
 public:
  explicit Reader(const std::string& data) : data_(data) {}
  uint64_t U64() {
    Need(8);
    uint64_t v;
    std::memcpy(&v, data_.data() + pos_, 8);
    pos_ += 8;
    return v;
  }
  std::string Str() {
    uint64_t n = U64();
    Need(n);
    std::string s = data_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  DLDataType DType() {
    Need(4);
    DLDataType t;
    t.code = static_cast<uint8_t>(data_[pos_]);
    t.bits = static_cast<uint8_t>(data_[pos_ + 1]);
    std::memcpy(&t.lanes, data_.data() + pos_ + 2, 2);
    pos_ += 4;
    return t;
  }
  void Skip(uint64_t n) {
    Need(n);
    pos_ += n;
  }

 private:
  void Need(uint64_t n) {
    if (pos_ + n > data_.size()) {
      TVM_FFI_THROW(RuntimeError) << "corrupt webgpu module: the binary ends at " << data_.size()
                                  << " bytes, reading " << n << " at " << pos_;
    }
  }
  const std::string& data_;
  size_t pos_ = 0;
};

bool ShaderChecks() {
  static const bool on = [] {
    const char* v = std::getenv("EDGELLM_WEBGPU_CHECKS");
    return v != nullptr && *v != 0 && std::string(v) != "0";
  }();
  return on;
}

bool Vec4LoadsOn() {  // read per module load (not cached) so a bench can A/B it in one process
  const char* v = std::getenv("EDGELLM_WEBGPU_VEC4");
  return v == nullptr || std::string(v) != "0";
}

}  // namespace

// TVM 0.27 declares every storage buffer as `array<scalar>` and writes a 4-lane vector load as
// `vec4<T>(B[E + 0], B[E + 1], B[E + 2], B[E + 3])`: four scalar loads. A kernel that names a read-only buffer
// `..._vec4` (its data pointer then prints as `..._vec4_ptr`; element u32, i32, f32 or f16) promises that it reads
// it only through such loads with E a multiple of 4; for such a buffer this declares `array<vec4<T>>` and turns
// each load into `B[(E) / 4i]`, one 16-byte (f16: 8-byte) load. Nothing else changes; a marked buffer with any other
// access is left as it was (correct, four loads). kernels/webgpu_linear.int4_gemv_h2 uses it; docs/tvm-notes.md.
std::string RewriteVec4Loads(const std::string& src) {
  const std::string decl_head = "var<storage, read> ", decl_mid = "_vec4_ptr : array<";
  std::string out = src;
  size_t search = 0;
  while (true) {
    size_t mid = out.find(decl_mid, search);
    if (mid == std::string::npos) break;
    size_t head = out.rfind(decl_head, mid);
    size_t line = out.rfind('\n', mid);
    size_t type_at = mid + decl_mid.size();
    size_t type_end = out.find(">;", type_at);
    search = type_at;
    if (head == std::string::npos || (line != std::string::npos && head < line) || type_end == std::string::npos) {
      continue;
    }
    std::string type = out.substr(type_at, type_end - type_at);
    if (type != "u32" && type != "i32" && type != "f32" && type != "f16") continue;
    std::string name = out.substr(head + decl_head.size(), mid - head - decl_head.size()) + "_vec4_ptr";
    // every use of `name[` must open one of the vector loads
    const std::string open = "vec4<" + type + ">(" + name + "[";
    std::string body = out.substr(type_end + 2);
    size_t uses = 0, loads = 0;
    for (size_t at = body.find(name + "["); at != std::string::npos; at = body.find(name + "[", at + 1)) ++uses;
    std::string rewritten;
    size_t pos = 0;
    bool ok = true;
    while (ok) {
      size_t at = body.find(open, pos);
      if (at == std::string::npos) break;
      size_t e0 = at + open.size();
      size_t plus = body.find(" + 0]", e0);
      if (plus == std::string::npos) {
        ok = false;
        break;
      }
      std::string expr = body.substr(e0, plus - e0);
      std::string rest = " + 0], ";
      for (int k = 1; k < 4; ++k) {
        rest += name + "[" + expr + " + " + std::to_string(k) + "]" + (k < 3 ? ", " : ")");
      }
      if (body.compare(plus, rest.size(), rest) != 0) {
        ok = false;
        break;
      }
      rewritten += body.substr(pos, at - pos) + name + "[(" + expr + ") / 4i]";
      pos = plus + rest.size();
      ++loads;
    }
    if (!ok || loads == 0 || loads * 4 != uses) continue;  // some other access: leave this buffer as it is
    rewritten += body.substr(pos);
    const std::string decl_new = "vec4<" + type + ">>;";
    out = out.substr(0, type_at) + decl_new + rewritten;
    search = type_at + decl_new.size();
  }
  return out;
}

namespace {

struct Pipeline {
  WGPUComputePipeline pipeline = nullptr;
  WGPUBindGroupLayout layout = nullptr;
};

// One kernel: argument layout from its FunctionInfo, pipelines created per device on first launch.
class Kernel {
 public:
  Kernel(std::string name, std::vector<DLDataType> arg_types, const std::vector<std::string>& tags,
         std::string source)
      : name_(std::move(name)), arg_types_(std::move(arg_types)), source_(std::move(source)) {
    std::vector<int> write_access;
    bool have_access = false;
    for (const std::string& tag : tags) {
      if (tag.rfind("blockIdx.", 0) == 0 || tag.rfind("threadIdx.", 0) == 0) {
        int axis = tag.back() - 'x';
        if (tag.size() != 10 + (tag[0] == 't') || axis < 0 || axis > 2) Unsupported("launch tag", tag);
        dims_.push_back(tag[0] == 'b' ? axis : axis + 3);
      } else if (tag.rfind("paramWriteAccess:", 0) == 0) {
        have_access = true;
        std::string list = tag.substr(17);  // "[0,1,...]"
        for (char c : list) {
          if (c == '0' || c == '1') write_access.push_back(c - '0');
        }
      } else {
        Unsupported("launch tag", tag);
      }
    }
    for (size_t i = 0; i < arg_types_.size(); ++i) {
      const DLDataType& t = arg_types_[i];
      if (t.code == kDLOpaqueHandle) {
        buffer_args_.push_back(i);
      } else if ((t.code == kDLInt || t.code == kDLUInt || t.code == kDLFloat) && t.bits == 32 && t.lanes == 1) {
        pod_args_.push_back(i);
      } else {
        Unsupported("scalar argument type", std::to_string(t.code) + ":" + std::to_string(t.bits));
      }
    }
    if (!have_access || write_access.size() != buffer_args_.size()) {
      TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << " has no paramWriteAccess tag for its "
                                  << buffer_args_.size() << " buffers (module not built by TVM's webgpu codegen?)";
    }
    writable_ = write_access;
    // TVM emits `enable subgroups;` for a target with supports_subgroups; wgpu 0.32's naga rejects that directive
    // but compiles the subgroup built-ins when the device has the feature (requested when the adapter offers it)
    const std::string enable_sg = "enable subgroups;";
    size_t at = source_.find(enable_sg);
    if (at != std::string::npos) source_.erase(at, enable_sg.size());
    // TVM 0.27 emits `> packGridDimX`: the last valid linear block index is what the uniform must hold
    pack_inclusive_ = source_.find(">= podArgs.packGridDimX") != std::string::npos;
    if (Vec4LoadsOn()) source_ = RewriteVec4Loads(source_);
  }

  void Launch(ffi::PackedArgs args) {
    size_t expect = arg_types_.size() + dims_.size();
    if (static_cast<size_t>(args.size()) != expect) {
      TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << " takes " << expect << " arguments, got "
                                  << args.size();
    }
    int device_id = CurrentDevice();
    Context* ctx = Context::Get(device_id);
    const Pipeline& p = PipelineFor(ctx, device_id);

    // per-call scratch without allocation (launches are single-threaded per kernel in practice; thread_local keeps
    // concurrent callers apart)
    thread_local std::vector<Buffer*> buffers;
    thread_local std::vector<uint32_t> words;
    buffers.clear();
    words.clear();
    for (size_t i : buffer_args_) {
      void* ptr = args[i].cast<void*>();
      if (ptr == nullptr) TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << ": argument " << i << " is null";
      Buffer* buf = static_cast<Buffer*>(ptr);
      if (buf->size > ctx->facts().limits.maxStorageBufferBindingSize) {
        TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << ": argument " << i << " is a buffer of "
                                    << buf->size << " bytes, over maxStorageBufferBindingSize "
                                    << ctx->facts().limits.maxStorageBufferBindingSize << " of " << ctx->facts().name;
      }
      buffers.push_back(buf);
    }
    for (size_t i : pod_args_) {
      const DLDataType& t = arg_types_[i];
      uint32_t w;
      if (t.code == kDLFloat) {
        float f = static_cast<float>(args[i].cast<double>());
        std::memcpy(&w, &f, 4);
      } else if (t.code == kDLInt) {
        int32_t v = static_cast<int32_t>(args[i].cast<int64_t>());
        std::memcpy(&w, &v, 4);
      } else {
        w = static_cast<uint32_t>(args[i].cast<int64_t>());
      }
      words.push_back(w);
    }
    int64_t work[6] = {1, 1, 1, 1, 1, 1};
    for (size_t i = 0; i < dims_.size(); ++i) work[dims_[i]] = args[arg_types_.size() + i].cast<int64_t>();
    if (work[0] <= 0 || work[1] <= 0 || work[2] <= 0) return;  // empty grid: nothing to run
    if (work[2] != 1) {
      TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << " uses blockIdx.z, which is reserved";
    }
    // fold a blockIdx.x beyond the per-dimension limit into z (the shader recomputes the linear index)
    uint64_t limit = ctx->max_workgroups_per_dim();
    uint64_t packed_x = static_cast<uint64_t>(work[0]), gx = packed_x, gz = 1;
    while (gx > limit) {
      gx = (gx + 1) / 2;
      gz *= 2;
    }
    if (static_cast<uint64_t>(work[1]) > limit || gz > limit) {
      TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << " grid (" << work[0] << ", " << work[1]
                                  << ") exceeds the adapter's " << limit << " workgroups per dimension";
    }
    words.push_back(static_cast<uint32_t>(pack_inclusive_ ? packed_x : packed_x - 1));
    ctx->Dispatch(p.pipeline, p.layout, buffers.data(), buffers.size(), words.data(), words.size(),
                  static_cast<uint32_t>(gx), static_cast<uint32_t>(work[1]), static_cast<uint32_t>(gz), &name_);
  }

  const std::string& source() const { return source_; }

 private:
  [[noreturn]] void Unsupported(const char* what, const std::string& value) {
    TVM_FFI_THROW(RuntimeError) << "webgpu kernel " << name_ << ": unsupported " << what << " " << value;
  }

  const Pipeline& PipelineFor(Context* ctx, int device_id) {
    std::lock_guard<std::mutex> lock(mu_);
    if (device_id < static_cast<int>(pipelines_.size()) && pipelines_[device_id].pipeline) {
      return pipelines_[device_id];
    }
    if (device_id >= static_cast<int>(pipelines_.size())) pipelines_.resize(device_id + 1);
    std::lock_guard<std::mutex> ctx_lock(ctx->mutex());
    WGPUDevice dev = ctx->device();
    WGPUShaderSourceWGSL wgsl;
    std::memset(&wgsl, 0, sizeof(wgsl));
    wgsl.chain.sType = WGPUSType_ShaderSourceWGSL;
    wgsl.code = WGPUStringView{source_.data(), source_.size()};
    WGPUShaderModuleDescriptor smd;
    std::memset(&smd, 0, sizeof(smd));
    smd.nextInChain = &wgsl.chain;
    smd.label = WGPUStringView{name_.data(), name_.size()};
    // TVM's kernels index within their buffers as CUDA's do (no bounds checks there either): without wgpu's
    // runtime checks naga emits plain loads (no clamp per access, no loop counters), which the driver can merge
    // into wide loads. EDGELLM_WEBGPU_CHECKS=1 keeps the checks (for debugging a kernel that faults).
    WGPUShaderModule shader = ShaderChecks() ? wgpuDeviceCreateShaderModule(dev, &smd)
                                             : wgpuDeviceCreateShaderModuleTrusted(dev, &smd, WGPUShaderRuntimeChecks_None);
    ctx->RaiseErrors(("WGSL compile of " + name_).c_str());

    std::vector<WGPUBindGroupLayoutEntry> entries(buffer_args_.size() + 1);
    for (size_t i = 0; i < entries.size(); ++i) {
      std::memset(&entries[i], 0, sizeof(WGPUBindGroupLayoutEntry));
      entries[i].binding = static_cast<uint32_t>(i);
      entries[i].visibility = WGPUShaderStage_Compute;
      entries[i].buffer.hasDynamicOffset = i == buffer_args_.size();  // the scalars' slot, set per dispatch
      entries[i].buffer.type = i == buffer_args_.size() ? WGPUBufferBindingType_Uniform
                               : writable_[i]           ? WGPUBufferBindingType_Storage
                                                        : WGPUBufferBindingType_ReadOnlyStorage;
    }
    WGPUBindGroupLayoutDescriptor bld;
    std::memset(&bld, 0, sizeof(bld));
    bld.entryCount = entries.size();
    bld.entries = entries.data();
    WGPUBindGroupLayout layout = wgpuDeviceCreateBindGroupLayout(dev, &bld);
    WGPUPipelineLayoutDescriptor pld;
    std::memset(&pld, 0, sizeof(pld));
    pld.bindGroupLayoutCount = 1;
    pld.bindGroupLayouts = &layout;
    WGPUPipelineLayout pipeline_layout = wgpuDeviceCreatePipelineLayout(dev, &pld);
    WGPUComputePipelineDescriptor cpd;
    std::memset(&cpd, 0, sizeof(cpd));
    cpd.label = smd.label;
    cpd.layout = pipeline_layout;
    cpd.compute.module = shader;
    cpd.compute.entryPoint = WGPUStringView{name_.data(), name_.size()};
    WGPUComputePipeline pipeline = wgpuDeviceCreateComputePipeline(dev, &cpd);
    wgpuPipelineLayoutRelease(pipeline_layout);
    wgpuShaderModuleRelease(shader);
    ctx->RaiseErrors(("pipeline creation of " + name_).c_str());
    pipelines_[device_id] = Pipeline{pipeline, layout};
    return pipelines_[device_id];
  }

  std::string name_;
  std::vector<DLDataType> arg_types_;
  std::string source_;
  std::vector<int> dims_;  // per launch argument: 0-2 blockIdx.xyz, 3-5 threadIdx.xyz
  std::vector<size_t> buffer_args_, pod_args_;
  std::vector<int> writable_;
  bool pack_inclusive_ = false;
  std::vector<Pipeline> pipelines_;  // by device id; never released (kernels live as long as the process)
  std::mutex mu_;
};

class WebGPUModuleNode final : public ffi::ModuleObj {
 public:
  WebGPUModuleNode(std::string bytes, std::map<std::string, std::shared_ptr<Kernel>> kernels)
      : bytes_(std::move(bytes)), kernels_(std::move(kernels)) {}

  const char* kind() const final { return "webgpu"; }
  int GetPropertyMask() const final { return ffi::Module::kBinarySerializable | ffi::Module::kRunnable; }

  ffi::Optional<ffi::Function> GetFunction(const ffi::String& name) final {
    auto it = kernels_.find(std::string(name));
    if (it == kernels_.end()) return std::nullopt;
    std::shared_ptr<Kernel> kernel = it->second;
    return ffi::Function::FromPacked([kernel](ffi::PackedArgs args, ffi::Any* rv) { kernel->Launch(args); });
  }

  ffi::Bytes SaveToBytes() const final { return ffi::Bytes(bytes_); }

  ffi::String InspectSource(const ffi::String& format) const final {
    std::string out;
    for (const auto& kv : kernels_) out += kv.second->source();
    return out;
  }

 private:
  std::string bytes_;
  std::map<std::string, std::shared_ptr<Kernel>> kernels_;
};

ffi::Module Load(const ffi::Bytes& blob) {
  std::string bytes(blob.data(), blob.size());
  Reader r(bytes);
  struct Info {
    std::vector<DLDataType> arg_types;
    std::vector<std::string> tags;
  };
  std::map<std::string, Info> infos;
  uint64_t n = r.U64();
  for (uint64_t i = 0; i < n; ++i) {
    std::string key = r.Str();
    r.Str();  // FunctionInfo.name, same as the key
    Info info;
    uint64_t k = r.U64();
    for (uint64_t j = 0; j < k; ++j) info.arg_types.push_back(r.DType());
    uint64_t t = r.U64();
    for (uint64_t j = 0; j < t; ++j) info.tags.push_back(r.Str());
    r.Skip(r.U64() * 4);  // arg_extra_tags (tensor-map tags, CUDA only)
    infos[key] = std::move(info);
  }
  std::map<std::string, std::shared_ptr<Kernel>> kernels;
  uint64_t m = r.U64();
  for (uint64_t i = 0; i < m; ++i) {
    std::string name = r.Str();
    std::string source = r.Str();
    auto it = infos.find(name);
    if (it == infos.end()) {
      TVM_FFI_THROW(RuntimeError) << "corrupt webgpu module: source of " << name << " without its function info";
    }
    kernels[name] = std::make_shared<Kernel>(name, it->second.arg_types, it->second.tags, source);
  }
  return ffi::Module(ffi::make_object<WebGPUModuleNode>(std::move(bytes), std::move(kernels)));
}

// The subgroup probe: in a (32, 4) workgroup laid out as TVM's kernels are (threadIdx.x the 32 lanes of a warp),
// lane i asks subgroupShuffleXor(i, m) for m = 1, 2, 4, 8, 16 and sets bit m where the answer is i ^ m. Kernels
// built with --opt webgpu_subgroups=N reduce a warp's lanes with xor shuffles of masks < N, which is right only
// where every run of N consecutive lanes (local_invocation_index order) sits in one subgroup; WGSL does not
// promise that layout, and adapters report no subgroup size through wgpu 0.32's Vulkan backend (lavapipe: 0, 0).
const char* kSubgroupProbe = R"(
@group(0) @binding(0) var<storage, read_write> out_ptr : array<u32>;
struct PODArgs { packGridDimX: u32 }
@group(0) @binding(1) var<uniform> podArgs : PODArgs;
@compute @workgroup_size(32, 4, 1)
fn edgellm_subgroup_probe(@builtin(local_invocation_id) threadIdx : vec3<u32>) {
  let i = threadIdx.y * 32u + threadIdx.x;
  var ok = 0u;
  ok = ok | select(0u, 1u, subgroupShuffleXor(i, 1u) == (i ^ 1u));
  ok = ok | select(0u, 2u, subgroupShuffleXor(i, 2u) == (i ^ 2u));
  ok = ok | select(0u, 4u, subgroupShuffleXor(i, 4u) == (i ^ 4u));
  ok = ok | select(0u, 8u, subgroupShuffleXor(i, 8u) == (i ^ 8u));
  ok = ok | select(0u, 16u, subgroupShuffleXor(i, 16u) == (i ^ 16u));
  out_ptr[i] = ok;
}
)";

// Lanes N (1, 2, 4, ..., 32) such that xor shuffles of every mask below N are right in all 128 probe lanes; 1
// where the adapter has no subgroups or the probe fails to compile. Run once per device, then cached.
int SubgroupLanes(int device_id) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto hit = cache.find(device_id);
  if (hit != cache.end()) return hit->second;
  Context* ctx = Context::Get(device_id);
  int lanes = 1;
  if (ctx->facts().subgroups || ctx->facts().native_subgroups) {
    static std::shared_ptr<Kernel> probe = std::make_shared<Kernel>(
        "edgellm_subgroup_probe", std::vector<DLDataType>{DLDataType{kDLOpaqueHandle, 64, 1}},
        std::vector<std::string>{"threadIdx.x", "threadIdx.y", "paramWriteAccess:[1]"}, kSubgroupProbe);
    Buffer* buf = ctx->Alloc(128 * 4);
    std::vector<uint32_t> got(128, 0);
    int prev = CurrentDevice();
    CurrentDevice() = device_id;
    try {
      ffi::AnyView packed[3] = {static_cast<void*>(buf), int64_t{32}, int64_t{4}};
      probe->Launch(ffi::PackedArgs(packed, 3));
      ctx->Read(buf, 0, got.data(), got.size() * 4);
      uint32_t all = 31;
      for (uint32_t v : got) all &= v;
      while (lanes < 32 && (all & lanes)) lanes *= 2;
    } catch (const std::exception&) {
      lanes = 1;  // the driver refused the subgroup built-ins: no subgroups for our kernels
    }
    CurrentDevice() = prev;
    ctx->Free(buf);
  }
  cache[device_id] = lanes;
  return lanes;
}

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  // lanes that kernels may reduce over with xor shuffles on this device (SubgroupLanes; opens the device)
  refl::GlobalDef().def("edgellm.webgpu.subgroup_lanes", [](int device_id) -> int { return SubgroupLanes(device_id); });
  // 0.27 looks loaders up as ffi.Module.load_from_bytes.<kind>; runtime.module.loadbinary_<kind> is the older name
  refl::GlobalDef()
      .def("ffi.Module.load_from_bytes.webgpu", Load)
      .def("runtime.module.loadbinary_webgpu", Load)
      .def("edgellm.webgpu.rewrite_wgsl", [](const ffi::String& src) -> ffi::String {
        return ffi::String(RewriteVec4Loads(std::string(src)));
      });
}

}  // namespace webgpu
}  // namespace edgellm
