// meProp's BPTT of one LSTM layer and direction on CPU: the whole sequence in one call (semantics:
// meprop/lstm_reference.py). Per step: one elementwise pass for the gate gradient da (b x 4H) and the cell path,
// one pass over da for the column scores and the bias gradient (select.h), the selection (select.h), then the
// four products with the kept entries only: unified through compacted blocks and small_gemm.h, per-example
// dx / dh as sums of the kept weight rows. The per-example weight gradients wait for the end of the sequence:
// every step's kept entries are recorded (T x B x kept), sorted by row once, and each row of dW_ih / dW_hh is
// summed once from its entries (rows split between threads, so no atomics; a fixed order). tanh(c_t) is
// recomputed in the vectorised gate-gradient pass (activations.h). The outputs are written once: unified dW
// rows on their first touch, the untouched rows zeroed at the end (blocks of large_alloc.h, no page faults).
// Temporaries: O(B * 4H + 4k * (I + H)) and, per example, the recorded entries; float16/bfloat16 are computed
// in float32.
#include <torch/library.h>

#include "activations.h"
#include "large_alloc.h"
#include "select.h"
#include "small_gemm.h"

namespace meprop::cpu {
namespace {

template <typename acc>
struct LstmStep {
  int64_t batch, n_in, hidden, k, kept;
  bool per_gate, per_example;
  const acc *w_ih, *w_hh;
  std::vector<acc> dh, dc, da, scores, sums, db, a, a_t, packed, rows;
  std::vector<int64_t> idx;
  // Unified: the rows of 4H some step kept so far, and per kept entry of this step whether it is its row's
  // first (its products are written to dW, not added); the same for dW_ih and dW_hh.
  std::vector<char> touched, first;
  acc *dw_ih, *dw_hh;

  // da (b x 4H) from the saved gates and states (tanh(c_t), c_t = f * c_prev + i * g, recomputed) and the
  // incoming dh, dc; dc <- dc * f.
  void gate_grad(int64_t b, const acc* gates, const acc* c_prev, const acc* dout) {
    const int64_t H = hidden, G = 4 * hidden;
    at::parallel_for(0, b, row_grain(G), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        const acc* g = gates + n * G;
        acc* d = da.data() + n * G;
        int64_t j = 0;
        if constexpr (std::is_same_v<acc, float>) {
          constexpr int L = Simd<float>::kLanes;
          const fvec one = splat(1.0f);
          for (; j + L <= H; j += L) {
            const fvec i = load_vec(g + j), f = load_vec(g + H + j), gg = load_vec(g + 2 * H + j);
            const fvec o = load_vec(g + 3 * H + j), cp = load_vec(c_prev + n * H + j);
            const fvec tc = tanh_vec(f * cp + i * gg);
            const fvec dht = load_vec(dh.data() + n * H + j) + load_vec(dout + n * H + j);
            const fvec dct = load_vec(dc.data() + n * H + j) + dht * o * (one - tc * tc);
            const fvec di = dct * gg * i * (one - i), df = dct * cp * f * (one - f);
            const fvec dg = dct * i * (one - gg * gg), d_o = dht * tc * o * (one - o), dc_new = dct * f;
            std::memcpy(d + j, &di, sizeof(di));
            std::memcpy(d + H + j, &df, sizeof(df));
            std::memcpy(d + 2 * H + j, &dg, sizeof(dg));
            std::memcpy(d + 3 * H + j, &d_o, sizeof(d_o));
            std::memcpy(dc.data() + n * H + j, &dc_new, sizeof(dc_new));
          }
        }
        for (; j < H; ++j) {
          const acc i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j], cp = c_prev[n * H + j];
          const acc tc = std::tanh(f * cp + i * gg);
          const acc dht = dh[n * H + j] + dout[n * H + j];
          const acc dct = dc[n * H + j] + dht * o * (acc(1) - tc * tc);
          d[j] = dct * gg * i * (acc(1) - i);
          d[H + j] = dct * cp * f * (acc(1) - f);
          d[2 * H + j] = dct * i * (acc(1) - gg * gg);
          d[3 * H + j] = dht * tc * o * (acc(1) - o);
          dc[n * H + j] = dct * f;
        }
      }
    });
    column_sums(da.data(), b, G, scores.data(), sums.data());
    for (int64_t j = 0; j < G; ++j) db[j] += sums[j];
  }

  // The kept entries of this step: idx (kept) unified, or vals / idx (b x kept) per example.
  void select(int64_t b, const int64_t* given) {
    const int64_t G = 4 * hidden, width = per_gate ? hidden : G, groups = per_gate ? 4 : 1;
    if (!per_example) {
      if (given != nullptr) {
        std::copy(given, given + kept, idx.data());
      } else {
        for (int64_t g = 0; g < groups; ++g) {
          select_columns(scores.data() + g * width, width, k, idx.data() + g * k);
          for (int64_t i = 0; i < k; ++i) idx[g * k + i] += g * width;
        }
      }
      for (int64_t n = 0; n < b; ++n)
        for (int64_t j = 0; j < kept; ++j) a[n * kept + j] = da[n * G + idx[j]];
      return;
    }
    const int64_t block = block_length(width, k);
    at::parallel_for(0, b, row_grain(G), [&](int64_t n0, int64_t n1) {
      RowSelector<acc> selector;
      for (int64_t n = n0; n < n1; ++n) {
        const acc* row = da.data() + n * G;
        int64_t* ix = idx.data() + n * kept;
        acc* vals = a.data() + n * kept;
        if (given != nullptr) {
          for (int64_t j = 0; j < kept; ++j) vals[j] = row[ix[j] = given[n * kept + j]];
          continue;
        }
        for (int64_t g = 0; g < groups; ++g) {
          selector.select(row + g * width, width, k, block, vals + g * k, ix + g * k);
          for (int64_t i = 0; i < k; ++i) ix[g * k + i] += g * width;
        }
      }
    });
  }

  // Unified: marks this step's kept rows, noting which entries touch their row first (a repeated index in a
  // given idx adds to its first occurrence).
  void mark_first() {
    for (int64_t j = 0; j < kept; ++j) {
      first[j] = !touched[idx[j]];
      touched[idx[j]] = 1;
    }
  }

  // out (b x cols) = the kept entries' products with the kept rows of w (4H x cols). Unified, also dw (4H x cols)
  // += their products with src (b x cols), the step's x or h_prev, written where `first` (per example, dw waits
  // for the end of the sequence).
  void products(int64_t b, const acc* w, int64_t cols, const acc* src, acc* out, acc* dw) {
    if (!per_example) {
      acc* wk = packed.data();  // W[idx, :] (kept x cols)
      for (int64_t j = 0; j < kept; ++j) std::copy(w + idx[j] * cols, w + (idx[j] + 1) * cols, wk + j * cols);
      small_gemm(b, cols, kept, a.data(), kept, wk, cols, out, cols);
      small_gemm(kept, cols, b, a_t.data(), b, src, cols, rows.data(), cols);  // dy[:, idx]^T @ src
      for (int64_t j = 0; j < kept; ++j) {
        acc* dst = dw + idx[j] * cols;
        const acc* r = rows.data() + j * cols;
        if (first[j])
          std::copy(r, r + cols, dst);
        else
          for (int64_t c = 0; c < cols; ++c) dst[c] += r[c];
      }
      return;
    }
    at::parallel_for(0, b, row_grain(kept * cols), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        acc* o = out + n * cols;
        std::fill(o, o + cols, acc(0));
        for (int64_t j = 0; j < kept; ++j) {
          const acc v = a[n * kept + j];
          const acc* wr = w + idx[n * kept + j] * cols;
          for (int64_t c = 0; c < cols; ++c) o[c] += v * wr[c];
        }
      }
    });
  }

  // Per example: the step's kept entries (value, row of 4H, row of x / h_prev) for the weight gradients.
  void record(int64_t b, int64_t first_src) {
    for (int64_t n = 0; n < b; ++n)
      for (int64_t j = 0; j < kept; ++j) entries.push_back({a[n * kept + j], idx[n * kept + j], first_src + n});
  }

  struct Entry {
    acc v;
    int64_t row, src;
  };
  std::vector<Entry> entries;
};

// The recorded entries grouped by row of 4H: a stable counting sort (so each row sums in step order), once for
// both weight gradients.
template <typename Entry>
struct EntriesByRow {
  const std::vector<Entry>& entries;
  std::vector<int64_t> start, order;  // row r's entries: entries[order[start[r] .. start[r + 1])]

  EntriesByRow(const std::vector<Entry>& all, int64_t G) : entries(all), start(G + 1, 0), order(all.size()) {
    for (const Entry& e : entries) ++start[e.row + 1];
    for (int64_t r = 0; r < G; ++r) start[r + 1] += start[r];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < static_cast<int64_t>(entries.size()); ++i) order[next[entries[i].row]++] = i;
  }

  // dw (G x cols) = sum over the entries e of e.v * src[e.src] into row e.row, each row written once; rows with
  // no entry are zero.
  template <typename acc>
  void weight_grad(const acc* src, int64_t cols, acc* dw) const {
    const int64_t G = static_cast<int64_t>(start.size()) - 1;
    const int64_t per_row = G == 0 ? 1 : std::max<int64_t>(1, static_cast<int64_t>(entries.size()) / G);
    at::parallel_for(0, G, row_grain(per_row * cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        acc* dst = dw + r * cols;
        std::fill(dst, dst + cols, acc(0));
        for (int64_t i = start[r]; i < start[r + 1]; ++i) {
          const Entry& e = entries[order[i]];
          const acc* s = src + e.src * cols;
          for (int64_t c = 0; c < cols; ++c) dst[c] += e.v * s[c];
        }
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& dh_n, const at::Tensor& dc_n, const at::Tensor& x_in,
    const at::Tensor& h_prev_in, const at::Tensor& c_prev_in, const at::Tensor& gates_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, at::OptionalIntArrayRef batch_sizes, bool reverse, int64_t k, bool per_gate,
    bool per_example, const std::optional<at::Tensor>& idx_in) {
  constexpr const char* op = "lstm_backward";
  checks::lstm_backward(dout_in, dh_n, dc_n, x_in, h_prev_in, c_prev_in, gates_in, w_ih_in, w_hh_in, batch_sizes, k,
                        per_gate, per_example, idx_in);
  const int64_t steps = x_in.size(0), batch = x_in.size(1), n_in = x_in.size(2), hidden = w_hh_in.size(1);
  const int64_t G = 4 * hidden, kept = per_gate ? 4 * k : k;
  if (idx_in.has_value()) index_values(op, "idx", *idx_in, G);
  const auto acc_type = acc_dtype(x_in.scalar_type());
  const auto as_acc = [&](const at::Tensor& t) { return t.to(acc_type).contiguous(); };
  const at::Tensor dout = as_acc(dout_in), x = as_acc(x_in), h_prev = as_acc(h_prev_in), c_prev = as_acc(c_prev_in);
  const at::Tensor gates = as_acc(gates_in), w_ih = as_acc(w_ih_in), w_hh = as_acc(w_hh_in);
  const at::Tensor given = idx_in.has_value() ? idx_in->contiguous() : at::Tensor();
  const auto options = x.options();
  at::Tensor dx = empty_for_write({steps, batch, n_in}, options);
  at::Tensor dw_ih = empty_for_write({G, n_in}, options), dw_hh = empty_for_write({G, hidden}, options);
  at::Tensor dh0 = at::empty({batch, hidden}, options), dc0 = at::empty({batch, hidden}, options);
  at::Tensor db = at::empty({G}, options);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "lstm_backward_cpu", [&] {
    using acc = scalar_t;
    LstmStep<acc> s;
    s.batch = batch, s.n_in = n_in, s.hidden = hidden, s.k = k, s.kept = kept;
    s.per_gate = per_gate, s.per_example = per_example;
    s.w_ih = w_ih.const_data_ptr<acc>(), s.w_hh = w_hh.const_data_ptr<acc>();
    const at::Tensor dh_acc = as_acc(dh_n), dc_acc = as_acc(dc_n);
    const acc* pdh = dh_acc.const_data_ptr<acc>();
    const acc* pdc = dc_acc.const_data_ptr<acc>();
    s.dh.assign(pdh, pdh + batch * hidden);
    s.dc.assign(pdc, pdc + batch * hidden);
    s.da.resize(batch * G), s.scores.resize(G), s.sums.resize(G), s.db.assign(G, acc(0));
    s.a.resize(batch * kept), s.a_t.resize(per_example ? 0 : batch * kept);
    s.idx.resize(per_example ? batch * kept : kept);
    s.packed.resize(per_example ? 0 : kept * std::max(n_in, hidden));
    s.rows.resize(per_example ? 0 : kept * std::max(n_in, hidden));
    s.dw_ih = dw_ih.mutable_data_ptr<acc>(), s.dw_hh = dw_hh.mutable_data_ptr<acc>();
    if (per_example)
      s.entries.reserve(steps * batch * kept);
    else
      s.touched.assign(G, 0), s.first.resize(kept);
    std::vector<acc> dh_new(batch * hidden);
    acc* pdx = dx.mutable_data_ptr<acc>();
    for (int64_t step = 0; step < steps; ++step) {
      const int64_t t = reverse ? step : steps - 1 - step;  // the forward's steps in the opposite order
      const int64_t b = batch_sizes.has_value() ? (*batch_sizes)[t] : batch;
      std::fill(pdx + (t * batch + b) * n_in, pdx + (t + 1) * batch * n_in, acc(0));  // rows not taking part
      if (b == 0) continue;
      const int64_t at_t = t * batch * hidden;
      s.gate_grad(b, gates.const_data_ptr<acc>() + t * batch * G, c_prev.const_data_ptr<acc>() + at_t,
                  dout.const_data_ptr<acc>() + at_t);
      const int64_t* g = nullptr;
      if (given.defined()) g = given.const_data_ptr<int64_t>() + t * (per_example ? batch * kept : kept);
      s.select(b, g);
      if (per_example) {
        s.record(b, t * batch);
      } else {
        s.mark_first();
        for (int64_t n = 0; n < b; ++n)
          for (int64_t j = 0; j < kept; ++j) s.a_t[j * b + n] = s.a[n * kept + j];
      }
      s.products(b, s.w_hh, hidden, h_prev.const_data_ptr<acc>() + t * batch * hidden, dh_new.data(), s.dw_hh);
      s.products(b, s.w_ih, n_in, x.const_data_ptr<acc>() + t * batch * n_in, pdx + t * batch * n_in, s.dw_ih);
      std::copy(dh_new.begin(), dh_new.begin() + b * hidden, s.dh.begin());
    }
    if (per_example) {
      const EntriesByRow<typename LstmStep<acc>::Entry> by_row(s.entries, G);
      by_row.weight_grad(h_prev.const_data_ptr<acc>(), hidden, s.dw_hh);
      by_row.weight_grad(x.const_data_ptr<acc>(), n_in, s.dw_ih);
    } else {
      for (int64_t r = 0; r < G; ++r) {  // rows no step kept
        if (s.touched[r]) continue;
        std::fill(s.dw_hh + r * hidden, s.dw_hh + (r + 1) * hidden, acc(0));
        std::fill(s.dw_ih + r * n_in, s.dw_ih + (r + 1) * n_in, acc(0));
      }
    }
    std::copy(s.dh.begin(), s.dh.end(), dh0.mutable_data_ptr<acc>());
    std::copy(s.dc.begin(), s.dc.end(), dc0.mutable_data_ptr<acc>());
    std::copy(s.db.begin(), s.db.end(), db.mutable_data_ptr<acc>());
  });
  const auto dtype = x_in.scalar_type();
  return {dx.to(dtype), dh0.to(dtype), dc0.to(dtype), dw_ih.to(dtype), dw_hh.to(dtype), db.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(meprop, CPU, m) { m.impl("lstm_backward", &lstm_backward_cpu); }

}  // namespace meprop::cpu
