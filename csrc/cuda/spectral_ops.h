// The torch-facing implementations of the imse_ext backend primitives on CUDA. Plain GEMMs are ATen
// calls (cuBLAS on CUDA tensors; TF32 exactly when torch's own fp32 matmuls use it); the custom
// kernels of spectral_kernels.cu serve only the fused chain (fp16/bf16, h kept in shared memory) and
// the deterministic ds reduction, and for per-sample codes (docs/design.md §8) the gather-scale
// h ⊙ S[index] and the deterministic segmented dS. Each has a run-time switch back to the ATen path
// (docs/design.md §3): `cuda_fused_mode(kernel, mode)`, registered next to the primitives, and
// IMSE_CUDA_FUSED. The gather-scale follows the "chain" switch (it is the scale step of the forward
// and input-gradient chain; under auto it always runs: one pass, never slower than index_select +
// mul), the segmented dS the "ds" switch (auto: on, like the ds reduction).
// Included by spectral_linear_cuda.cpp (CUDA tensors, torch's current stream) and by emu/emu_ops.cpp
// (the same code over CPU tensors with the kernels emulated, for the tests). `Dev` supplies: kType
// (c10::DeviceType), kName, Guard (RAII device guard), stream(device).
//
// Every input is checked (device, dtype, shapes) with a message naming the op, the argument and
// what was found, before anything runs.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "spectral_kernels.h"

namespace imse_cuda_ops {

// The custom kernels with a switch, and the switch values: kFollowEnv reads IMSE_CUDA_FUSED
// (auto|1|0) at each call; kAuto, kOff (the ATen path), kOn (wherever the kernel can run).
enum Kernel : int { kChain = 0, kDs = 1 };
enum Mode : int { kFollowEnv = -2, kAuto = -1, kOff = 0, kOn = 1 };

template <class Dev>
struct Ops {
  // ------------------------------------------------------------------------------------------
  // Checks

  static imse_cuda::DType kernel_dtype(at::ScalarType t) {
    switch (t) {
      case at::kHalf: return imse_cuda::kF16;
      case at::kBFloat16: return imse_cuda::kBF16;
      case at::kFloat: return imse_cuda::kF32;
      default: return imse_cuda::kF64;
    }
  }

  static void check_tensor(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                           const at::Device& device) {
    TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK(t.device().type() == Dev::kType, op, ": ", name, " must be a ", Dev::kName, " tensor, got device ",
                t.device());
    TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first input is on ", device);
    TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  }

  static void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType want) {
    TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " has dtype ", t.scalar_type(), " but x/grad has ", want,
                "; all of x, U, Vh, bias, h, W must share one dtype");
  }

  static void check_compute_dtype(const at::Tensor& t, const char* op, const char* name) {
    const auto st = t.scalar_type();
    TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || st == at::kDouble, op, ": ", name,
                " has dtype ", st, "; the CUDA backend takes float16, bfloat16, float32 or float64");
  }

  static void check_s(const at::Tensor& s, const char* op, int64_t r, const at::Device& device) {
    check_tensor(s, op, "s", 1, device);
    TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, op,
                ": s must be float32 or float64, got ", s.scalar_type());
    TORCH_CHECK(s.size(0) == r, op, ": s has ", s.size(0), " entries but the rank r (U.shape[1] = Vh.shape[0]) is ", r);
  }

  // U (d_out, r), s (r), Vh (r, d_in) against each other and the compute dtype.
  static void check_factors(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh, const char* op,
                            at::ScalarType dtype, const at::Device& device) {
    check_tensor(U, op, "U", 2, device);
    check_tensor(Vh, op, "Vh", 2, device);
    check_dtype(U, op, "U", dtype);
    check_dtype(Vh, op, "Vh", dtype);
    TORCH_CHECK(U.size(1) == Vh.size(0), op, ": rank mismatch: U has shape ", U.sizes(), " (r = ", U.size(1),
                ") but Vh has shape ", Vh.sizes(), " (r = ", Vh.size(0), ")");
    check_s(s, op, U.size(1), device);
  }

  static void ok(int code, const char* op) {
    TORCH_CHECK(code == 0, op, " (CUDA backend): ", imse_cuda::error_string(code));
  }

  // ------------------------------------------------------------------------------------------
  // Run-time switches (process-wide; one set per library that includes this header)

  static std::atomic<int>& slot(int kernel) {
    static std::atomic<int> modes[2] = {{kFollowEnv}, {kFollowEnv}};
    return modes[kernel];
  }

  static int env_mode() {
    const char* raw = std::getenv("IMSE_CUDA_FUSED");
    std::string v = raw != nullptr ? raw : "";
    for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (v.empty() || v == "auto") return kAuto;
    if (v == "0" || v == "off" || v == "false" || v == "no") return kOff;
    TORCH_CHECK(v == "1" || v == "on" || v == "true" || v == "yes", "IMSE_CUDA_FUSED must be auto, 1 or 0, got '",
                raw, "'");
    return kOn;
  }

  static int mode(int kernel) {
    const int m = slot(kernel).load(std::memory_order_relaxed);
    return m == kFollowEnv ? env_mode() : m;
  }

  // The op `cuda_fused_mode(str kernel, int? mode=None) -> int`: the setting of "chain" or "ds"
  // before the call (-2 follow IMSE_CUDA_FUSED, -1 auto, 0 off, 1 on); sets it when mode is given.
  static int64_t fused_mode(std::string kernel, std::optional<int64_t> mode) {
    TORCH_CHECK(kernel == "chain" || kernel == "ds", "cuda_fused_mode: kernel must be 'chain' or 'ds', got '",
                kernel, "'");
    auto& s = slot(kernel == "chain" ? kChain : kDs);
    if (!mode.has_value()) return s.load();
    TORCH_CHECK(*mode >= kFollowEnv && *mode <= kOn, "cuda_fused_mode: mode must be -2, -1, 0 or 1, got ", *mode);
    return s.exchange(static_cast<int>(*mode));
  }

  // ------------------------------------------------------------------------------------------
  // Helpers

  static at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

  // t ⊙ s along dim (s in the accumulation type): computed there, rounded once to t's dtype.
  static at::Tensor scaled(const at::Tensor& t, const at::Tensor& s, int64_t dim) {
    return at::mul(t, dim == 1 ? s : s.unsqueeze(1)).to(t.scalar_type());
  }

  // (t ⊙ s)·Vh, with s on the smaller of t (N × r) and Vh (r × d_in).
  static at::Tensor scaled_mm(const at::Tensor& t, const at::Tensor& s, const at::Tensor& Vh) {
    return t.size(0) < Vh.size(1) ? at::mm(scaled(t, s, 1), Vh) : at::mm(t, scaled(Vh, s, 0));
  }

  // Σ_n A[n,:] ⊙ B[n,:] in the accumulation type, by the deterministic kernel or by ATen.
  static at::Tensor colsum(const at::Tensor& A_in, const at::Tensor& B_in, void* stream, const char* op) {
    const auto acc = acc_type(A_in.scalar_type());
    if (mode(kDs) == kOff) return at::mul(A_in.to(acc), B_in.to(acc)).sum(0);
    const auto A = A_in.contiguous(), B = B_in.contiguous();
    const int64_t M = A.size(0), L = A.size(1);
    auto out = at::empty({L}, A.options().dtype(acc));
    auto work = at::empty({imse_cuda::colsum_blocks(M), L}, A.options().dtype(acc));
    ok(imse_cuda::colsum_product(kernel_dtype(A.scalar_type()), A.data_ptr(), B.data_ptr(), M, L, work.data_ptr(),
                                 out.data_ptr(), stream),
       op);
    return out;
  }

  // Y = ((X·B1) ⊙ s)·B2 + bias by the fused kernel when its switch and shape allow; else undefined.
  // B1, B2 are (K1, r) and (r, N) when nmajor, else given transposed as (r, K1) and (N, r).
  static at::Tensor try_fused(const at::Tensor& X_in, const at::Tensor& B1_in, const at::Tensor& s,
                              const at::Tensor& B2_in, bool nmajor, const at::Tensor* bias, void* stream,
                              const char* op) {
    const int m = mode(kChain);
    if (m == kOff) return {};
    const auto X = X_in.contiguous(), B1 = B1_in.contiguous(), B2 = B2_in.contiguous();
    const auto s32 = s.to(at::kFloat).contiguous();
    imse_cuda::Fused f;
    f.dtype = kernel_dtype(X.scalar_type());
    f.M = X.size(0);
    f.K1 = X.size(1);
    f.R = nmajor ? B1.size(1) : B1.size(0);
    f.N = nmajor ? B2.size(1) : B2.size(0);
    f.X = X.data_ptr();
    f.ldx = X.size(1);
    f.B1 = B1.data_ptr();
    f.ldb1 = B1.size(1);
    f.b1_nmajor = nmajor;
    f.s = s32.data_ptr();
    f.B2 = B2.data_ptr();
    f.ldb2 = B2.size(1);
    f.b2_nmajor = nmajor;
    f.bias = bias ? bias->data_ptr() : nullptr;
    if (!imse_cuda::fused_wanted(f, m)) return {};
    auto Y = at::empty({f.M, f.N}, X.options());
    f.Y = Y.data_ptr();
    f.ldy = f.N;
    ok(imse_cuda::run_fused(f, stream), op);
    return Y;
  }

  // ------------------------------------------------------------------------------------------
  // The five primitives (schema in csrc/spectral_schema.h)

  static std::tuple<at::Tensor, at::Tensor> factorized_forward(const at::Tensor& x, const at::Tensor& U,
                                                               const at::Tensor& s_in, const at::Tensor& Vh,
                                                               const std::optional<at::Tensor>& bias_in, bool save_h) {
    const char* op = "imse_ext.factorized_forward";
    TORCH_CHECK(x.defined(), op, ": x is undefined");
    const auto device = x.device();
    check_tensor(x, op, "x", 2, device);
    check_compute_dtype(x, op, "x");
    const auto dtype = x.scalar_type();
    check_factors(U, s_in, Vh, op, dtype, device);
    TORCH_CHECK(x.size(1) == Vh.size(1), op, ": x has shape ", x.sizes(), " but Vh ", Vh.sizes(), " expects d_in = ",
                Vh.size(1));
    const bool has_bias = bias_in.has_value() && bias_in->defined();
    if (has_bias) {
      check_tensor(*bias_in, op, "bias", 1, device);
      check_dtype(*bias_in, op, "bias", dtype);
      TORCH_CHECK(bias_in->size(0) == U.size(0), op, ": bias has shape ", bias_in->sizes(), " but d_out is ",
                  U.size(0));
    }
    typename Dev::Guard guard(device);
    const auto s = s_in.to(acc_type(dtype));
    const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
    const auto none = at::empty({0}, x.options());
    if (!save_h) {
      auto y = try_fused(x, Vh, s, U, /*nmajor=*/false, has_bias ? &bias : nullptr, Dev::stream(device), op);
      if (y.defined()) return {y, none};
    }
    const auto h = at::mm(x, Vh.t());
    // s scales the smaller of h (N × r) and U (d_out × r); h itself is returned unscaled.
    const bool scale_h = x.size(0) < U.size(0);
    const auto a = scale_h ? scaled(h, s, 1) : h;
    const auto w = scale_h ? U : scaled(U, s, 1);
    auto y = has_bias ? at::addmm(bias, a, w.t()) : at::mm(a, w.t());
    return {y, save_h ? h : none};
  }

  static at::Tensor recompose(const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh) {
    const char* op = "imse_ext.recompose";
    TORCH_CHECK(U.defined(), op, ": U is undefined");
    const auto device = U.device();
    check_tensor(U, op, "U", 2, device);
    check_compute_dtype(U, op, "U");
    check_factors(U, s, Vh, op, U.scalar_type(), device);
    typename Dev::Guard guard(device);
    return at::mm(scaled(U, s.to(acc_type(U.scalar_type())), 1), Vh);
  }

  // The backward ops' common checks: grad (N, d_out) in a compute dtype, then U, s, Vh against it.
  static void check_grad(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s, const at::Tensor& Vh,
                         const char* op) {
    TORCH_CHECK(grad.defined(), op, ": grad is undefined");
    check_tensor(grad, op, "grad", 2, grad.device());
    check_compute_dtype(grad, op, "grad");
    TORCH_CHECK(U.dim() == 2 && grad.size(1) == U.size(0), op, ": grad has shape ", grad.sizes(), " but U has shape ",
                U.sizes(), " (d_out = U.shape[0])");
    check_factors(U, s, Vh, op, grad.scalar_type(), grad.device());
  }

  // A 2-D operand (h, x or W) in the compute dtype with the shape `dims` = (rows, cols).
  static void check_operand(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                            const at::Device& device, const char* dims, int64_t rows, int64_t cols) {
    check_tensor(t, op, name, 2, device);
    check_dtype(t, op, name, dtype);
    TORCH_CHECK(t.size(0) == rows && t.size(1) == cols, op, ": ", name, " has shape ", t.sizes(), ", expected ", dims,
                " = (", rows, ", ", cols, ")");
  }

  static std::tuple<at::Tensor, at::Tensor> factorized_backward(const at::Tensor& grad, const at::Tensor& h,
                                                                const at::Tensor& U, const at::Tensor& s_in,
                                                                const at::Tensor& Vh, bool need_dx) {
    const char* op = "imse_ext.factorized_backward";
    check_grad(grad, U, s_in, Vh, op);
    const auto device = grad.device();
    const auto dtype = grad.scalar_type();
    check_operand(h, op, "h", dtype, device, "(N, r)", grad.size(0), U.size(1));
    typename Dev::Guard guard(device);
    const auto s = s_in.to(acc_type(dtype));
    const auto t = at::mm(grad, U);  // N × r
    const auto ds = colsum(t, h, Dev::stream(device), op);
    const auto dx = need_dx ? scaled_mm(t, s, Vh) : at::empty({0}, grad.options());
    return {dx, ds.to(s_in.scalar_type())};
  }

  static at::Tensor factorized_input_grad(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& s_in,
                                          const at::Tensor& Vh) {
    const char* op = "imse_ext.factorized_input_grad";
    check_grad(grad, U, s_in, Vh, op);
    const auto device = grad.device();
    typename Dev::Guard guard(device);
    const auto s = s_in.to(acc_type(grad.scalar_type()));
    auto dx = try_fused(grad, U, s, Vh, /*nmajor=*/true, nullptr, Dev::stream(device), op);
    return dx.defined() ? dx : scaled_mm(at::mm(grad, U), s, Vh);
  }

  static std::tuple<at::Tensor, at::Tensor> recomposed_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& U, const at::Tensor& s_in,
                                                                const at::Tensor& Vh, const at::Tensor& W,
                                                                bool need_dx) {
    const char* op = "imse_ext.recomposed_backward";
    check_grad(grad, U, s_in, Vh, op);
    const auto device = grad.device();
    const auto dtype = grad.scalar_type();
    check_operand(x, op, "x", dtype, device, "(N, d_in)", grad.size(0), Vh.size(1));
    if (need_dx) check_operand(W, op, "W", dtype, device, "(d_out, d_in)", U.size(0), Vh.size(1));
    typename Dev::Guard guard(device);
    // ds[k] = Σ_j (Uᵀ·G)[k,j]·Vh[k,j] = Σ_o U[o,k]·(G·Vhᵀ)[o,k] with G = gradᵀ·x: the same FLOPs,
    // and the same column reduction as route F.
    const auto Q = at::mm(at::mm(grad.t(), x), Vh.t());  // d_out × r
    const auto ds = colsum(U, Q, Dev::stream(device), op);
    const auto dx = need_dx ? at::mm(grad, W) : at::empty({0}, grad.options());
    return {dx, ds.to(s_in.scalar_type())};
  }

  // ------------------------------------------------------------------------------------------
  // Per-sample codes (docs/design.md §8)

  // rows ⊙ S[index] row by row (S already in the accumulation type), in rows' dtype: the one-pass
  // kernel, or with the "chain" switch off ATen's index_select + mul (base.py's gather_scale).
  static at::Tensor gather_scale(const at::Tensor& rows_in, const at::Tensor& S, const at::Tensor& index, void* stream,
                                 const char* op) {
    if (mode(kChain) == kOff) return at::mul(rows_in.to(S.scalar_type()), S.index_select(0, index)).to(rows_in.scalar_type());
    const auto rows = rows_in.contiguous();
    auto out = at::empty_like(rows);
    ok(imse_cuda::gather_scale(kernel_dtype(rows.scalar_type()), rows.data_ptr(), S.data_ptr(),
                               index.data_ptr<int64_t>(), rows.size(0), rows.size(1), S.size(0), out.data_ptr(), stream),
       op);
    return out;
  }

  // dS[c] = Σ_{n: index[n]=c} h_n ⊙ t_n (K × r, accumulation type), deterministic either way: the
  // rows are stably sorted by code (ATen), then the segmented kernel (h ⊙ t never written); with the
  // "ds" switch off, ATen's product and segment_reduce over the sorted rows (base.py's
  // sorted_segment_sum).
  static at::Tensor segment_ds(const at::Tensor& h_in, const at::Tensor& t_in, const at::Tensor& index, int64_t K,
                               void* stream, const char* op) {
    const auto acc = acc_type(h_in.scalar_type());
    const int64_t N = h_in.size(0), r = h_in.size(1);
    const auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto& code = std::get<0>(sorted);
    const auto& perm = std::get<1>(sorted);
    if (mode(kDs) == kOff) {
      const auto rows = at::mul(h_in.index_select(0, perm).to(acc), t_in.index_select(0, perm).to(acc));
      // Segment c is [offsets[c], offsets[c+1]) of the sorted rows (binary search, no atomics).
      const auto offsets = at::searchsorted(code, at::arange(K + 1, code.options()));
      return at::segment_reduce(rows, "sum", {}, {}, offsets, 0, /*unsafe=*/true);
    }
    const auto h = h_in.contiguous(), t = t_in.contiguous();
    auto out = at::empty({K, r}, h.options().dtype(acc));
    auto work = at::empty({imse_cuda::segment_workspace_rows(N, K), r}, h.options().dtype(acc));
    ok(imse_cuda::segment_product(kernel_dtype(h.scalar_type()), h.data_ptr(), t.data_ptr(), perm.data_ptr<int64_t>(),
                                  code.data_ptr<int64_t>(), N, r, K, work.data_ptr(), out.data_ptr(), stream),
       op);
    return out;
  }

  // The indexed ops' checks: `a` is x (N, d_in) or grad (N, d_out), in a compute dtype; U, Vh in its
  // dtype; S (K, r) float32/float64; index int64 (N) on the same device. The values of index are the
  // Python op's to check (a host sync); the kernels never read out of bounds with bad ones.
  static void check_indexed(const at::Tensor& a, bool is_grad, const at::Tensor& U, const at::Tensor& S,
                            const at::Tensor& Vh, const at::Tensor& index, const char* op) {
    const char* a_name = is_grad ? "grad" : "x";
    TORCH_CHECK(a.defined(), op, ": ", a_name, " is undefined");
    const auto device = a.device();
    check_tensor(a, op, a_name, 2, device);
    check_compute_dtype(a, op, a_name);
    check_tensor(U, op, "U", 2, device);
    check_tensor(Vh, op, "Vh", 2, device);
    check_dtype(U, op, "U", a.scalar_type());
    check_dtype(Vh, op, "Vh", a.scalar_type());
    TORCH_CHECK(U.size(1) == Vh.size(0), op, ": rank mismatch: U has shape ", U.sizes(), " (r = ", U.size(1),
                ") but Vh has shape ", Vh.sizes(), " (r = ", Vh.size(0), ")");
    check_tensor(S, op, "S", 2, device);
    TORCH_CHECK(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble, op,
                ": S must be float32 or float64, got ", S.scalar_type());
    TORCH_CHECK(S.size(1) == U.size(1), op, ": S has shape ", S.sizes(), " but the rank r (U.shape[1] = Vh.shape[0]) is ",
                U.size(1), "; S must be (K, r)");
    if (is_grad) {
      TORCH_CHECK(a.size(1) == U.size(0), op, ": grad has shape ", a.sizes(), " but U has shape ", U.sizes(),
                  " (d_out = U.shape[0])");
    } else {
      TORCH_CHECK(a.size(1) == Vh.size(1), op, ": x has shape ", a.sizes(), " but Vh ", Vh.sizes(), " expects d_in = ",
                  Vh.size(1));
    }
    check_tensor(index, op, "index", 1, device);
    TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
    TORCH_CHECK(index.size(0) == a.size(0), op, ": index has ", index.size(0), " entries but ", a_name, " has ",
                a.size(0), " rows");
  }

  static std::tuple<at::Tensor, at::Tensor> indexed_forward(const at::Tensor& x, const at::Tensor& U,
                                                            const at::Tensor& S_in, const at::Tensor& Vh,
                                                            const std::optional<at::Tensor>& bias_in,
                                                            const at::Tensor& index_in, bool save_h) {
    const char* op = "imse_ext.indexed_forward";
    check_indexed(x, false, U, S_in, Vh, index_in, op);
    const auto device = x.device();
    const auto dtype = x.scalar_type();
    const bool has_bias = bias_in.has_value() && bias_in->defined();
    if (has_bias) {
      check_tensor(*bias_in, op, "bias", 1, device);
      check_dtype(*bias_in, op, "bias", dtype);
      TORCH_CHECK(bias_in->size(0) == U.size(0), op, ": bias has shape ", bias_in->sizes(), " but d_out is ",
                  U.size(0));
    }
    typename Dev::Guard guard(device);
    const auto S = S_in.to(acc_type(dtype)).contiguous();
    const auto index = index_in.contiguous();
    const auto h = at::mm(x, Vh.t());  // N × r, returned unscaled
    const auto hs = gather_scale(h, S, index, Dev::stream(device), op);
    auto y = has_bias ? at::addmm(*bias_in, hs, U.t()) : at::mm(hs, U.t());
    return {y, save_h ? h : at::empty({0}, x.options())};
  }

  static std::tuple<at::Tensor, at::Tensor> indexed_backward(const at::Tensor& grad, const at::Tensor& h,
                                                             const at::Tensor& U, const at::Tensor& S_in,
                                                             const at::Tensor& Vh, const at::Tensor& index_in,
                                                             bool need_dx) {
    const char* op = "imse_ext.indexed_backward";
    check_indexed(grad, true, U, S_in, Vh, index_in, op);
    const auto device = grad.device();
    const auto dtype = grad.scalar_type();
    check_operand(h, op, "h", dtype, device, "(N, r)", grad.size(0), U.size(1));
    typename Dev::Guard guard(device);
    const auto S = S_in.to(acc_type(dtype)).contiguous();
    const auto index = index_in.contiguous();
    const auto t = at::mm(grad, U);  // N × r
    const auto dS = segment_ds(h, t, index, S.size(0), Dev::stream(device), op);
    const auto dx = need_dx ? at::mm(gather_scale(t, S, index, Dev::stream(device), op), Vh)
                            : at::empty({0}, grad.options());
    return {dx, dS.to(S_in.scalar_type())};
  }

  static at::Tensor indexed_input_grad(const at::Tensor& grad, const at::Tensor& U, const at::Tensor& S_in,
                                       const at::Tensor& Vh, const at::Tensor& index_in) {
    const char* op = "imse_ext.indexed_input_grad";
    check_indexed(grad, true, U, S_in, Vh, index_in, op);
    const auto device = grad.device();
    typename Dev::Guard guard(device);
    const auto S = S_in.to(acc_type(grad.scalar_type())).contiguous();
    const auto index = index_in.contiguous();
    return at::mm(gather_scale(at::mm(grad, U), S, index, Dev::stream(device), op), Vh);
  }
};

}  // namespace imse_cuda_ops

#define IMSE_REGISTER_IMPLS(m, OPS)                              \
  m.impl("factorized_forward", &OPS::factorized_forward);         \
  m.impl("recompose", &OPS::recompose);                           \
  m.impl("factorized_backward", &OPS::factorized_backward);       \
  m.impl("factorized_input_grad", &OPS::factorized_input_grad);   \
  m.impl("recomposed_backward", &OPS::recomposed_backward)

// The per-sample-code primitives (schema IMSE_DEFINE_INDEXED_SCHEMA in csrc/spectral_schema.h).
#define IMSE_REGISTER_INDEXED_IMPLS(m, OPS)                     \
  m.impl("indexed_forward", &OPS::indexed_forward);             \
  m.impl("indexed_backward", &OPS::indexed_backward);           \
  m.impl("indexed_input_grad", &OPS::indexed_input_grad)

// The switch op, defined in the namespace of the primitives it steers (no tensor arguments).
#define IMSE_DEFINE_SWITCH(m, OPS) m.def("cuda_fused_mode(str kernel, int? mode=None) -> int", &OPS::fused_mode)
