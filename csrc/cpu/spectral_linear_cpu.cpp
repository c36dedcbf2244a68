// CPU kernels of the spectral linear layer  y = ((x Vh^T) * s) U^T + b.
//
// GEMMs go through ATen (MKL/oneDNN/OpenBLAS); the reductions that give ds are fused,
// OpenMP-parallel and deterministic: fixed row chunks, per-chunk partials, then one
// fixed-order sum, so results do not depend on the thread count.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "spectral_schema.h"

namespace imse {
namespace {

constexpr int64_t kRowChunk = 64;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// out[i,j] = in[i,j] * (col ? s[j] : s[i]) for a contiguous rows x cols matrix, the product formed in
// acc_t (float32 for bf16/fp16) and rounded once: one pass, no float32 copy of a low-precision operand.
template <typename scalar_t, typename acc_t>
void scale_kernel(const scalar_t* in, const acc_t* s, int64_t rows, int64_t cols, bool col, scalar_t* out) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* a = in + i * cols;
      scalar_t* o = out + i * cols;
      if (col) {
        for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(a[j]) * s[j]);
      } else {
        const acc_t si = s[i];
        for (int64_t j = 0; j < cols; ++j) o[j] = static_cast<scalar_t>(static_cast<acc_t>(a[j]) * si);
      }
    }
  });
}

// s broadcast over the columns (col) or the rows of a 2-D matrix, computed in the accumulation type.
at::Tensor scale_by(const at::Tensor& A_in, const at::Tensor& s_in, bool col) {
  auto acc = acc_type(A_in.scalar_type());
  auto A = A_in.contiguous();
  auto s = s_in.to(acc).contiguous();
  TORCH_CHECK(s.numel() == (col ? A.size(1) : A.size(0)), "imse_ext: internal: s has ", s.numel(),
              " values for a matrix of shape ", A.sizes());
  auto out = at::empty_like(A);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, A.scalar_type(), "imse_scale", [&] {
    if (acc == at::kDouble) {
      scale_kernel<scalar_t, double>(A.const_data_ptr<scalar_t>(), s.const_data_ptr<double>(), A.size(0), A.size(1),
                                     col, out.mutable_data_ptr<scalar_t>());
    } else {
      scale_kernel<scalar_t, float>(A.const_data_ptr<scalar_t>(), s.const_data_ptr<float>(), A.size(0), A.size(1),
                                    col, out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

// s broadcast over the columns of U (d_out x r).
at::Tensor scale_columns(const at::Tensor& U, const at::Tensor& s) { return scale_by(U, s, true); }

// s broadcast over the rows of Vh (r x d_in).
at::Tensor scale_rows(const at::Tensor& Vh, const at::Tensor& s) { return scale_by(Vh, s, false); }

// ds[k] = sum_n h[n,k] * t[n,k]  (h, t: N x r, contiguous), accumulated in acc_t.
// With `scale`, t is then overwritten by t * scale in the same pass (dx = (t * s) Vh needs it).
template <typename scalar_t, typename acc_t>
void colsum_product_kernel(const scalar_t* h, scalar_t* t, int64_t N, int64_t r, acc_t* out, const acc_t* scale) {
  const int64_t chunks = (N + kRowChunk - 1) / kRowChunk;
  std::vector<acc_t> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1) * r), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      acc_t* p = partial.data() + c * r;
      const int64_t n_end = std::min(N, (c + 1) * kRowChunk);
      for (int64_t n = c * kRowChunk; n < n_end; ++n) {
        const scalar_t* hn = h + n * r;
        scalar_t* tn = t + n * r;
        for (int64_t k = 0; k < r; ++k) {
          p[k] += static_cast<acc_t>(hn[k]) * static_cast<acc_t>(tn[k]);
        }
        if (scale != nullptr) {
          for (int64_t k = 0; k < r; ++k) tn[k] = static_cast<scalar_t>(static_cast<acc_t>(tn[k]) * scale[k]);
        }
      }
    }
  });
  at::parallel_for(0, r, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t acc = 0;
      for (int64_t c = 0; c < chunks; ++c) acc += partial[c * r + k];
      out[k] = acc;
    }
  });
}

// ds[k] = sum_j M[k,j] * V[k,j]  (M, V: r x d, contiguous).
template <typename m_t, typename v_t, typename acc_t>
void rowdot_kernel(const m_t* M, const v_t* V, int64_t r, int64_t d, acc_t* out) {
  at::parallel_for(0, r, 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      acc_t acc = 0;
      const m_t* mk = M + k * d;
      const v_t* vk = V + k * d;
      for (int64_t j = 0; j < d; ++j) acc += static_cast<acc_t>(mk[j]) * static_cast<acc_t>(vk[j]);
      out[k] = acc;
    }
  });
}

// ds = column sums of h * t; when `scale_t` is given, t (contiguous, owned by the caller) is also
// scaled in place by it in the same pass.
at::Tensor colsum_product(const at::Tensor& h_in, at::Tensor& t, at::ScalarType out_dtype,
                          const std::optional<at::Tensor>& scale_t) {
  TORCH_CHECK(t.is_contiguous(), "imse_ext: internal: t must be contiguous");
  auto h = h_in.contiguous();
  const int64_t N = h.size(0), r = h.size(1);
  auto acc = acc_type(h.scalar_type());
  auto ds = at::empty({r}, h.options().dtype(acc));
  auto scale = scale_t.has_value() ? std::optional<at::Tensor>(scale_t->to(acc).contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imse_colsum_product", [&] {
    if (acc == at::kDouble) {
      colsum_product_kernel<scalar_t, double>(h.const_data_ptr<scalar_t>(), t.mutable_data_ptr<scalar_t>(), N, r,
                                              ds.mutable_data_ptr<double>(),
                                              scale ? scale->const_data_ptr<double>() : nullptr);
    } else {
      colsum_product_kernel<scalar_t, float>(h.const_data_ptr<scalar_t>(), t.mutable_data_ptr<scalar_t>(), N, r,
                                             ds.mutable_data_ptr<float>(),
                                             scale ? scale->const_data_ptr<float>() : nullptr);
    }
  });
  return ds.to(out_dtype);
}

// ds[k] = sum_j M[k,j] * V[k,j], both read in V's dtype (no converted copies), accumulated in float32 for
// bf16/fp16 (float64 for float64).
at::Tensor rowdot(const at::Tensor& M_in, const at::Tensor& V_in, at::ScalarType out_dtype) {
  auto V = V_in.contiguous();
  auto M = M_in.to(V.scalar_type()).contiguous();  // a no-op on every path here: M comes in V's dtype
  const int64_t r = M.size(0), d = M.size(1);
  auto ds = at::empty({r}, V.options().dtype(acc_type(V.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, V.scalar_type(), "imse_rowdot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rowdot_kernel<scalar_t, scalar_t, acc_t>(M.const_data_ptr<scalar_t>(), V.const_data_ptr<scalar_t>(), r, d,
                                             ds.mutable_data_ptr<acc_t>());
  });
  return ds.to(out_dtype);
}

// ---------------------------------------------------------------------------------------------
// Per-sample codes (docs/design.md, section 8): S is a (K x r) code table, row n uses S[index[n]].

// out[n,:] = in[n,:] * S[index[n],:] in acc_t (in, out: N x r, contiguous; out may be in).
template <typename scalar_t, typename acc_t>
void gather_scale_kernel(const scalar_t* in, const acc_t* S, const int64_t* index, int64_t N, int64_t r,
                         scalar_t* out) {
  at::parallel_for(0, N, kRowChunk, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* sn = S + index[n] * r;
      for (int64_t k = 0; k < r; ++k) {
        out[n * r + k] = static_cast<scalar_t>(static_cast<acc_t>(in[n * r + k]) * sn[k]);
      }
    }
  });
}

// dS[c,:] = sum_{n : index[n] = c} h[n,:] * t[n,:]  (h, t: N x r, contiguous), accumulated in acc_t.
// The rows of each code, in increasing n, are cut into fixed chunks of kRowChunk rows; every chunk
// has its own partial row and each code sums its chunks in order: no atomics, and the result does
// not depend on the thread count. With `S`, t is also overwritten by t * S[index] in the same pass.
template <typename scalar_t, typename acc_t>
void segment_product_kernel(const scalar_t* h, scalar_t* t, const int64_t* index, int64_t N, int64_t r, int64_t K,
                            acc_t* out, const acc_t* S) {
  std::vector<int64_t> start(K + 1, 0), order(N), first_chunk(K + 1, 0);
  for (int64_t n = 0; n < N; ++n) ++start[index[n] + 1];  // stable counting sort of the rows by code
  for (int64_t c = 0; c < K; ++c) start[c + 1] += start[c];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t n = 0; n < N; ++n) order[fill[index[n]]++] = n;
  for (int64_t c = 0; c < K; ++c) {
    first_chunk[c + 1] = first_chunk[c] + (start[c + 1] - start[c] + kRowChunk - 1) / kRowChunk;
  }
  const int64_t chunks = first_chunk[K];
  std::vector<int64_t> chunk_code(chunks);
  for (int64_t c = 0; c < K; ++c) std::fill(chunk_code.begin() + first_chunk[c], chunk_code.begin() + first_chunk[c + 1], c);
  std::vector<acc_t> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1) * r), acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t c = chunk_code[j];
      const int64_t i0 = start[c] + (j - first_chunk[c]) * kRowChunk, i1 = std::min(i0 + kRowChunk, start[c + 1]);
      acc_t* p = partial.data() + j * r;
      const acc_t* sc = S != nullptr ? S + c * r : nullptr;
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* hn = h + order[i] * r;
        scalar_t* tn = t + order[i] * r;
        for (int64_t k = 0; k < r; ++k) p[k] += static_cast<acc_t>(hn[k]) * static_cast<acc_t>(tn[k]);
        if (sc != nullptr) {
          for (int64_t k = 0; k < r; ++k) tn[k] = static_cast<scalar_t>(static_cast<acc_t>(tn[k]) * sc[k]);
        }
      }
    }
  });
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < r; ++k) {
        acc_t acc = 0;
        for (int64_t j = first_chunk[c]; j < first_chunk[c + 1]; ++j) acc += partial[j * r + k];
        out[c * r + k] = acc;
      }
    }
  });
}

// out = rows * S[index] row by row (rows, out: N x r, contiguous; out may be rows).
void gather_scale(const at::Tensor& rows, const at::Tensor& S, const at::Tensor& index, at::Tensor& out) {
  auto acc = acc_type(rows.scalar_type());
  auto table = S.to(acc).contiguous();
  const int64_t N = rows.size(0), r = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "imse_gather_scale", [&] {
    if (acc == at::kDouble) {
      gather_scale_kernel<scalar_t, double>(rows.const_data_ptr<scalar_t>(), table.const_data_ptr<double>(),
                                            index.const_data_ptr<int64_t>(), N, r, out.mutable_data_ptr<scalar_t>());
    } else {
      gather_scale_kernel<scalar_t, float>(rows.const_data_ptr<scalar_t>(), table.const_data_ptr<float>(),
                                           index.const_data_ptr<int64_t>(), N, r, out.mutable_data_ptr<scalar_t>());
    }
  });
}

// dS (K x r, in S's dtype) = per-code sums of h * t; with `scale_t`, t (contiguous, owned by the
// caller) is also scaled in place by S[index] in the same pass.
at::Tensor segment_product(const at::Tensor& h_in, at::Tensor& t, const at::Tensor& S, const at::Tensor& index,
                           bool scale_t) {
  TORCH_CHECK(t.is_contiguous(), "imse_ext: internal: t must be contiguous");
  auto h = h_in.contiguous();
  const int64_t N = h.size(0), r = h.size(1), K = S.size(0);
  auto acc = acc_type(h.scalar_type());
  auto dS = at::empty({K, r}, h.options().dtype(acc));
  auto table = S.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "imse_segment_product", [&] {
    if (acc == at::kDouble) {
      segment_product_kernel<scalar_t, double>(h.const_data_ptr<scalar_t>(), t.mutable_data_ptr<scalar_t>(),
                                               index.const_data_ptr<int64_t>(), N, r, K, dS.mutable_data_ptr<double>(),
                                               scale_t ? table.const_data_ptr<double>() : nullptr);
    } else {
      segment_product_kernel<scalar_t, float>(h.const_data_ptr<scalar_t>(), t.mutable_data_ptr<scalar_t>(),
                                              index.const_data_ptr<int64_t>(), N, r, K, dS.mutable_data_ptr<float>(),
                                              scale_t ? table.const_data_ptr<float>() : nullptr);
    }
  });
  return dS.to(S.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// Ops (inputs are validated in Python; the checks here guard direct calls).

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "imse_ext: ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "imse_ext: ", name, " must be floating point, got ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> factorized_forward(const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
                                                      const at::Tensor& Vh, const std::optional<at::Tensor>& bias,
                                                      bool save_h) {
  check_2d(x, "x");
  TORCH_CHECK(x.size(1) == Vh.size(1) && U.size(1) == Vh.size(0) && s.numel() == Vh.size(0),
              "imse_ext.factorized_forward: shape mismatch x ", x.sizes(), " U ", U.sizes(), " s ", s.sizes(), " Vh ",
              Vh.sizes());
  auto h = at::mm(x, Vh.t());
  // s scales whichever of h (N x r) and U (d_out x r) is smaller; h itself is saved unscaled.
  const bool scale_h = x.size(0) < U.size(0);
  auto lhs = scale_h ? scale_columns(h, s) : h;
  auto rhs = scale_h ? U : scale_columns(U, s);
  auto y = bias.has_value() && bias->defined() ? at::addmm(*bias, lhs, rhs.t()) : at::mm(lhs, rhs.t());
  return {y, save_h ? h : at::empty({0}, x.options())};
}

at::Tensor recompose(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
  check_2d(U, "U");
  check_2d(Vh, "Vh");
  return at::mm(scale_columns(U, s), Vh);
}

std::tuple<at::Tensor, at::Tensor> factorized_backward(const at::Tensor& grad, const at::Tensor& h,
                                                       const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                                                       bool need_dx) {
  check_2d(grad, "grad");
  check_2d(h, "h");
  auto t = at::mm(grad, U).contiguous();
  // dx = (t * s) Vh: s scales t in the ds pass when t (N x r) is smaller than Vh (r x d_in).
  const bool scale_t = need_dx && grad.size(0) < Vh.size(1);
  auto ds = colsum_product(h, t, s.scalar_type(), scale_t ? std::optional<at::Tensor>(s) : std::nullopt);
  auto dx = need_dx ? at::mm(t, scale_t ? Vh : scale_rows(Vh, s)) : at::empty({0}, grad.options());
  return {dx, ds};
}

at::Tensor factorized_input_grad(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s,
                                 const at::Tensor& Vh) {
  check_2d(grad, "grad");
  return at::mm(at::mm(grad, U), scale_rows(Vh, s));
}

std::tuple<at::Tensor, at::Tensor> recomposed_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                                                       const at::Tensor& W, bool need_dx) {
  check_2d(grad, "grad");
  check_2d(x, "x");
  // G and M = U^T G are GEMMs in the input dtype (bf16/fp16: oneDNN or cuBLAS-like kernels that accumulate in
  // float32 and round the output); the row dots with Vh accumulate in float32.
  auto G = at::mm(grad.t(), x);  // d_out x d_in
  auto M = at::mm(U.t(), G);     // r x d_in
  auto ds = rowdot(M, Vh, s.scalar_type());
  auto dx = need_dx ? at::mm(grad, W) : at::empty({0}, grad.options());
  return {dx, ds};
}

// The checks of the indexed ops; `a` is x (N x d_in) or grad (N x d_out). Returns index, contiguous.
at::Tensor check_indexed(const char* op, const at::Tensor& a, bool a_is_grad, const at::Tensor& U,
                         const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& index) {
  const char* a_name = a_is_grad ? "grad" : "x";
  const std::pair<const at::Tensor*, const char*> mats[] = {{&a, a_name}, {&U, "U"}, {&S, "S"}, {&Vh, "Vh"}};
  for (const auto& [t, name] : mats) {
    TORCH_CHECK(t->dim() == 2, "imse_ext.", op, ": ", name, " must be 2-D, got shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), "imse_ext.", op, ": ", name, " must be on the CPU, got ", t->device());
  }
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "imse_ext.", op, ": ", a_name, " must be floating point, got ",
              a.scalar_type());
  TORCH_CHECK(U.scalar_type() == a.scalar_type() && Vh.scalar_type() == a.scalar_type(), "imse_ext.", op,
              ": U and Vh must have ", a_name, "'s dtype ", a.scalar_type(), ", got U ", U.scalar_type(), ", Vh ",
              Vh.scalar_type());
  TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble, "imse_ext.", op,
              ": S must be float32 or float64, got ", S.scalar_type());
  TORCH_CHECK(U.size(1) == Vh.size(0) && S.size(1) == Vh.size(0), "imse_ext.", op, ": rank mismatch U ", U.sizes(),
              " S ", S.sizes(), " Vh ", Vh.sizes());
  const int64_t cols = a_is_grad ? U.size(0) : Vh.size(1);
  TORCH_CHECK(a.size(1) == cols, "imse_ext.", op, ": ", a_name, " must have ", cols, " columns, got shape ",
              a.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "imse_ext.", op, ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.device().is_cpu(), "imse_ext.", op, ": index must be on the CPU, got ", index.device());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == a.size(0), "imse_ext.", op, ": index must have shape (N,) = (",
              a.size(0), ",), got ", index.sizes());
  auto idx = index.contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t K = S.size(0);
  for (int64_t n = 0; n < idx.numel(); ++n) {
    TORCH_CHECK(p[n] >= 0 && p[n] < K, "imse_ext.", op, ": index values must be in [0, K=", K, "), got ", p[n],
                " at row ", n);
  }
  return idx;
}

std::tuple<at::Tensor, at::Tensor> indexed_forward(const at::Tensor& x, const at::Tensor& U, const at::Tensor& S,
                                                   const at::Tensor& Vh, const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& index, bool save_h) {
  auto idx = check_indexed("indexed_forward", x, false, U, S, Vh, index);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == U.size(0) && bias->scalar_type() == x.scalar_type()),
              "imse_ext.indexed_forward: bias must be (", U.size(0), ",) of dtype ", x.scalar_type(), ", got ",
              bias->sizes(), " ", bias->scalar_type());
  auto h = at::mm(x, Vh.t()).contiguous();
  auto hs = save_h ? at::empty_like(h) : h;  // h itself is saved unscaled
  gather_scale(h, S, idx, hs);
  auto y = has_bias ? at::addmm(*bias, hs, U.t()) : at::mm(hs, U.t());
  return {y, save_h ? h : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> indexed_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& U,
                                                    const at::Tensor& S, const at::Tensor& Vh,
                                                    const at::Tensor& index, bool need_dx) {
  auto idx = check_indexed("indexed_backward", grad, true, U, S, Vh, index);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == grad.size(0) && h.size(1) == Vh.size(0) &&
                  h.scalar_type() == grad.scalar_type() && h.device().is_cpu(),
              "imse_ext.indexed_backward: h must be (", grad.size(0), ", ", Vh.size(0), ") of dtype ",
              grad.scalar_type(), " on the CPU, got ", h.sizes(), " ", h.scalar_type(), " on ", h.device());
  auto t = at::mm(grad, U).contiguous();
  auto dS = segment_product(h, t, S, idx, need_dx);  // t becomes t * S[index] when need_dx
  auto dx = need_dx ? at::mm(t, Vh) : at::empty({0}, grad.options());
  return {dx, dS};
}

at::Tensor indexed_input_grad(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
                              const at::Tensor& index) {
  auto idx = check_indexed("indexed_input_grad", grad, true, U, S, Vh, index);
  auto t = at::mm(grad, U).contiguous();
  gather_scale(t, S, idx, t);
  return at::mm(t, Vh);
}

}  // namespace

TORCH_LIBRARY(imse_ext, m) {
  IMSE_DEFINE_SCHEMA(m);
  IMSE_DEFINE_INDEXED_SCHEMA(m);
}

TORCH_LIBRARY_IMPL(imse_ext, CPU, m) {
  m.impl("factorized_forward", &factorized_forward);
  m.impl("recompose", &recompose);
  m.impl("factorized_backward", &factorized_backward);
  m.impl("factorized_input_grad", &factorized_input_grad);
  m.impl("recomposed_backward", &recomposed_backward);
  m.impl("indexed_forward", &indexed_forward);
  m.impl("indexed_backward", &indexed_backward);
  m.impl("indexed_input_grad", &indexed_input_grad);
}

}  // namespace imse

// A Python module with no functions: importing it runs the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
