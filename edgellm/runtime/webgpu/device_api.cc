// edgellm WebGPU runtime plugin: TVM's DeviceAPI for kDLWebGPU, registered as `device_api.webgpu`.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/runtime/device_api.h>

#include <sstream>

#include "context.h"

namespace edgellm {
namespace webgpu {

int& CurrentDevice() {
  thread_local int device_id = 0;
  return device_id;
}

namespace {

using tvm::Device;
using tvm::runtime::DeviceAttrKind;

Buffer* AsBuffer(const void* ptr) { return static_cast<Buffer*>(const_cast<void*>(ptr)); }

std::string AdapterJSON(int index, const AdapterFacts& f) {
  auto quote = [](const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') out += '\\';
      if (static_cast<unsigned char>(c) >= 0x20) out += c;
    }
    return out + "\"";
  };
  const WGPULimits& l = f.limits;
  std::ostringstream os;
  os << "{\"index\": " << index << ", \"name\": " << quote(f.name) << ", \"driver\": " << quote(f.driver)
     << ", \"vendor\": " << quote(f.vendor) << ", \"backend\": " << quote(f.backend)
     << ", \"adapter_type\": " << quote(f.adapter_type) << ", \"shader_f16\": " << (f.shader_f16 ? "true" : "false")
     << ", \"subgroups\": " << (f.subgroups || f.native_subgroups ? "true" : "false")
     << ", \"timestamp_query\": " << (f.timestamps ? "true" : "false")
     << ", \"subgroup_size\": [" << f.subgroup_min_size << ", " << f.subgroup_max_size << "]"
     << ", \"max_buffer_size\": " << l.maxBufferSize
     << ", \"max_storage_buffer_binding_size\": " << l.maxStorageBufferBindingSize
     << ", \"max_storage_buffers_per_shader_stage\": " << l.maxStorageBuffersPerShaderStage
     << ", \"max_compute_workgroup_storage_size\": " << l.maxComputeWorkgroupStorageSize
     << ", \"max_compute_invocations_per_workgroup\": " << l.maxComputeInvocationsPerWorkgroup
     << ", \"max_compute_workgroups_per_dimension\": " << l.maxComputeWorkgroupsPerDimension << "}";
  return os.str();
}

class WebGPUDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  static WebGPUDeviceAPI* Global() {
    static WebGPUDeviceAPI* inst = new WebGPUDeviceAPI();
    return inst;
  }

  void SetDevice(Device dev) final { CurrentDevice() = dev.device_id; }

  void GetAttr(Device dev, DeviceAttrKind kind, tvm::ffi::Any* rv) final {
    if (kind == tvm::runtime::kExist) {
      *rv = static_cast<int>(dev.device_id >= 0 && dev.device_id < NumAdapters());
      return;
    }
    if (dev.device_id < 0 || dev.device_id >= NumAdapters()) return;
    // facts of an opened device carry the limits it was granted; otherwise the adapter's
    AdapterFacts f = DescribeAdapter(dev.device_id);
    const WGPULimits& l = f.limits;
    switch (kind) {
      case tvm::runtime::kMaxThreadsPerBlock: *rv = int64_t{l.maxComputeInvocationsPerWorkgroup}; break;
      case tvm::runtime::kWarpSize: *rv = int64_t{1}; break;
      case tvm::runtime::kMaxSharedMemoryPerBlock: *rv = int64_t{l.maxComputeWorkgroupStorageSize}; break;
      case tvm::runtime::kDeviceName: *rv = tvm::ffi::String(f.name); break;
      case tvm::runtime::kDriverVersion: *rv = tvm::ffi::String(f.driver); break;
      case tvm::runtime::kApiVersion: *rv = tvm::ffi::String(f.backend); break;
      case tvm::runtime::kMaxThreadDimensions: {
        std::ostringstream os;
        os << "[" << l.maxComputeWorkgroupSizeX << ", " << l.maxComputeWorkgroupSizeY << ", "
           << l.maxComputeWorkgroupSizeZ << "]";
        *rv = tvm::ffi::String(os.str());
        break;
      }
      default:
        break;
    }
  }

  void* AllocDataSpace(Device dev, size_t nbytes, size_t alignment, DLDataType type_hint) final {
    (void)alignment;  // buffers are bound whole: alignment is the driver's
    (void)type_hint;
    return Context::Get(dev.device_id)->Alloc(nbytes);
  }

  void FreeDataSpace(Device dev, void* ptr) final { Context::Get(dev.device_id)->Free(AsBuffer(ptr)); }

  void* AllocWorkspace(Device dev, size_t nbytes, DLDataType type_hint) final {
    (void)type_hint;
    return Context::Get(dev.device_id)->AllocWorkspace(nbytes);
  }

  void FreeWorkspace(Device dev, void* ptr) final {
    Context::Get(dev.device_id)->FreeWorkspace(AsBuffer(ptr));
  }

  void StreamSync(Device dev, TVMStreamHandle stream) final {
    (void)stream;  // one queue per device
    Context::Get(dev.device_id)->Sync();
  }

  TVMStreamHandle CreateStream(Device dev) final { return nullptr; }
  void FreeStream(Device dev, TVMStreamHandle stream) final {}
  void SetStream(Device dev, TVMStreamHandle stream) final {}
  TVMStreamHandle GetCurrentStream(Device dev) final { return nullptr; }
  void SyncStreamFromTo(Device dev, TVMStreamHandle src, TVMStreamHandle dst) final {}

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t num_bytes,
                      Device dev_from, Device dev_to, DLDataType type_hint, TVMStreamHandle stream) final {
    (void)type_hint;
    (void)stream;
    bool from_gpu = dev_from.device_type == kDLWebGPU, to_gpu = dev_to.device_type == kDLWebGPU;
    if (from_gpu && to_gpu) {
      if (dev_from.device_id == dev_to.device_id) {
        Context::Get(dev_from.device_id)
            ->Copy(AsBuffer(from), from_offset, AsBuffer(to), to_offset, num_bytes);
      } else {  // two adapters: through the host
        std::vector<uint8_t> tmp(num_bytes);
        Context::Get(dev_from.device_id)->Read(AsBuffer(from), from_offset, tmp.data(), num_bytes);
        Context::Get(dev_to.device_id)->Write(AsBuffer(to), to_offset, tmp.data(), num_bytes);
      }
    } else if (from_gpu && dev_to.device_type == kDLCPU) {
      Context::Get(dev_from.device_id)
          ->Read(AsBuffer(from), from_offset, static_cast<uint8_t*>(to) + to_offset, num_bytes);
    } else if (to_gpu && dev_from.device_type == kDLCPU) {
      Context::Get(dev_to.device_id)
          ->Write(AsBuffer(to), to_offset, static_cast<const uint8_t*>(from) + from_offset, num_bytes);
    } else {
      TVM_FFI_THROW(RuntimeError) << "webgpu cannot copy between device types " << dev_from.device_type
                                  << " and " << dev_to.device_type << " (only cpu and webgpu)";
    }
  }
};

}  // namespace

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def_packed("device_api.webgpu",
                  [](tvm::ffi::PackedArgs args, tvm::ffi::Any* rv) {
                    *rv = static_cast<void*>(WebGPUDeviceAPI::Global());
                  })
      // JSON list of the adapters this plugin sees, device 0 first (no device is opened)
      .def("edgellm.webgpu.adapters", []() -> tvm::ffi::String {
        std::string out = "[";
        for (int i = 0; i < NumAdapters(); ++i) out += (i ? ", " : "") + AdapterJSON(i, DescribeAdapter(i));
        return out + "]";
      })
      // counters of an opened device as JSON (dispatches, submits, bind groups, reads, host time, and per-kernel
      // GPU time in profile mode); reset != 0 zeroes them
      .def("edgellm.webgpu.stats", [](int device_id, int reset) -> tvm::ffi::String {
        return Context::Get(device_id)->StatsJSON(reset != 0);
      })
      .def("edgellm.webgpu.set_profile", [](int device_id, int on) { Context::Get(device_id)->SetProfile(on != 0); })
      .def("edgellm.webgpu.set_flush_every",
           [](int device_id, int n) { Context::Get(device_id)->SetFlushEvery(n < 0 ? 0 : static_cast<size_t>(n)); })
      .def("edgellm.webgpu.set_flush_first",
           [](int device_id, int n) { Context::Get(device_id)->SetFlushFirst(n < 0 ? 0 : static_cast<size_t>(n)); })
      // async device-to-host read of a whole webgpu tensor (Context::ReadBegin): a ticket now, the bytes at end
      .def("edgellm.webgpu.read_begin",
           [](DLTensor* t) -> int64_t {
             if (t->device.device_type != kDLWebGPU) {
               TVM_FFI_THROW(ValueError) << "edgellm.webgpu.read_begin needs a webgpu tensor, got device type "
                                         << t->device.device_type;
             }
             size_t n = tvm::ffi::GetDataSize(*t);
             return static_cast<int64_t>(
                 Context::Get(t->device.device_id)->ReadBegin(AsBuffer(t->data), t->byte_offset, n));
           })
      .def("edgellm.webgpu.read_end",
           [](int device_id, int64_t ticket) -> tvm::ffi::Bytes {
             std::vector<uint8_t> b = Context::Get(device_id)->ReadEnd(static_cast<uint64_t>(ticket));
             return tvm::ffi::Bytes(reinterpret_cast<const char*>(b.data()), b.size());
           })
      .def("edgellm.webgpu.set_flush_ahead",
           [](int device_id, int n) { Context::Get(device_id)->SetFlushAhead(n < 0 ? 0 : static_cast<size_t>(n)); })
      .def("edgellm.webgpu.set_spin_wait",
           [](int device_id, int us) { Context::Get(device_id)->SetSpinWait(us < 0 ? 0 : static_cast<uint64_t>(us)); });
}

}  // namespace webgpu
}  // namespace edgellm
