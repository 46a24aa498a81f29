// Allocation of the kernels' large outputs. A fresh block of tens of MB costs more than the kernel that
// fills it: the OS zeroes every page on its first touch. So blocks of 1 MB and more come from anonymous
// mappings with the transparent-huge-page hint (a few faults per MB instead of 256), and a freed block is
// kept for the next output of the same size (a training step allocates the same sizes every step), up
// to MEPROP_CPU_CACHE_MB in all (default 1024; 0 keeps none). Blocks in use are reported to PyTorch's memory
// profiler (torch.profiler with profile_memory=True) like the CPU allocator's own allocations.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>

#include <atomic>

#include <cstdlib>
#include <fstream>
#include <map>
#include <mutex>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace meprop::cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)

class BlockCache {
 public:
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may be freed at exit
    return *cache;
  }

  // An uninitialised block of `nbytes`, reused if one of that size is free; nullptr if mmap fails.
  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(nbytes);
      if (it != free_.end()) {
        void* block = it->second;
        free_.erase(it);
        cached_bytes_ -= nbytes;
        return block;
      }
    }
    return map_fresh(nbytes);
  }

  void give_back(void* block, size_t nbytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + nbytes <= limit_bytes_) {
        free_.emplace(nbytes, block);
        cached_bytes_ += nbytes;
        return;
      }
    }
    munmap(block, nbytes);
  }

  // A fresh mapping (zero-filled by the OS on first touch), hinted to use huge pages; nullptr on failure.
  static void* map_fresh(size_t nbytes) {
    void* block = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (block == MAP_FAILED) return nullptr;
    madvise(block, nbytes, MADV_HUGEPAGE);  // a hint
    return block;
  }

 private:
  BlockCache() {
    const char* mb = std::getenv("MEPROP_CPU_CACHE_MB");
    limit_bytes_ = (mb != nullptr ? std::strtoull(mb, nullptr, 10) : 1024) << 20;
  }
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_bytes_ = 0, limit_bytes_ = 0;
};

// Tells the memory profiler (when it records) that `nbytes` at `block` were taken (> 0) or given back (< 0).
inline void report_to_profiler(void* block, int64_t nbytes) {
  static std::atomic<int64_t> in_use{0};
  const int64_t total = in_use.fetch_add(nbytes) + nbytes;
  if (c10::memoryProfilingEnabled())
    c10::reportMemoryUsageToProfiler(block, nbytes, static_cast<size_t>(total), static_cast<size_t>(total),
                                     c10::Device(c10::kCPU));
}

inline size_t nbytes_of(at::IntArrayRef sizes, const at::TensorOptions& options) {
  size_t nbytes = at::elementSize(at::typeMetaToScalarType(options.dtype()));
  for (const int64_t s : sizes) nbytes *= static_cast<size_t>(s);
  return nbytes;
}

// An uninitialised tensor for an output every element of which the caller writes.
inline at::Tensor empty_for_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kMinBytes = size_t{1} << 20;
  const size_t nbytes = nbytes_of(sizes, options);
  if (nbytes < kMinBytes) return at::empty(sizes, options);
  void* block = BlockCache::instance().take(nbytes);
  if (block == nullptr) return at::empty(sizes, options);
  report_to_profiler(block, static_cast<int64_t>(nbytes));
  return at::from_blob(block, sizes, [nbytes](void* p) {
    report_to_profiler(p, -static_cast<int64_t>(nbytes));
    BlockCache::instance().give_back(p, nbytes);
  }, options);
}

// A zero tensor whose pages the OS supplies on first touch (a fresh mapping, never a cached block): a
// kernel that writes only a few rows pays only for the pages those rows touch, and a later read of an
// untouched page maps the kernel's shared huge zero page (cheap, unlike a write). Returns an undefined
// tensor below 8 MB or where huge pages or the huge zero page are off: callers then write the zeros.
inline at::Tensor zeros_on_demand(at::IntArrayRef sizes, const at::TensorOptions& options) {
  constexpr size_t kMinBytes = size_t{8} << 20;
  static const bool huge_zero_page = [] {
    auto first_line = [](const char* path) {
      std::ifstream in(path);
      std::string line;
      std::getline(in, line);
      return line;
    };
    return first_line("/sys/kernel/mm/transparent_hugepage/enabled").find("[never]") == std::string::npos &&
           first_line("/sys/kernel/mm/transparent_hugepage/use_zero_page") == "1";
  }();
  const size_t nbytes = nbytes_of(sizes, options);
  if (!huge_zero_page || nbytes < kMinBytes) return {};
  void* block = BlockCache::map_fresh(nbytes);
  if (block == nullptr) return {};
  report_to_profiler(block, static_cast<int64_t>(nbytes));
  return at::from_blob(block, sizes, [nbytes](void* p) {
    report_to_profiler(p, -static_cast<int64_t>(nbytes));
    munmap(p, nbytes);
  }, options);
}

#else

inline at::Tensor empty_for_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}

inline at::Tensor zeros_on_demand(at::IntArrayRef, const at::TensorOptions&) { return {}; }

#endif

}  // namespace meprop::cpu
