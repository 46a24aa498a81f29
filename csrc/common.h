// Shared by csrc/cpu and csrc/cuda: the accumulation type, and the host-side argument checks of the ops.
// Each check is the twin of the function of the same name in meprop/checks.py: the same condition,
// exception type and message (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_INDEX -> IndexError), so every backend rejects a bad argument the same way. Index values are
// checked by the CPU kernels (cpu/common.h) and, with device assertions, by the CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cctype>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>
#include <string>

namespace meprop {

// Products and sums of half/bfloat16/float inputs accumulate in float, of double inputs in double.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Acc<T>::type;

// The tensor dtype of acc_t: double for double, float for the others.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace meprop

namespace meprop::checks {

// Torch's Python name of a dtype ("torch.float32"), as meprop/checks.py prints it.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // the float8 types: "Float8_e4m3fn" -> "torch.float8_e4m3fn"
      std::string name = c10::toString(t);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

inline bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// t is a 2-D float16/bfloat16/float32/float64 tensor.
inline void matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, "meprop.", op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float(t), "meprop.", op, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(t.scalar_type()));
}

// t is a dims-D float16/bfloat16/float32/float64 tensor (matrix() for dims = 2).
inline void array(const char* op, const char* name, const at::Tensor& t, int64_t dims) {
  TORCH_CHECK_VALUE(t.dim() == dims, "meprop.", op, ": ", name, " must be ", dims, "-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(is_float(t), "meprop.", op, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(t.scalar_type()));
}

// t has other's dtype and device.
inline void like(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                 const at::Tensor& other) {
  TORCH_CHECK_TYPE(t.scalar_type() == other.scalar_type(), "meprop.", op, ": ", name, " is ",
                   dtype_name(t.scalar_type()), " but ", other_name, " is ", dtype_name(other.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == other.device(), "meprop.", op, ": ", name, " is on ", t.device(), " but ",
                    other_name, " is on ", other.device());
}

// t is a 1-D tensor of dy's accumulation dtype (float64 for float64, else float32) on dy's device.
inline void accumulator(const char* op, const char* name, const at::Tensor& t, const at::Tensor& dy) {
  array(op, name, t, 1);
  const at::ScalarType want = acc_dtype(dy.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == want, "meprop.", op, ": ", name, " must be ", dtype_name(want),
                   " (the accumulation dtype of ", dtype_name(dy.scalar_type()), " dy), got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == dy.device(), "meprop.", op, ": ", name, " is on ", t.device(), " but dy is on ",
                    dy.device());
}

// value lies in (0, 1].
inline void decay(const char* op, double value) {
  TORCH_CHECK_VALUE(value > 0.0 && value <= 1.0, "meprop.", op, ": decay must lie in (0, 1], got ", value);
}

// k lies in [1, n_cols].
inline void k_range(const char* op, int64_t k, int64_t n_cols) {
  TORCH_CHECK_VALUE(k >= 1 && k <= n_cols, "meprop.", op, ": k must lie in [1, ", n_cols, "], got ", k);
}

// Two sizes (or shapes) that must agree; `what` names them, e.g. "dy columns and weight rows".
template <typename A>
inline void size_match(const char* op, const char* what, const A& a, const A& b) {
  TORCH_CHECK_VALUE(a == b, "meprop.", op, ": ", what, " must match, got ", a, " and ", b);
}

inline void out_features(const char* op, int64_t n) {
  TORCH_CHECK_VALUE(n >= 0, "meprop.", op, ": out_features must be >= 0, got ", n);
}

// idx is an int64 tensor of `dims` dimensions on like's device.
inline void index(const char* op, const char* name, const at::Tensor& idx, int64_t dims, const at::Tensor& like) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "meprop.", op, ": ", name, " must be int64, got ",
                   dtype_name(idx.scalar_type()));
  TORCH_CHECK_VALUE(idx.dim() == dims, "meprop.", op, ": ", name, " must be ", dims, "-D, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.device() == like.device(), "meprop.", op, ": ", name, " is on ", idx.device(),
                    " but the other tensors are on ", like.device());
}

// The argument checks of each op, in the order of meprop/opdefs.py (index values last, by the kernels).
inline void topk(const char* op, const at::Tensor& dy, int64_t k) {
  matrix(op, "dy", dy);
  k_range(op, k, dy.size(1));
}

inline void linear_input_grad_unified(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& idx) {
  constexpr const char* op = "linear_input_grad_unified";
  matrix(op, "dy", dy);
  matrix(op, "weight", weight);
  like(op, "weight", weight, "dy", dy);
  size_match(op, "dy columns and weight rows", dy.size(1), weight.size(0));
  index(op, "idx", idx, 1, dy);
}

inline void linear_weight_grad_unified(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& idx) {
  constexpr const char* op = "linear_weight_grad_unified";
  matrix(op, "dy", dy);
  matrix(op, "x", x);
  like(op, "x", x, "dy", dy);
  size_match(op, "dy rows and x rows", dy.size(0), x.size(0));
  index(op, "idx", idx, 1, dy);
}

inline void rows_pair(const char* op, const at::Tensor& vals, const at::Tensor& idx) {
  matrix(op, "vals", vals);
  index(op, "idx", idx, 2, vals);
  size_match(op, "idx and vals shapes", idx.sizes(), vals.sizes());
}

inline void linear_input_grad_rows(const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& weight) {
  constexpr const char* op = "linear_input_grad_rows";
  matrix(op, "weight", weight);
  rows_pair(op, vals, idx);
  like(op, "vals", vals, "weight", weight);
}

inline void linear_weight_grad_rows(const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& x,
                                    int64_t n_out, const std::optional<at::Tensor>& rows) {
  constexpr const char* op = "linear_weight_grad_rows";
  out_features(op, n_out);
  matrix(op, "x", x);
  rows_pair(op, vals, idx);
  like(op, "vals", vals, "x", x);
  size_match(op, "vals rows and x rows", vals.size(0), x.size(0));
  if (rows.has_value()) index(op, "rows", *rows, 1, x);
}

inline void scatter_rows(const at::Tensor& rows, const at::Tensor& idx, int64_t n_out) {
  constexpr const char* op = "scatter_rows";
  out_features(op, n_out);
  matrix(op, "rows", rows);
  index(op, "idx", idx, 1, rows);
  size_match(op, "idx entries and rows", idx.size(0), rows.size(0));
}

// topk_unified_feedback: dy (N, out), k in [1, out], memory (out,) of the accumulation dtype, decay in (0, 1].
inline void topk_unified_feedback(const at::Tensor& dy, const at::Tensor& memory, int64_t k, double decay_value) {
  matrix("topk_unified_feedback", "dy", dy);
  k_range("topk_unified_feedback", k, dy.size(1));
  accumulator("topk_unified_feedback", "memory", memory, dy);
  size_match("topk_unified_feedback", "memory entries and dy columns", memory.size(0), dy.size(1));
  decay("topk_unified_feedback", decay_value);
}

// The fused backward ops: dy (N, out), x (N, in), weight (out, in), k in [1, out], and idx (k distinct columns,
// idx_dims = 1, or (N, k) per-example entries, idx_dims = 2) when given.
inline void linear_backward(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                            int64_t k, const std::optional<at::Tensor>& idx, int64_t idx_dims) {
  matrix(op, "dy", dy);
  matrix(op, "x", x);
  matrix(op, "weight", weight);
  like(op, "x", x, "dy", dy);
  like(op, "weight", weight, "dy", dy);
  size_match(op, "dy rows and x rows", dy.size(0), x.size(0));
  size_match(op, "dy columns and weight rows", dy.size(1), weight.size(0));
  size_match(op, "x columns and weight columns", x.size(1), weight.size(1));
  k_range(op, k, dy.size(1));
  if (idx.has_value()) {
    index(op, "idx", *idx, idx_dims, dy);
    size_match(op, "k and idx entries", k, idx->size(-1));
    if (idx_dims == 2) size_match(op, "idx rows and dy rows", idx->size(0), dy.size(0));
  }
}

// sizes lists `steps` ints, non-increasing, each in [0, batch] (a PackedSequence's batch sizes).
inline void batch_sizes(const char* op, at::IntArrayRef sizes, int64_t steps, int64_t batch) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(sizes.size()) == steps, "meprop.", op, ": batch_sizes must hold ", steps,
                    " entries (one per step), got ", sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t)
    TORCH_CHECK_VALUE(sizes[t] >= 0 && sizes[t] <= batch && (t == 0 || sizes[t] <= sizes[t - 1]), "meprop.", op,
                      ": batch_sizes must be non-increasing in [0, ", batch, "], got ", sizes);
}

// The checks both LSTM ops start with (meprop/opdefs.py's _lstm_layer): the two weight matrices, each of
// `tensors` (x (T, B, I) first) an array of its dims like the weights, and the weights' sizes against x's.
struct LstmTensor {
  const char* name;
  const at::Tensor* tensor;
  int64_t dims;
};
inline void lstm_layer(const char* op, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                       std::initializer_list<LstmTensor> tensors) {
  matrix(op, "weight_ih", weight_ih);
  matrix(op, "weight_hh", weight_hh);
  like(op, "weight_hh", weight_hh, "weight_ih", weight_ih);
  for (const LstmTensor& t : tensors) {
    array(op, t.name, *t.tensor, t.dims);
    like(op, t.name, *t.tensor, "weight_ih", weight_ih);
  }
  const at::Tensor& x = *tensors.begin()->tensor;
  const int64_t hidden = weight_hh.size(1);
  size_match(op, "weight_hh rows and 4 * hidden", weight_hh.size(0), 4 * hidden);
  size_match(op, "weight_ih rows and weight_hh rows", weight_ih.size(0), weight_hh.size(0));
  size_match(op, "x features and weight_ih columns", x.size(2), weight_ih.size(1));
}

// lstm_forward: the checks of meprop/opdefs.py's _lstm_forward, in its order.
inline void lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
                         const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias,
                         at::OptionalIntArrayRef sizes) {
  constexpr const char* op = "lstm_forward";
  lstm_layer(op, weight_ih, weight_hh, {{"x", &x, 3}, {"h0", &h0, 2}, {"c0", &c0, 2}});
  const int64_t steps = x.size(0), batch = x.size(1), hidden = weight_hh.size(1);
  using shape = at::IntArrayRef;
  const std::vector<int64_t> last{batch, hidden};
  size_match(op, "h0 shape and (batch, hidden)", h0.sizes(), shape(last));
  size_match(op, "c0 shape and (batch, hidden)", c0.sizes(), shape(last));
  if (bias.has_value()) {
    array(op, "bias", *bias, 1);
    like(op, "bias", *bias, "weight_ih", weight_ih);
    size_match(op, "bias size and 4 * hidden", bias->size(0), 4 * hidden);
  }
  if (sizes.has_value()) batch_sizes(op, *sizes, steps, batch);
}

// lstm_backward: the checks of meprop/opdefs.py's _lstm_backward, in its order (index values by the kernels).
inline void lstm_backward(const at::Tensor& dout, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& x,
                          const at::Tensor& h_prev, const at::Tensor& c_prev, const at::Tensor& gates,
                          const at::Tensor& weight_ih, const at::Tensor& weight_hh, at::OptionalIntArrayRef sizes,
                          int64_t k, bool per_gate, bool per_example, const std::optional<at::Tensor>& idx) {
  constexpr const char* op = "lstm_backward";
  lstm_layer(op, weight_ih, weight_hh,
             {{"x", &x, 3}, {"dout", &dout, 3}, {"h_prev", &h_prev, 3}, {"c_prev", &c_prev, 3}, {"gates", &gates, 3},
              {"dh_n", &dh_n, 2}, {"dc_n", &dc_n, 2}});
  const int64_t steps = x.size(0), batch = x.size(1), hidden = weight_hh.size(1);
  using shape = at::IntArrayRef;
  const std::vector<int64_t> state{steps, batch, hidden}, all_gates{steps, batch, 4 * hidden}, last{batch, hidden};
  size_match(op, "dout shape and (steps, batch, hidden)", dout.sizes(), shape(state));
  size_match(op, "h_prev shape and (steps, batch, hidden)", h_prev.sizes(), shape(state));
  size_match(op, "c_prev shape and (steps, batch, hidden)", c_prev.sizes(), shape(state));
  size_match(op, "gates shape and (steps, batch, 4 * hidden)", gates.sizes(), shape(all_gates));
  size_match(op, "dh_n shape and (batch, hidden)", dh_n.sizes(), shape(last));
  size_match(op, "dc_n shape and (batch, hidden)", dc_n.sizes(), shape(last));
  if (sizes.has_value()) batch_sizes(op, *sizes, steps, batch);
  k_range(op, k, per_gate ? hidden : 4 * hidden);
  if (idx.has_value()) {
    index(op, "idx", *idx, per_example ? 3 : 2, x);
    const int64_t kept = per_gate ? 4 * k : k;
    const std::vector<int64_t> want = per_example ? std::vector<int64_t>{steps, batch, kept}
                                                  : std::vector<int64_t>{steps, kept};
    size_match(op, "idx shape and the kept entries' shape", idx->sizes(), shape(want));
  }
}

}  // namespace meprop::checks
