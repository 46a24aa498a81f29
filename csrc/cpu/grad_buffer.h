// Dense weight gradients that are zero but for a few rows, as the fused backward ops return them.
//
// zero_except_rows: a fresh (out x in) tensor, zero outside the rows the caller writes next. When those rows
// touch at most half of its 2 MB pages it starts as on-demand zero pages (only the touched pages are ever
// written; an optimizer reading the rest maps the kernel's shared zero page); else a (cached) block with the
// zeros written.
//
// GradBuffers: in eager mode the gradient a backward returns for a weight is usually dropped before the
// next backward of that weight (optimizer.zero_grad() sets it to None). Then the next call takes the same
// buffer back and clears only the rows it wrote last time, instead of writing out x in zeros again (for a
// small layer that fill is most of the backward's time). A buffer is taken back only when nothing else holds
// its storage and its version counter shows no in-place write since it was returned; writes that bypass the
// version counter (through .data, a raw pointer or NumPy) are not seen, so MEPROP_REUSE_GRAD=0 turns this off.
// It holds one buffer per weight (counted against MEPROP_CPU_CACHE_MB), released when the weight is freed.
#pragma once

#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "large_alloc.h"

namespace meprop::cpu {

// A dense (out x in) tensor that is zero in every row whose `written` flag is 0 (the others are left for the
// caller to write in full).
inline at::Tensor zero_except_rows(int64_t out, int64_t in, const at::TensorOptions& options,
                                   const std::vector<char>& written) {
  const size_t row_bytes = static_cast<size_t>(in) * at::elementSize(at::typeMetaToScalarType(options.dtype()));
  constexpr size_t kHugePage = size_t{2} << 20;
  std::vector<char> page_touched((out * row_bytes + kHugePage - 1) / kHugePage, 0);
  for (int64_t r = 0; r < out; ++r)
    if (written[r])
      for (size_t b = r * row_bytes; b < (r + 1) * row_bytes; b = (b / kHugePage + 1) * kHugePage)
        page_touched[b / kHugePage] = 1;
  const size_t touched = std::count(page_touched.begin(), page_touched.end(), char{1});
  if (2 * touched <= page_touched.size()) {
    at::Tensor dense = zeros_on_demand({out, in}, options);
    if (dense.defined()) return dense;
  }
  at::Tensor dense = empty_for_write({out, in}, options);
  char* dst = static_cast<char*>(dense.mutable_data_ptr());
  at::parallel_for(0, out, row_grain(in), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      if (!written[r]) std::memset(dst + r * row_bytes, 0, row_bytes);  // all-zero bytes are +0.0 in every float dtype
  });
  return dense;
}

class GradBuffers {
 public:
  // A dense (out x in) gradient of `weight` in `options`, zero in the rows whose `written` flag is 0: the
  // buffer returned for this weight last time when it can be taken back (see above) and `reuse` is set, with
  // its previously written rows cleared; else zero_except_rows().
  static at::Tensor take(const at::Tensor& weight, const at::TensorOptions& options, const std::vector<char>& written,
                         bool reuse) {
    static GradBuffers* buffers = new GradBuffers();  // never destroyed: tensors may be freed at exit
    return buffers->take_impl(weight, options, written, reuse && enabled());
  }

 private:
  struct Entry {
    explicit Entry(const at::Tensor& w) : weight(w.getIntrusivePtr()) {}
    c10::weak_intrusive_ptr<c10::TensorImpl> weight;
    c10::Storage storage;
    c10::VariableVersion version;  // the returned tensor's counter (set when it is returned)
    uint32_t returned_version = 0;
    std::vector<int64_t> rows;  // the rows written last time
    int64_t out = 0, in = 0;
    at::ScalarType dtype = at::kFloat;
  };

  static bool enabled() {
    static const bool on = [] {
      const char* flag = std::getenv("MEPROP_REUSE_GRAD");
      return flag == nullptr || std::strcmp(flag, "0") != 0;
    }();
    return on;
  }

  static size_t limit_bytes() {
    static const size_t limit = [] {
      const char* mb = std::getenv("MEPROP_CPU_CACHE_MB");
      return static_cast<size_t>(mb != nullptr ? std::strtoull(mb, nullptr, 10) : 1024) << 20;
    }();
    return limit;
  }

  static std::vector<int64_t> rows_of(const std::vector<char>& written) {
    std::vector<int64_t> rows;
    for (int64_t r = 0; r < static_cast<int64_t>(written.size()); ++r)
      if (written[r]) rows.push_back(r);
    return rows;
  }

  bool can_take_back(const Entry& e, const at::Tensor& weight, int64_t out, int64_t in, at::ScalarType dtype) const {
    return !e.weight.expired() && e.weight.lock().get() == weight.unsafeGetTensorImpl() && e.storage.use_count() == 1 &&
           e.version.current_version() == e.returned_version && e.out == out && e.in == in && e.dtype == dtype;
  }

  at::Tensor take_impl(const at::Tensor& weight, const at::TensorOptions& options, const std::vector<char>& written,
                       bool reuse) {
    const int64_t out = static_cast<int64_t>(written.size()), in = weight.size(1);
    const at::ScalarType dtype = at::typeMetaToScalarType(options.dtype());
    const void* key = weight.unsafeGetTensorImpl();
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = entries_.find(key);
    if (!reuse) {
      if (found != entries_.end()) erase(found);
      return zero_except_rows(out, in, options, written);
    }
    at::Tensor grad;
    if (found != entries_.end() && can_take_back(found->second, weight, out, in, dtype)) {
      Entry& e = found->second;
      const size_t row_bytes = static_cast<size_t>(in) * at::elementSize(dtype);
      char* base = static_cast<char*>(e.storage.mutable_data());
      for (const int64_t r : e.rows)
        if (!written[r]) std::memset(base + r * row_bytes, 0, row_bytes);
      grad = at::empty({0}, options).set_(e.storage, 0, {out, in}, {in, 1});
      e.rows = rows_of(written);
    } else {
      if (found != entries_.end()) erase(found);
      grad = zero_except_rows(out, in, options, written);
      purge_expired();
      const size_t nbytes = grad.nbytes();
      if (cached_bytes_ + nbytes > limit_bytes()) return grad;
      Entry e(weight);
      e.storage = grad.storage();
      e.rows = rows_of(written);
      e.out = out;
      e.in = in;
      e.dtype = dtype;
      cached_bytes_ += nbytes;
      entries_.emplace(key, std::move(e));
    }
    Entry& e = entries_.at(key);
    e.version = grad.unsafeGetTensorImpl()->version_counter();
    e.returned_version = e.version.current_version();
    return grad;
  }

  void erase(std::unordered_map<const void*, Entry>::iterator it) {
    cached_bytes_ -= it->second.storage.nbytes();
    entries_.erase(it);
  }

  void purge_expired() {
    for (auto it = entries_.begin(); it != entries_.end();)
      if (it->second.weight.expired()) {
        cached_bytes_ -= it->second.storage.nbytes();
        it = entries_.erase(it);
      } else {
        ++it;
      }
  }

  std::mutex mutex_;
  std::unordered_map<const void*, Entry> entries_;
  size_t cached_bytes_ = 0;
};

}  // namespace meprop::cpu
