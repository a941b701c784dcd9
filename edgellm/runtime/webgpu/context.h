// edgellm WebGPU runtime plugin: one wgpu-native device (Vulkan backend) per TVM device id.
//
// TVM sees a buffer as an opaque `void*` (DLTensor::data); here that pointer is a `Buffer*`. Kernels bind the
// whole buffer; sub-tensor offsets reach the shader as `elem_offset` POD arguments, so no pointer arithmetic is
// ever done on the host (DeviceAPI::SupportsDevicePointerArithmeticsOnHost stays false).
//
// Ordering: one queue per device. Dispatches and device-to-device copies are recorded into one pending command
// encoder (consecutive dispatches into one compute pass); anything that must observe or overwrite memory from the
// host (writes, reads, Sync) submits it first. Bind groups are cached per (kernel layout, buffers) and dropped
// when one of their buffers is freed; each dispatch's scalars sit at a dynamic offset of one uniform buffer.
#ifndef EDGELLM_RUNTIME_WEBGPU_CONTEXT_H_
#define EDGELLM_RUNTIME_WEBGPU_CONTEXT_H_

#include <webgpu.h>
#include <wgpu.h>

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <string>
#include <vector>

namespace edgellm {
namespace webgpu {

struct Buffer {
  WGPUBuffer handle;
  uint64_t size;  // bytes, a multiple of 4 (WebGPU copy granularity)
};

// Host-side counters of one device (always on) and, in profile mode, GPU time per kernel; see Context::StatsJSON.
struct Stats {
  uint64_t dispatches = 0, submits = 0, encoders = 0, passes = 0, bind_groups_created = 0, bind_group_hits = 0;
  uint64_t reads = 0, writes = 0, device_copies = 0, syncs = 0;
  uint64_t record_ns = 0;  // time inside Dispatch (bind group lookup, uniform slot, recording)
  uint64_t submit_ns = 0;  // time inside Flush (finish, uniform upload, submit)
  uint64_t wait_ns = 0;    // time waiting for the queue (device-to-host reads, Sync)
  struct Kernel {
    uint64_t count = 0, gpu_ns = 0;
  };
  std::map<std::string, Kernel> kernels;  // profile mode only: GPU time by kernel name
};

// Adapter facts, for device attributes and for the Python side's report.
struct AdapterFacts {
  std::string name, driver, vendor, backend, adapter_type;
  bool shader_f16 = false, subgroups = false, native_subgroups = false, timestamps = false;
  uint32_t subgroup_min_size = 0, subgroup_max_size = 0;
  WGPULimits limits{};
};

// The device id TVM last set on this thread (DeviceAPI::SetDevice, called by the host code before a launch).
int& CurrentDevice();
// Number of adapters on the enabled backends (0 when no driver); never throws.
int NumAdapters();
// Facts of adapter `index` without creating a device; throws when out of range.
AdapterFacts DescribeAdapter(int index);

class Context {
 public:
  // The context of device `device_id`, created on first use (throws a one-line error when there is none).
  static Context* Get(int device_id);

  const AdapterFacts& facts() const { return facts_; }
  WGPUDevice device() const { return device_; }
  uint32_t max_workgroups_per_dim() const { return facts_.limits.maxComputeWorkgroupsPerDimension; }

  Buffer* Alloc(size_t nbytes);
  void Free(Buffer* buf);
  Buffer* AllocWorkspace(size_t nbytes);
  void FreeWorkspace(Buffer* buf);

  void Write(Buffer* dst, size_t offset, const void* src, size_t nbytes);
  void Read(Buffer* src, size_t offset, void* dst, size_t nbytes);
  void Copy(Buffer* src, size_t src_offset, Buffer* dst, size_t dst_offset, size_t nbytes);
  // Submits pending work and waits for the queue to drain.
  void Sync();
  // A device-to-host read that does not wait: ReadBegin records a copy of [offset, offset + nbytes) of `src`
  // (4-byte aligned) into a staging buffer of its own, submits everything recorded so far and asks for the
  // staging buffer's mapping; it returns a ticket at once, and the host goes on recording (later work queues
  // behind the copy). ReadEnd(ticket) waits for that copy alone, not for work submitted after it, and returns the
  // bytes. A greedy chain reads step k's token while step k + 1 runs. At most kMaxAsyncReads are outstanding.
  uint64_t ReadBegin(Buffer* src, size_t offset, size_t nbytes);
  std::vector<uint8_t> ReadEnd(uint64_t ticket);
  static constexpr size_t kMaxAsyncReads = 64;

  // Records one dispatch: `buffers` at bindings 0..n-1, then a uniform of `pod_words` 32-bit words. `label`
  // (the kernel's name, alive as long as the module) names it in profiles.
  void Dispatch(WGPUComputePipeline pipeline, WGPUBindGroupLayout layout, Buffer* const* buffers, size_t n_buffers,
                const uint32_t* pod_words, size_t n_words, uint32_t gx, uint32_t gy, uint32_t gz,
                const std::string* label);

  // Counters (and the profile) as JSON; `reset` zeroes them afterwards.
  std::string StatsJSON(bool reset);
  // Profile mode: every dispatch in its own compute pass with GPU timestamps, read back at each submit (slow;
  // for finding where the time goes). Needs the adapter's timestamp-query feature.
  void SetProfile(bool on);
  // Dispatches recorded before a submit (0: submit only when the host needs the queue).
  void SetFlushEvery(size_t n);
  // After the host has waited for the queue (a read, Sync), the GPU is idle: the first submit then comes after
  // `n` dispatches and each next batch is twice the last, up to the flush interval (0: every batch is that one).
  void SetFlushFirst(size_t n);
  // Dispatches recorded before a submit while an async read is outstanding (0: at the next read only).
  void SetFlushAhead(size_t n);
  // Wait for the queue by polling without blocking (the host thread spins) for up to `us` microseconds, then
  // blocking in the driver (0: block at once).
  void SetSpinWait(uint64_t us);

  // Validation errors reported by wgpu since the last call (throws them as one RuntimeError).
  void RaiseErrors(const char* what);
  std::mutex& mutex() { return mu_; }

  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

 private:
  explicit Context(int device_id);
  void Flush();  // submit the pending encoder (caller holds mu_)
  void Record(WGPUComputePipeline pipeline, WGPUBindGroupLayout layout, Buffer* const* buffers, size_t n_buffers,
              const uint32_t* pod_words, size_t n_words, uint32_t gx, uint32_t gy, uint32_t gz,
              const std::string* label);  // Dispatch's recording (caller holds mu_)
  WGPUCommandEncoder Encoder();  // the pending encoder, with no compute pass open
  WGPUComputePassEncoder Pass();  // the open compute pass of the pending encoder
  void EndPass();
  // Polls until `done` is set (nullptr: until the queue is empty), blocking in the driver (until submission
  // `index` where given, else the whole queue) or spinning. `idle_after`: the queue is idle once it returns, so
  // the next batch starts small (false for an async read: later work is still queued behind it).
  void WaitQueue(const bool* done, const WGPUSubmissionIndex* index = nullptr, bool idle_after = true);
  void ResetBatch() { batch_limit_ = flush_first_ ? std::min(flush_first_, flush_every_) : flush_every_; }
  void DropBindGroups(WGPUBuffer buffer);
  void ClearBindGroups();
  void ReadAligned(Buffer* src, size_t offset, void* dst, size_t nbytes);
  // The whole 4-byte words covering [offset, offset + nbytes) of `buf` (WebGPU copies words), from `begin`.
  struct Words {
    size_t begin;
    std::vector<uint8_t> bytes;
  };
  Words ReadWords(Buffer* buf, size_t offset, size_t nbytes);
  void WriteAligned(Buffer* dst, size_t offset, const void* src, size_t nbytes);
  static void OnError(WGPUDevice const* device, WGPUErrorType type, WGPUStringView message, void* self,
                      void*);

  int device_id_;
  AdapterFacts facts_;
  WGPUInstance instance_ = nullptr;
  WGPUAdapter adapter_ = nullptr;
  WGPUDevice device_ = nullptr;
  WGPUQueue queue_ = nullptr;
  WGPUCommandEncoder pending_ = nullptr;
  WGPUComputePassEncoder pass_ = nullptr;
  std::map<std::vector<uintptr_t>, WGPUBindGroup> bind_groups_;  // (layout, buffers...) -> group
  std::vector<uintptr_t> key_;  // scratch key of the dispatch being recorded (no allocation per dispatch)
  size_t recorded_ = 0;  // dispatches in the pending encoder
  size_t flush_every_ = 0;  // submit after this many dispatches so the GPU starts while the host records (0: never)
  size_t flush_first_ = 0;  // the first batch after a wait (0: flush_every_); batches double from there
  size_t flush_ahead_ = 0;  // the interval while async reads are outstanding (0: submit at the read)
  size_t batch_limit_ = 0;  // dispatches of the batch being recorded before its submit
  uint64_t spin_ns_ = 0;  // how long a wait polls without blocking before it blocks
  Stats stats_;
  bool profile_ = false;
  WGPUQuerySet queries_ = nullptr;
  WGPUBuffer query_resolve_ = nullptr, query_read_ = nullptr;
  std::vector<const std::string*> profiled_;  // label of each timed dispatch of the pending encoder
  std::unordered_map<WGPUBuffer, std::vector<std::vector<uintptr_t>>> groups_of_buffer_;
  // POD uniforms of the pending dispatches: one slot each, written once just before the submit.
  WGPUBuffer uniform_ = nullptr;
  std::vector<uint8_t> uniform_host_;
  size_t uniform_used_ = 0;
  size_t uniform_slot_ = 256;
  // Every device-to-host read, synchronous (Read) or not (ReadBegin / ReadEnd), is a StartRead (a copy into a
  // MapRead staging buffer, submitted with everything before it, and its map request) and a FinishRead (the wait
  // for that submission, the bytes, the staging buffer back to the pool); both with mu_ held.
  struct AsyncRead;  // a read's staging buffer, size, submission and map request (context.cc)
  std::unique_ptr<AsyncRead> StartRead(Buffer* src, size_t offset, size_t nbytes);  // offset, nbytes: 4-aligned
  void FinishRead(std::unique_ptr<AsyncRead> r, void* dst, bool idle_after);
  std::unordered_map<uint64_t, AsyncRead*> reads_;  // outstanding async reads, by ticket (owned)
  std::vector<std::pair<WGPUBuffer, uint64_t>> read_staging_free_;  // staging buffers of finished reads, reused
  uint64_t next_ticket_ = 1;
  WGPUSubmissionIndex last_submit_ = 0;  // of the last Flush
  std::multimap<uint64_t, Buffer*> workspace_free_;
  std::string errors_;
  std::mutex mu_;
};

}  // namespace webgpu
}  // namespace edgellm

#endif  // EDGELLM_RUNTIME_WEBGPU_CONTEXT_H_
