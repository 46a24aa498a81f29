// The start of lstm_forward, shared by the CPU and CUDA kernels (csrc/cpu/lstm_forward_cpu.cpp,
// csrc/cuda/lstm_forward_cuda.cu): the input GEMM of the whole sequence written straight into the gates buffer,
// and the initial state at its place in the states (semantics: meprop/lstm_reference.py's lstm_forward).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace meprop {

// gates (T, B, 4H) <- x (T, B, I) W_ih^T (+ bias), all in the accumulation type (x, w_ih contiguous); the
// states hs, cs (T + 1, B, H) get h0, c0 at step 0 (forward) or T (reverse).
inline void lstm_forward_start(const at::Tensor& x, const at::Tensor& w_ih, const std::optional<at::Tensor>& bias,
                               const at::Tensor& h0, const at::Tensor& c0, bool reverse, at::Tensor& gates,
                               at::Tensor& hs, at::Tensor& cs) {
  const int64_t steps = x.size(0), batch = x.size(1);
  if (steps * batch > 0) {
    at::Tensor flat = gates.view({steps * batch, gates.size(2)});
    const at::Tensor x2 = x.view({steps * batch, x.size(2)});
    if (bias.has_value())
      at::addmm_out(flat, bias->to(x.scalar_type()), x2, w_ih.t());
    else
      at::mm_out(flat, x2, w_ih.t());
  }
  const int64_t start = reverse ? steps : 0;
  hs.select(0, start).copy_(h0);
  cs.select(0, start).copy_(c0);
}

}  // namespace meprop
