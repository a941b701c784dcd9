// edgellm WebGPU runtime plugin: wgpu-native instance, adapters, devices, buffers and the command queue.
#include "context.h"

#include <tvm/ffi/error.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>

namespace edgellm {
namespace webgpu {

namespace {

#ifdef __APPLE__
constexpr WGPUInstanceBackend kBackends = WGPUInstanceBackend_Metal;
#else
constexpr WGPUInstanceBackend kBackends = WGPUInstanceBackend_Vulkan;
#endif

constexpr WGPUBufferUsage kStorageUsage =
    WGPUBufferUsage_Storage | WGPUBufferUsage_CopySrc | WGPUBufferUsage_CopyDst;
constexpr size_t kUniformSlots = 1024;  // dispatches recorded before a forced submit
constexpr size_t kMaxBindGroups = 8192;  // cached bind groups before the cache is cleared
// Dispatches recorded before a submit, so the GPU runs while the host records the rest of a step (the VM issues a
// decode step's few hundred dispatches and then reads): EDGELLM_WEBGPU_FLUSH overrides, 0 = only when needed.
constexpr size_t kFlushEvery = 64;
// The first batch after the host waited for the queue (the GPU is idle then, e.g. at the start of a decode step):
// submitted after this many dispatches, each next batch twice the last up to kFlushEvery. EDGELLM_WEBGPU_FLUSH_FIRST
// overrides (0 = every batch kFlushEvery).
constexpr size_t kFlushFirst = 4;
// A wait for the queue polls without blocking for up to this long, then blocks in the driver
// (EDGELLM_WEBGPU_SPIN=microseconds, 0 = block at once). H200, decode: blocking waits cost 7-25% of the tokens/s
// (docs/benchmarks/vulkan-h200.md, run 9); 5 ms covers a decode step's wait, a long prefill blocks after it.
constexpr uint64_t kSpinUs = 5000;
// While an async read is outstanding (a greedy chain: step k + 1 is recorded while step k runs), the GPU has queued
// work, so a step is submitted whole at its read (ReadBegin) instead of in batches: EDGELLM_WEBGPU_FLUSH_AHEAD=N
// submits every N dispatches then (0 = at the read only). H200, 8B decode queued ahead (run 13 in
// docs/benchmarks/vulkan-h200.md): one submit a step 390.4 tok/s (dp4a) / 329.5 (h2) against 378.1 / 321.9 in
// batches of 4, 8, ..., 64 (the submits' host time 417 against 911 us a token).
constexpr size_t kFlushAhead = 0;

uint64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Adds the time from construction to destruction to a counter.
struct Timer {
  explicit Timer(uint64_t* sink) : sink(sink), t0(NowNs()) {}
  ~Timer() { *sink += NowNs() - t0; }
  uint64_t* sink;
  uint64_t t0;
};

size_t EnvSize(const char* name, size_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  char* end = nullptr;
  unsigned long long x = std::strtoull(v, &end, 10);
  return end && *end == 0 ? static_cast<size_t>(x) : fallback;
}

std::string View(WGPUStringView v) {
  if (v.data == nullptr) return "";
  return v.length == WGPU_STRLEN ? std::string(v.data) : std::string(v.data, v.length);
}

WGPUStringView MakeView(const std::string& s) { return WGPUStringView{s.data(), s.size()}; }

uint64_t RoundUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// A wgpu callback-info struct that is processed by wgpuInstanceProcessEvents, calling `fn(..., user)`.
template <typename Info, typename Fn>
Info ProcessEventsCallback(Fn fn, void* user) {
  Info info;
  std::memset(&info, 0, sizeof(info));
  info.mode = WGPUCallbackMode_AllowProcessEvents;
  info.callback = fn;
  info.userdata1 = user;
  return info;
}

const char* BackendName(WGPUBackendType t) {
  switch (t) {
    case WGPUBackendType_Vulkan: return "vulkan";
    case WGPUBackendType_Metal: return "metal";
    case WGPUBackendType_D3D12: return "d3d12";
    case WGPUBackendType_OpenGL: return "opengl";
    case WGPUBackendType_OpenGLES: return "opengles";
    default: return "other";
  }
}

const char* AdapterTypeName(WGPUAdapterType t) {
  switch (t) {
    case WGPUAdapterType_DiscreteGPU: return "discrete";
    case WGPUAdapterType_IntegratedGPU: return "integrated";
    case WGPUAdapterType_CPU: return "cpu";
    default: return "unknown";
  }
}

// One process-wide instance and its adapters, the most capable first.
struct Registry {
  WGPUInstance instance = nullptr;
  std::vector<WGPUAdapter> adapters;
  std::vector<AdapterFacts> facts;
  std::vector<Context*> contexts;
  std::mutex mu;

  static Registry* Global() {
    static Registry* r = new Registry();  // never destroyed: wgpu teardown at exit is not needed
    return r;
  }

  Registry() {
    WGPUInstanceExtras extras;
    std::memset(&extras, 0, sizeof(extras));
    extras.chain.sType = static_cast<WGPUSType>(WGPUSType_InstanceExtras);
    extras.backends = kBackends;
    extras.flags = WGPUInstanceFlag_Default;
    WGPUInstanceDescriptor desc;
    std::memset(&desc, 0, sizeof(desc));
    desc.nextInChain = &extras.chain;
    instance = wgpuCreateInstance(&desc);
    if (instance == nullptr) return;
    WGPUInstanceEnumerateAdapterOptions opts{nullptr, kBackends};
    size_t n = wgpuInstanceEnumerateAdapters(instance, &opts, nullptr);
    std::vector<WGPUAdapter> found(n);
    if (n) wgpuInstanceEnumerateAdapters(instance, &opts, found.data());
    std::vector<std::pair<AdapterFacts, WGPUAdapter>> all;
    for (WGPUAdapter a : found) all.emplace_back(Describe(a), a);
    // device 0 is the most capable adapter: discrete, integrated, unknown, then CPU (stable within a rank)
    std::vector<std::pair<int, size_t>> order;
    for (size_t i = 0; i < all.size(); ++i) order.emplace_back(RankOf(all[i].first), i);
    std::stable_sort(order.begin(), order.end());
    for (auto& o : order) {
      facts.push_back(all[o.second].first);
      adapters.push_back(all[o.second].second);
    }
    contexts.assign(adapters.size(), nullptr);
  }

  static int RankOf(const AdapterFacts& f) {
    if (f.adapter_type == "discrete") return 0;
    if (f.adapter_type == "integrated") return 1;
    if (f.adapter_type == "unknown") return 2;
    return 3;
  }

  static AdapterFacts Describe(WGPUAdapter a) {
    AdapterFacts f;
    WGPUAdapterInfo info;
    std::memset(&info, 0, sizeof(info));
    if (wgpuAdapterGetInfo(a, &info) == WGPUStatus_Success) {
      f.name = View(info.device);
      f.driver = View(info.description);
      f.vendor = View(info.vendor);
      f.backend = BackendName(info.backendType);
      f.adapter_type = AdapterTypeName(info.adapterType);
      f.subgroup_min_size = info.subgroupMinSize;
      f.subgroup_max_size = info.subgroupMaxSize;
      wgpuAdapterInfoFreeMembers(info);
    }
    std::memset(&f.limits, 0, sizeof(f.limits));
    wgpuAdapterGetLimits(a, &f.limits);
    f.limits.nextInChain = nullptr;
    f.shader_f16 = wgpuAdapterHasFeature(a, WGPUFeatureName_ShaderF16);
    f.timestamps = wgpuAdapterHasFeature(a, WGPUFeatureName_TimestampQuery);
    // the standard feature, or wgpu-native's own (what NVIDIA's Vulkan driver shows through wgpu 0.32)
    f.subgroups = wgpuAdapterHasFeature(a, WGPUFeatureName_Subgroups);
    f.native_subgroups = wgpuAdapterHasFeature(a, static_cast<WGPUFeatureName>(WGPUNativeFeature_Subgroup));
    return f;
  }
};

struct DeviceRequest {
  WGPUDevice device = nullptr;
  std::string message;
  bool done = false;
};

void OnDevice(WGPURequestDeviceStatus status, WGPUDevice device, WGPUStringView message, void* ud, void*) {
  auto* r = static_cast<DeviceRequest*>(ud);
  r->device = status == WGPURequestDeviceStatus_Success ? device : nullptr;
  r->message = View(message);
  r->done = true;
}

struct MapRequest {
  WGPUMapAsyncStatus status = WGPUMapAsyncStatus_Error;
  std::string message;
  bool done = false;
};

void OnMapped(WGPUMapAsyncStatus status, WGPUStringView message, void* ud, void*) {
  auto* r = static_cast<MapRequest*>(ud);
  r->status = status;
  r->message = View(message);
  r->done = true;
}

void OnDeviceLost(WGPUDevice const*, WGPUDeviceLostReason reason, WGPUStringView message, void*, void*) {
  (void)reason;
  (void)message;  // surfaced through the next validation error instead
}

}  // namespace

int NumAdapters() { return static_cast<int>(Registry::Global()->adapters.size()); }

AdapterFacts DescribeAdapter(int index) {
  Registry* r = Registry::Global();
  if (index < 0 || index >= static_cast<int>(r->facts.size())) {
    TVM_FFI_THROW(RuntimeError) << "webgpu device " << index << " does not exist: " << r->facts.size()
                                << " Vulkan adapter(s) found";
  }
  return r->facts[index];
}

Context* Context::Get(int device_id) {
  Registry* r = Registry::Global();
  std::lock_guard<std::mutex> lock(r->mu);
  if (device_id < 0 || device_id >= static_cast<int>(r->adapters.size())) {
    if (r->adapters.empty()) {
      TVM_FFI_THROW(RuntimeError) << "no Vulkan device found by wgpu-native: install a Vulkan driver "
                                     "(e.g. Debian's mesa-vulkan-drivers and libvulkan1)";
    }
    TVM_FFI_THROW(RuntimeError) << "webgpu device " << device_id << " does not exist: " << r->adapters.size()
                                << " Vulkan adapter(s) found";
  }
  if (r->contexts[device_id] == nullptr) r->contexts[device_id] = new Context(device_id);
  return r->contexts[device_id];
}

Context::Context(int device_id) : device_id_(device_id) {
  Registry* r = Registry::Global();
  instance_ = r->instance;
  adapter_ = r->adapters[device_id];
  facts_ = r->facts[device_id];

  std::vector<WGPUFeatureName> features;
  if (facts_.shader_f16) features.push_back(WGPUFeatureName_ShaderF16);
  if (facts_.subgroups) features.push_back(WGPUFeatureName_Subgroups);
  if (facts_.native_subgroups) features.push_back(static_cast<WGPUFeatureName>(WGPUNativeFeature_Subgroup));
  if (facts_.timestamps) features.push_back(WGPUFeatureName_TimestampQuery);  // profile mode
  WGPULimits required = facts_.limits;  // ask for everything the adapter offers
  required.nextInChain = nullptr;

  WGPUDeviceDescriptor desc;
  std::memset(&desc, 0, sizeof(desc));
  std::string label = "edgellm";
  desc.label = MakeView(label);
  desc.requiredFeatureCount = features.size();
  desc.requiredFeatures = features.data();
  desc.requiredLimits = &required;
  desc.deviceLostCallbackInfo.mode = WGPUCallbackMode_AllowSpontaneous;
  desc.deviceLostCallbackInfo.callback = OnDeviceLost;
  desc.uncapturedErrorCallbackInfo.callback = &Context::OnError;
  desc.uncapturedErrorCallbackInfo.userdata1 = this;

  DeviceRequest req;
  wgpuAdapterRequestDevice(adapter_, &desc,
                           ProcessEventsCallback<WGPURequestDeviceCallbackInfo>(OnDevice, &req));
  for (int i = 0; i < 1000 && !req.done; ++i) wgpuInstanceProcessEvents(instance_);
  if (req.device == nullptr) {
    TVM_FFI_THROW(RuntimeError) << "wgpu-native could not open " << facts_.name << ": " << req.message;
  }
  device_ = req.device;
  queue_ = wgpuDeviceGetQueue(device_);
  wgpuDeviceGetLimits(device_, &facts_.limits);
  facts_.limits.nextInChain = nullptr;

  uniform_slot_ = std::max<size_t>(256, facts_.limits.minUniformBufferOffsetAlignment);
  uniform_host_.assign(uniform_slot_ * kUniformSlots, 0);
  WGPUBufferDescriptor ud;
  std::memset(&ud, 0, sizeof(ud));
  ud.usage = WGPUBufferUsage_Uniform | WGPUBufferUsage_CopyDst;
  ud.size = uniform_host_.size();
  uniform_ = wgpuDeviceCreateBuffer(device_, &ud);
  flush_every_ = std::min(EnvSize("EDGELLM_WEBGPU_FLUSH", kFlushEvery), kUniformSlots);
  flush_first_ = EnvSize("EDGELLM_WEBGPU_FLUSH_FIRST", kFlushFirst);
  flush_ahead_ = std::min(EnvSize("EDGELLM_WEBGPU_FLUSH_AHEAD", kFlushAhead), kUniformSlots);
  spin_ns_ = EnvSize("EDGELLM_WEBGPU_SPIN", kSpinUs) * 1000;
  ResetBatch();
  if (EnvSize("EDGELLM_WEBGPU_PROFILE", 0)) SetProfile(true);
}

void Context::SetProfile(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  Flush();
  if (on && !facts_.timestamps) {
    TVM_FFI_THROW(RuntimeError) << "webgpu profiling needs timestamp queries, which " << facts_.name << " lacks";
  }
  if (on && queries_ == nullptr) {
    WGPUQuerySetDescriptor qd;
    std::memset(&qd, 0, sizeof(qd));
    qd.type = WGPUQueryType_Timestamp;
    qd.count = 2 * kUniformSlots;
    queries_ = wgpuDeviceCreateQuerySet(device_, &qd);
    WGPUBufferDescriptor bd;
    std::memset(&bd, 0, sizeof(bd));
    bd.size = 2 * kUniformSlots * 8;
    bd.usage = WGPUBufferUsage_QueryResolve | WGPUBufferUsage_CopySrc;
    query_resolve_ = wgpuDeviceCreateBuffer(device_, &bd);
    bd.usage = WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst;
    query_read_ = wgpuDeviceCreateBuffer(device_, &bd);
    RaiseErrors("profile set-up");
  }
  profile_ = on;
}

void Context::SetFlushEvery(size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  flush_every_ = std::min(n, kUniformSlots);
  ResetBatch();
}

void Context::SetFlushAhead(size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  flush_ahead_ = std::min(n, kUniformSlots);
}

void Context::SetFlushFirst(size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  flush_first_ = n;
  ResetBatch();
}

void Context::SetSpinWait(uint64_t us) {
  std::lock_guard<std::mutex> lock(mu_);
  spin_ns_ = us * 1000;
}

void Context::WaitQueue(const bool* done, const WGPUSubmissionIndex* index, bool idle_after) {
  uint64_t t0 = NowNs();
  while (errors_.empty()) {
    bool block = spin_ns_ == 0 || NowNs() - t0 >= spin_ns_;
    // true: every submitted command buffer has finished (blocking with `index`: that submission has)
    bool empty = wgpuDevicePoll(device_, block, block ? index : nullptr);
    if (done == nullptr) {
      if (empty || block) break;
    } else {
      wgpuInstanceProcessEvents(instance_);
      if (*done) break;
    }
  }
  if (idle_after) ResetBatch();  // the GPU is idle now: start the next batch small
}

std::string Context::StatsJSON(bool reset) {
  std::lock_guard<std::mutex> lock(mu_);
  const Stats& s = stats_;
  std::ostringstream os;
  os << "{\"dispatches\": " << s.dispatches << ", \"submits\": " << s.submits << ", \"encoders\": " << s.encoders
     << ", \"passes\": " << s.passes << ", \"bind_groups_created\": " << s.bind_groups_created
     << ", \"bind_group_hits\": " << s.bind_group_hits << ", \"reads\": " << s.reads << ", \"writes\": " << s.writes
     << ", \"device_copies\": " << s.device_copies << ", \"syncs\": " << s.syncs << ", \"record_ns\": " << s.record_ns
     << ", \"submit_ns\": " << s.submit_ns << ", \"wait_ns\": " << s.wait_ns << ", \"flush_every\": " << flush_every_
     << ", \"flush_first\": " << flush_first_ << ", \"flush_ahead\": " << flush_ahead_ << ", \"spin_us\": " << spin_ns_ / 1000
     << ", \"profile\": " << (profile_ ? "true" : "false") << ", \"kernels\": {";
  bool first = true;
  for (const auto& kv : s.kernels) {
    os << (first ? "" : ", ") << "\"" << kv.first << "\": [" << kv.second.count << ", " << kv.second.gpu_ns << "]";
    first = false;
  }
  os << "}}";
  if (reset) stats_ = Stats();
  return os.str();
}

void Context::OnError(WGPUDevice const*, WGPUErrorType type, WGPUStringView message, void* self, void*) {
  auto* ctx = static_cast<Context*>(self);
  if (!ctx->errors_.empty()) ctx->errors_ += "; ";
  ctx->errors_ += (type == WGPUErrorType_OutOfMemory ? "out of memory: " : "") + View(message);
}

void Context::RaiseErrors(const char* what) {
  if (errors_.empty()) return;
  std::string msg;
  msg.swap(errors_);
  // wgpu messages are multi-line; keep the error to one line
  std::replace(msg.begin(), msg.end(), '\n', ' ');
  TVM_FFI_THROW(RuntimeError) << "webgpu " << what << " failed on " << facts_.name << ": " << msg;
}

Buffer* Context::Alloc(size_t nbytes) {
  uint64_t size = RoundUp(std::max<size_t>(nbytes, 4), 4);
  if (size > facts_.limits.maxBufferSize) {
    TVM_FFI_THROW(RuntimeError) << "webgpu buffer of " << nbytes << " bytes exceeds maxBufferSize "
                                << facts_.limits.maxBufferSize << " of " << facts_.name;
  }
  std::lock_guard<std::mutex> lock(mu_);
  WGPUBufferDescriptor desc;
  std::memset(&desc, 0, sizeof(desc));
  desc.usage = kStorageUsage;
  desc.size = size;
  WGPUBuffer b = wgpuDeviceCreateBuffer(device_, &desc);
  RaiseErrors("buffer allocation");
  if (b == nullptr) TVM_FFI_THROW(RuntimeError) << "webgpu could not allocate " << nbytes << " bytes";
  return new Buffer{b, size};
}

void Context::Free(Buffer* buf) {
  if (buf == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  DropBindGroups(buf->handle);
  // wgpu keeps the memory alive while recorded or submitted commands still use it
  wgpuBufferRelease(buf->handle);
  delete buf;
}

Buffer* Context::AllocWorkspace(size_t nbytes) {
  uint64_t size = RoundUp(std::max<size_t>(nbytes, 4), 256);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = workspace_free_.lower_bound(size);
    if (it != workspace_free_.end() && it->first <= size * 2) {
      Buffer* b = it->second;
      workspace_free_.erase(it);
      return b;
    }
  }
  return Alloc(size);
}

void Context::FreeWorkspace(Buffer* buf) {
  if (buf == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  workspace_free_.emplace(buf->size, buf);
}

WGPUCommandEncoder Context::Encoder() {
  EndPass();  // copies are recorded outside compute passes
  if (pending_ == nullptr) {
    pending_ = wgpuDeviceCreateCommandEncoder(device_, nullptr);
    ++stats_.encoders;
  }
  return pending_;
}

WGPUComputePassEncoder Context::Pass() {
  if (pass_ == nullptr) {
    WGPUComputePassDescriptor pd;
    std::memset(&pd, 0, sizeof(pd));
    WGPUPassTimestampWrites tw;
    std::memset(&tw, 0, sizeof(tw));
    if (profile_) {  // one pass per dispatch, timed
      tw.querySet = queries_;
      tw.beginningOfPassWriteIndex = static_cast<uint32_t>(2 * profiled_.size());
      tw.endOfPassWriteIndex = tw.beginningOfPassWriteIndex + 1;
      pd.timestampWrites = &tw;
    }
    pass_ = wgpuCommandEncoderBeginComputePass(Encoder(), &pd);
    ++stats_.passes;
  }
  return pass_;
}

void Context::EndPass() {
  if (pass_ == nullptr) return;
  wgpuComputePassEncoderEnd(pass_);
  wgpuComputePassEncoderRelease(pass_);
  pass_ = nullptr;
}

void Context::Flush() {
  if (pending_ == nullptr) return;
  Timer timer(&stats_.submit_ns);
  EndPass();
  size_t timed = profiled_.size();
  if (timed) {
    wgpuCommandEncoderResolveQuerySet(pending_, queries_, 0, static_cast<uint32_t>(2 * timed), query_resolve_, 0);
    wgpuCommandEncoderCopyBufferToBuffer(pending_, query_resolve_, 0, query_read_, 0, 16 * timed);
  }
  if (uniform_used_ > 0) {
    wgpuQueueWriteBuffer(queue_, uniform_, 0, uniform_host_.data(), uniform_used_);
    uniform_used_ = 0;
  }
  WGPUCommandBuffer cmd = wgpuCommandEncoderFinish(pending_, nullptr);
  wgpuCommandEncoderRelease(pending_);
  pending_ = nullptr;
  recorded_ = 0;
  last_submit_ = wgpuQueueSubmitForIndex(queue_, 1, &cmd);
  wgpuCommandBufferRelease(cmd);
  ++stats_.submits;
  RaiseErrors("submit");
  if (timed) {  // profile mode: wait for this submit and add each dispatch's GPU time to its kernel
    MapRequest req;
    wgpuBufferMapAsync(query_read_, WGPUMapMode_Read, 0, 16 * timed,
                       ProcessEventsCallback<WGPUBufferMapCallbackInfo>(OnMapped, &req));
    WaitQueue(&req.done);
    RaiseErrors("profile read");
    const uint64_t* t = static_cast<const uint64_t*>(wgpuBufferGetConstMappedRange(query_read_, 0, 16 * timed));
    double period = wgpuQueueGetTimestampPeriod(queue_);
    for (size_t i = 0; i < timed; ++i) {
      Stats::Kernel& k = stats_.kernels[profiled_[i] ? *profiled_[i] : std::string("?")];
      ++k.count;
      if (t[2 * i + 1] > t[2 * i]) k.gpu_ns += static_cast<uint64_t>((t[2 * i + 1] - t[2 * i]) * period);
    }
    wgpuBufferUnmap(query_read_);
    profiled_.clear();
  }
}

void Context::Sync() {
  std::lock_guard<std::mutex> lock(mu_);
  Flush();
  ++stats_.syncs;
  Timer timer(&stats_.wait_ns);
  WaitQueue(nullptr);
  RaiseErrors("sync");
}

void Context::WriteAligned(Buffer* dst, size_t offset, const void* src, size_t nbytes) {
  Flush();  // queue writes land before any later submit: earlier recorded work must go first
  ++stats_.writes;
  wgpuQueueWriteBuffer(queue_, dst->handle, offset, src, nbytes);
  RaiseErrors("host-to-device copy");
}

// Whether a host copy of `nbytes` at `offset` has anything to do; throws when it would leave `buf` (`what`:
// "read" or "write", for the message).
static bool CopyNeeded(const char* what, const Buffer* buf, size_t offset, size_t nbytes) {
  if (offset + nbytes > buf->size) {
    TVM_FFI_THROW(RuntimeError) << "webgpu " << what << " of " << nbytes << " bytes at " << offset
                                << " overruns a buffer of " << buf->size;
  }
  return nbytes > 0;
}

void Context::Write(Buffer* dst, size_t offset, const void* src, size_t nbytes) {
  if (!CopyNeeded("write", dst, offset, nbytes)) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (offset % 4 == 0 && nbytes % 4 == 0) return WriteAligned(dst, offset, src, nbytes);
  // WebGPU writes whole 4-byte words: read the covering words, patch, write back
  Words w = ReadWords(dst, offset, nbytes);
  std::memcpy(w.bytes.data() + (offset - w.begin), src, nbytes);
  WriteAligned(dst, w.begin, w.bytes.data(), w.bytes.size());
}

Context::Words Context::ReadWords(Buffer* buf, size_t offset, size_t nbytes) {
  Words w{offset / 4 * 4, {}};
  w.bytes.resize(RoundUp(offset + nbytes, 4) - w.begin);
  ReadAligned(buf, w.begin, w.bytes.data(), w.bytes.size());
  return w;
}

void Context::ReadAligned(Buffer* src, size_t offset, void* dst, size_t nbytes) {
  FinishRead(StartRead(src, offset, nbytes), dst, true);  // the queue is empty after it: the GPU is idle
}

void Context::Read(Buffer* src, size_t offset, void* dst, size_t nbytes) {
  if (!CopyNeeded("read", src, offset, nbytes)) return;
  std::lock_guard<std::mutex> lock(mu_);
  if (offset % 4 == 0 && nbytes % 4 == 0) return ReadAligned(src, offset, dst, nbytes);
  Words w = ReadWords(src, offset, nbytes);
  std::memcpy(dst, w.bytes.data() + (offset - w.begin), nbytes);
}

struct Context::AsyncRead {
  WGPUBuffer staging;
  uint64_t size;  // of `staging`
  size_t nbytes;
  WGPUSubmissionIndex submission;
  MapRequest req;
};

std::unique_ptr<Context::AsyncRead> Context::StartRead(Buffer* src, size_t offset, size_t nbytes) {
  auto r = std::make_unique<AsyncRead>(AsyncRead{nullptr, 0, nbytes, 0, {}});
  // the smallest free staging buffer that holds it; when none does, the free ones are all too small: released
  auto best = read_staging_free_.end();
  for (auto it = read_staging_free_.begin(); it != read_staging_free_.end(); ++it) {
    if (it->second >= nbytes && (best == read_staging_free_.end() || it->second < best->second)) best = it;
  }
  if (best != read_staging_free_.end()) {
    r->staging = best->first;
    r->size = best->second;
    read_staging_free_.erase(best);
  } else {
    for (auto& f : read_staging_free_) wgpuBufferRelease(f.first);
    read_staging_free_.clear();
    r->size = RoundUp(std::max<size_t>(nbytes, 256), 256);
    WGPUBufferDescriptor desc;
    std::memset(&desc, 0, sizeof(desc));
    desc.usage = WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst;
    desc.size = r->size;
    r->staging = wgpuDeviceCreateBuffer(device_, &desc);
  }
  wgpuCommandEncoderCopyBufferToBuffer(Encoder(), src->handle, offset, r->staging, 0, nbytes);
  Flush();
  r->submission = last_submit_;
  ++stats_.reads;
  wgpuBufferMapAsync(r->staging, WGPUMapMode_Read, 0, nbytes,
                     ProcessEventsCallback<WGPUBufferMapCallbackInfo>(OnMapped, &r->req));
  return r;
}

void Context::FinishRead(std::unique_ptr<AsyncRead> r, void* dst, bool idle_after) {
  {
    Timer timer(&stats_.wait_ns);
    WaitQueue(&r->req.done, &r->submission, idle_after);
  }
  bool ok = errors_.empty() && r->req.status == WGPUMapAsyncStatus_Success;
  if (ok) {
    std::memcpy(dst, wgpuBufferGetConstMappedRange(r->staging, 0, r->nbytes), r->nbytes);
    wgpuBufferUnmap(r->staging);
    read_staging_free_.emplace_back(r->staging, r->size);
  } else {
    wgpuBufferRelease(r->staging);  // its mapping may still be pending: never reuse it
  }
  RaiseErrors("device-to-host copy");
  if (!ok) {
    TVM_FFI_THROW(RuntimeError) << "webgpu device-to-host copy failed on " << facts_.name << ": " << r->req.message;
  }
}

uint64_t Context::ReadBegin(Buffer* src, size_t offset, size_t nbytes) {
  if (offset % 4 || nbytes % 4 || nbytes == 0) {
    TVM_FFI_THROW(ValueError) << "webgpu async read of " << nbytes << " bytes at " << offset
                              << ": both must be non-zero multiples of 4 (read the covering words)";
  }
  CopyNeeded("read", src, offset, nbytes);
  std::lock_guard<std::mutex> lock(mu_);
  if (reads_.size() >= kMaxAsyncReads) {
    TVM_FFI_THROW(RuntimeError) << "webgpu has " << reads_.size()
                                << " async reads outstanding; end some (ReadEnd) before starting more";
  }
  std::unique_ptr<AsyncRead> r = StartRead(src, offset, nbytes);
  uint64_t ticket = next_ticket_++;
  reads_.emplace(ticket, r.release());
  return ticket;
}

std::vector<uint8_t> Context::ReadEnd(uint64_t ticket) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = reads_.find(ticket);
  if (it == reads_.end()) {
    TVM_FFI_THROW(ValueError) << "webgpu async read " << ticket << " is not outstanding (each ticket ends once)";
  }
  std::unique_ptr<AsyncRead> r(it->second);
  reads_.erase(it);
  std::vector<uint8_t> out(r->nbytes);
  FinishRead(std::move(r), out.data(), false);  // later work may still be queued behind it
  return out;
}

void Context::Copy(Buffer* src, size_t src_offset, Buffer* dst, size_t dst_offset, size_t nbytes) {
  if (nbytes == 0) return;
  if (src_offset + nbytes > src->size || dst_offset + nbytes > dst->size) {
    TVM_FFI_THROW(RuntimeError) << "webgpu device copy of " << nbytes << " bytes overruns a buffer";
  }
  if (src_offset % 4 == 0 && dst_offset % 4 == 0 && nbytes % 4 == 0 && src != dst) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.device_copies;
    wgpuCommandEncoderCopyBufferToBuffer(Encoder(), src->handle, src_offset, dst->handle, dst_offset, nbytes);
    return;
  }
  // unaligned or within one buffer (WebGPU forbids both): through the host
  std::vector<uint8_t> tmp(nbytes);
  Read(src, src_offset, tmp.data(), nbytes);
  Write(dst, dst_offset, tmp.data(), nbytes);
}

void Context::Dispatch(WGPUComputePipeline pipeline, WGPUBindGroupLayout layout, Buffer* const* buffers,
                       size_t n_buffers, const uint32_t* pod_words, size_t n_words, uint32_t gx, uint32_t gy,
                       uint32_t gz, const std::string* label) {
  std::lock_guard<std::mutex> lock(mu_);
  {
    Timer timer(&stats_.record_ns);  // the submits below count in submit_ns only
    Record(pipeline, layout, buffers, n_buffers, pod_words, n_words, gx, gy, gz, label);
  }
  if (!reads_.empty()) {  // queued ahead: the GPU has work, submit at the read (or every flush_ahead_)
    if (flush_ahead_ && recorded_ >= flush_ahead_) Flush();
  } else if (flush_every_ && recorded_ >= batch_limit_) {
    Flush();
    batch_limit_ = std::min(2 * batch_limit_, flush_every_);
  }
}

void Context::Record(WGPUComputePipeline pipeline, WGPUBindGroupLayout layout, Buffer* const* buffers,
                     size_t n_buffers, const uint32_t* pod_words, size_t n_words, uint32_t gx, uint32_t gy,
                     uint32_t gz, const std::string* label) {
  size_t pod_bytes = RoundUp(n_words * 4, 16);
  if (pod_bytes > uniform_slot_) {
    TVM_FFI_THROW(RuntimeError) << "webgpu kernel has " << n_words << " scalar arguments, more than "
                                << uniform_slot_ / 4 << " supported";
  }
  if (uniform_used_ + uniform_slot_ > uniform_host_.size()) Flush();
  size_t slot = uniform_used_;
  std::memcpy(uniform_host_.data() + slot, pod_words, n_words * 4);  // the rest of the slot is never read
  uniform_used_ += uniform_slot_;

  // one bind group per (kernel layout, buffers), reused: the scalars' slot is the uniform's dynamic offset
  key_.clear();
  key_.push_back(reinterpret_cast<uintptr_t>(layout));
  for (size_t i = 0; i < n_buffers; ++i) key_.push_back(reinterpret_cast<uintptr_t>(buffers[i]->handle));
  auto it = bind_groups_.find(key_);
  WGPUBindGroup group;
  if (it != bind_groups_.end()) {
    group = it->second;
    ++stats_.bind_group_hits;
  } else {
    if (bind_groups_.size() >= kMaxBindGroups) ClearBindGroups();
    std::vector<WGPUBindGroupEntry> entries(n_buffers + 1);
    for (size_t i = 0; i <= n_buffers; ++i) {
      std::memset(&entries[i], 0, sizeof(WGPUBindGroupEntry));
      entries[i].binding = static_cast<uint32_t>(i);
      if (i < n_buffers) {
        entries[i].buffer = buffers[i]->handle;
        entries[i].size = buffers[i]->size;
      } else {
        entries[i].buffer = uniform_;
        entries[i].size = pod_bytes;
      }
    }
    WGPUBindGroupDescriptor bd;
    std::memset(&bd, 0, sizeof(bd));
    bd.layout = layout;
    bd.entryCount = entries.size();
    bd.entries = entries.data();
    group = wgpuDeviceCreateBindGroup(device_, &bd);
    ++stats_.bind_groups_created;
    if (!errors_.empty()) {  // e.g. a binding over maxStorageBufferBindingSize: fail before recording anything
      uniform_used_ -= uniform_slot_;
      wgpuBindGroupRelease(group);
      RaiseErrors("kernel launch");
    }
    bind_groups_.emplace(key_, group);
    for (size_t i = 0; i < n_buffers; ++i) groups_of_buffer_[buffers[i]->handle].push_back(key_);
  }

  // consecutive dispatches share one compute pass (wgpu orders them: storage writes are visible to later ones)
  WGPUComputePassEncoder pass = Pass();
  uint32_t dynamic_offset = static_cast<uint32_t>(slot);
  wgpuComputePassEncoderSetPipeline(pass, pipeline);
  wgpuComputePassEncoderSetBindGroup(pass, 0, group, 1, &dynamic_offset);
  wgpuComputePassEncoderDispatchWorkgroups(pass, gx, gy, gz);
  ++stats_.dispatches;
  ++recorded_;
  if (profile_) {
    profiled_.push_back(label);
    EndPass();
  }
  RaiseErrors("kernel launch");
}

void Context::DropBindGroups(WGPUBuffer buffer) {
  auto it = groups_of_buffer_.find(buffer);
  if (it == groups_of_buffer_.end()) return;
  for (const auto& key : it->second) {
    auto g = bind_groups_.find(key);
    if (g == bind_groups_.end()) continue;  // already dropped through another of its buffers
    wgpuBindGroupRelease(g->second);
    bind_groups_.erase(g);
  }
  groups_of_buffer_.erase(it);
}

void Context::ClearBindGroups() {
  for (auto& kv : bind_groups_) wgpuBindGroupRelease(kv.second);
  bind_groups_.clear();
  groups_of_buffer_.clear();
}

}  // namespace webgpu
}  // namespace edgellm
