// The torch-facing implementations of the imse_ext backend primitives on top of the kernels in
// spectral_kernels.cu. Included by spectral_linear_cuda.cpp (CUDA tensors, torch's current stream)
// and by emu/emu_ops.cpp (the same code over CPU tensors with the kernels emulated, for the tests).
// `Dev` supplies: kType (c10::DeviceType), kName, Guard (RAII device guard), stream(device).
//
// Every input is checked (device, dtype, shapes) with a message naming the op, the argument and
// what was found, before anything is launched; inputs are made contiguous here.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>

#include "spectral_kernels.h"

namespace imse_cuda_ops {

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
    for (int64_t d = 0; d < dim; ++d)
      TORCH_CHECK(t.size(d) <= INT_MAX, op, ": ", name, " dimension ", d, " is ", t.size(d),
                  ", larger than the kernels' 2^31 - 1 limit");
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
  // Helpers

  static at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

  // TF32 exactly when torch's own fp32 matmuls may use it. allowTF32CuBLAS() reads the current precision
  // API (torch.backends.cuda.matmul.fp32_precision) and raises when the legacy flag disagrees with it,
  // i.e. when the two APIs were mixed; the current API is then the opposite of the legacy value.
  static bool tf32_allowed() {
    const bool legacy = at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
    try {
      return at::globalContext().allowTF32CuBLAS();
    } catch (const c10::Error&) {
      return !legacy;
    }
  }

  static imse_cuda::Gemm gemm_for(const at::Tensor& like) {
    imse_cuda::Gemm g;
    g.dtype = kernel_dtype(like.scalar_type());
    g.tf32 = like.scalar_type() == at::kFloat && tf32_allowed();
    return g;
  }

  // Runs g; with a reduction, allocates its partials and returns them reduced to one acc vector.
  static at::Tensor run(imse_cuda::Gemm& g, const at::Tensor& like, void* stream, const char* op) {
    imse_cuda::GemmPlan plan;
    ok(imse_cuda::plan_gemm(g, &plan), op);
    at::Tensor reduced;
    at::Tensor partial;
    if (g.red != imse_cuda::kRedNone) {
      const int64_t len = g.red == imse_cuda::kRedCols ? g.N : g.M;
      const auto acc = acc_type(like.scalar_type());
      partial = at::empty({plan.partial_rows(g), len}, like.options().dtype(acc));
      g.partial = partial.data_ptr();
      reduced = at::empty({len}, like.options().dtype(acc));
    }
    ok(imse_cuda::run_gemm(g, plan, stream), op);
    if (g.red != imse_cuda::kRedNone) {
      ok(imse_cuda::reduce_partials(imse_cuda::acc_dtype(g.dtype), partial.data_ptr(), partial.size(0), reduced.size(0),
                                    reduced.data_ptr(), stream),
         op);
    }
    return reduced;
  }

  // C (M, N) = A (M, K) · B, B given as (N, K) ("linear weight", b_nmajor = false) or (K, N).
  static void gemm_into(at::Tensor& C, const at::Tensor& A, const at::Tensor& B, bool b_nmajor,
                        const at::Tensor* scale_k, const at::Tensor* scale_n, const at::Tensor* bias, void* stream,
                        const char* op) {
    imse_cuda::Gemm g = gemm_for(A);
    g.M = A.size(0);
    g.K = A.size(1);
    g.N = C.size(1);
    g.A = A.data_ptr();
    g.lda = A.size(1);
    g.a_kmajor = true;
    g.B = B.data_ptr();
    g.ldb = B.size(1);
    g.b_nmajor = b_nmajor;
    g.scale_k = scale_k ? scale_k->data_ptr() : nullptr;
    g.scale_n = scale_n ? scale_n->data_ptr() : nullptr;
    g.bias = bias ? bias->data_ptr() : nullptr;
    g.C = C.data_ptr();
    g.ldc = C.size(1);
    run(g, A, stream, op);
  }

  // Y = ((X·B1) ⊙ s)·B2 + bias through the fused kernel when it is wanted; false when not used.
  static bool try_fused(at::Tensor& Y, const at::Tensor& X, const at::Tensor& B1, const at::Tensor& s_acc,
                        const at::Tensor& B2, bool nmajor, int64_t r, const at::Tensor* bias, void* stream,
                        const char* op) {
    imse_cuda::Fused f;
    f.dtype = kernel_dtype(X.scalar_type());
    f.M = X.size(0);
    f.K1 = X.size(1);
    f.R = r;
    f.N = Y.size(1);
    f.X = X.data_ptr();
    f.ldx = X.size(1);
    f.B1 = B1.data_ptr();
    f.ldb1 = B1.size(1);
    f.b1_nmajor = nmajor;
    f.s = s_acc.data_ptr();
    f.B2 = B2.data_ptr();
    f.ldb2 = B2.size(1);
    f.b2_nmajor = nmajor;
    f.bias = bias ? bias->data_ptr() : nullptr;
    f.Y = Y.data_ptr();
    f.ldy = Y.size(1);
    if (!imse_cuda::fused_wanted(f)) return false;
    ok(imse_cuda::run_fused(f, stream), op);
    return true;
  }

  // ------------------------------------------------------------------------------------------
  // The five primitives (schema in csrc/spectral_schema.h)

  static std::tuple<at::Tensor, at::Tensor> factorized_forward(const at::Tensor& x_in, const at::Tensor& U_in,
                                                               const at::Tensor& s_in, const at::Tensor& Vh_in,
                                                               const std::optional<at::Tensor>& bias_in, bool save_h) {
    const char* op = "imse_ext.factorized_forward";
    TORCH_CHECK(x_in.defined(), op, ": x is undefined");
    const auto device = x_in.device();
    check_tensor(x_in, op, "x", 2, device);
    check_compute_dtype(x_in, op, "x");
    const auto dtype = x_in.scalar_type();
    check_factors(U_in, s_in, Vh_in, op, dtype, device);
    TORCH_CHECK(x_in.size(1) == Vh_in.size(1), op, ": x has shape ", x_in.sizes(), " but Vh ", Vh_in.sizes(),
                " expects d_in = ", Vh_in.size(1));
    const bool has_bias = bias_in.has_value() && bias_in->defined();
    if (has_bias) {
      check_tensor(*bias_in, op, "bias", 1, device);
      check_dtype(*bias_in, op, "bias", dtype);
      TORCH_CHECK(bias_in->size(0) == U_in.size(0), op, ": bias has shape ", bias_in->sizes(), " but d_out is ",
                  U_in.size(0));
    }
    typename Dev::Guard guard(device);
    void* stream = Dev::stream(device);
    const auto x = x_in.contiguous(), U = U_in.contiguous(), Vh = Vh_in.contiguous();
    const auto s = s_in.to(acc_type(dtype)).contiguous();
    const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
    const int64_t n = x.size(0), d_out = U.size(0), r = U.size(1);
    auto y = at::empty({n, d_out}, x.options());
    const at::Tensor* bias_p = has_bias ? &bias : nullptr;
    if (!save_h) {
      // Fused: h stays in shared memory (fp16/bf16 when it fits; see fused_wanted).
      const auto s32 = s.scalar_type() == at::kFloat ? s : s.to(at::kFloat);
      if (try_fused(y, x, Vh, s32, U, /*nmajor=*/false, r, bias_p, stream, op)) return {y, at::empty({0}, x.options())};
    }
    auto h = at::empty({n, r}, x.options());
    gemm_into(h, x, Vh, /*b_nmajor=*/false, nullptr, nullptr, nullptr, stream, op);
    gemm_into(y, h, U, /*b_nmajor=*/false, &s, nullptr, bias_p, stream, op);
    return {y, save_h ? h : at::empty({0}, x.options())};
  }

  static at::Tensor recompose(const at::Tensor& U_in, const at::Tensor& s_in, const at::Tensor& Vh_in) {
    const char* op = "imse_ext.recompose";
    TORCH_CHECK(U_in.defined(), op, ": U is undefined");
    const auto device = U_in.device();
    check_tensor(U_in, op, "U", 2, device);
    check_compute_dtype(U_in, op, "U");
    const auto dtype = U_in.scalar_type();
    check_factors(U_in, s_in, Vh_in, op, dtype, device);
    typename Dev::Guard guard(device);
    void* stream = Dev::stream(device);
    const auto U = U_in.contiguous(), Vh = Vh_in.contiguous();
    const auto s = s_in.to(acc_type(dtype)).contiguous();
    auto W = at::empty({U.size(0), Vh.size(1)}, U.options());
    gemm_into(W, U, Vh, /*b_nmajor=*/true, &s, nullptr, nullptr, stream, op);
    return W;
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

  static std::tuple<at::Tensor, at::Tensor> factorized_backward(const at::Tensor& grad_in, const at::Tensor& h_in,
                                                                const at::Tensor& U_in, const at::Tensor& s_in,
                                                                const at::Tensor& Vh_in, bool need_dx) {
    const char* op = "imse_ext.factorized_backward";
    check_grad(grad_in, U_in, s_in, Vh_in, op);
    const auto device = grad_in.device();
    const auto dtype = grad_in.scalar_type();
    check_operand(h_in, op, "h", dtype, device, "(N, r)", grad_in.size(0), U_in.size(1));
    typename Dev::Guard guard(device);
    void* stream = Dev::stream(device);
    const auto grad = grad_in.contiguous(), h = h_in.contiguous(), U = U_in.contiguous(), Vh = Vh_in.contiguous();
    const auto s = s_in.to(acc_type(dtype)).contiguous();
    const int64_t n = grad.size(0), d_out = U.size(0), r = U.size(1), d_in = Vh.size(1);
    // t = grad·U; ds = colsum(t ⊙ h) (per-block partials, fixed-order sum); ts = t ⊙ s kept for dx.
    imse_cuda::Gemm g = gemm_for(grad);
    g.M = n;
    g.N = r;
    g.K = d_out;
    g.A = grad.data_ptr();
    g.lda = d_out;
    g.a_kmajor = true;
    g.B = U.data_ptr();
    g.ldb = r;
    g.b_nmajor = true;
    g.red = imse_cuda::kRedCols;
    g.R = h.data_ptr();
    g.ldr = r;
    at::Tensor ts;
    if (need_dx) {
      ts = at::empty({n, r}, grad.options());
      g.C = ts.data_ptr();
      g.ldc = r;
      g.scale_n = s.data_ptr();
    }
    at::Tensor ds = run(g, grad, stream, op);
    at::Tensor dx;
    if (need_dx) {
      dx = at::empty({n, d_in}, grad.options());
      gemm_into(dx, ts, Vh, /*b_nmajor=*/true, nullptr, nullptr, nullptr, stream, op);
    } else {
      dx = at::empty({0}, grad.options());
    }
    return {dx, ds.to(s_in.scalar_type())};
  }

  static at::Tensor factorized_input_grad(const at::Tensor& grad_in, const at::Tensor& U_in, const at::Tensor& s_in,
                                          const at::Tensor& Vh_in) {
    const char* op = "imse_ext.factorized_input_grad";
    check_grad(grad_in, U_in, s_in, Vh_in, op);
    const auto device = grad_in.device();
    const auto dtype = grad_in.scalar_type();
    typename Dev::Guard guard(device);
    void* stream = Dev::stream(device);
    const auto grad = grad_in.contiguous(), U = U_in.contiguous(), Vh = Vh_in.contiguous();
    const auto s = s_in.to(acc_type(dtype)).contiguous();
    const int64_t n = grad.size(0), r = U.size(1), d_in = Vh.size(1);
    auto dx = at::empty({n, d_in}, grad.options());
    const auto s32 = s.scalar_type() == at::kFloat ? s : s.to(at::kFloat);
    if (try_fused(dx, grad, U, s32, Vh, /*nmajor=*/true, r, nullptr, stream, op)) return dx;
    auto ts = at::empty({n, r}, grad.options());
    gemm_into(ts, grad, U, /*b_nmajor=*/true, nullptr, &s, nullptr, stream, op);
    gemm_into(dx, ts, Vh, /*b_nmajor=*/true, nullptr, nullptr, nullptr, stream, op);
    return dx;
  }

  static std::tuple<at::Tensor, at::Tensor> recomposed_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                                const at::Tensor& U_in, const at::Tensor& s_in,
                                                                const at::Tensor& Vh_in, const at::Tensor& W_in,
                                                                bool need_dx) {
    const char* op = "imse_ext.recomposed_backward";
    check_grad(grad_in, U_in, s_in, Vh_in, op);
    const auto device = grad_in.device();
    const auto dtype = grad_in.scalar_type();
    check_operand(x_in, op, "x", dtype, device, "(N, d_in)", grad_in.size(0), Vh_in.size(1));
    if (need_dx) {
      check_operand(W_in, op, "W", dtype, device, "(d_out, d_in)", U_in.size(0), Vh_in.size(1));
    }
    typename Dev::Guard guard(device);
    void* stream = Dev::stream(device);
    const auto grad = grad_in.contiguous(), x = x_in.contiguous(), U = U_in.contiguous(), Vh = Vh_in.contiguous();
    const int64_t d_out = U.size(0), r = U.size(1), d_in = Vh.size(1);
    // G = gradᵀ·x (cuBLAS through ATen), then ds[k] = Σ_j (Uᵀ·G)[k,j] · Vh[k,j] fused: the (r × d_in)
    // product never reaches memory; per-column-block partials, fixed-order sum.
    const auto G = at::mm(grad.t(), x).contiguous();
    imse_cuda::Gemm g = gemm_for(grad);
    g.M = r;
    g.N = d_in;
    g.K = d_out;
    g.A = U.data_ptr();
    g.lda = r;
    g.a_kmajor = false;  // A(k_out, j) = U[o*r + j]: column-major view of Uᵀ
    g.B = G.data_ptr();
    g.ldb = d_in;
    g.b_nmajor = true;
    g.red = imse_cuda::kRedRows;
    g.R = Vh.data_ptr();
    g.ldr = d_in;
    at::Tensor ds = run(g, grad, stream, op);
    at::Tensor dx = need_dx ? at::mm(grad, W_in) : at::empty({0}, grad.options());
    return {dx, ds.to(s_in.scalar_type())};
  }
};

}  // namespace imse_cuda_ops

#define IMSE_REGISTER_IMPLS(m, OPS)                              \
  m.impl("factorized_forward", &OPS::factorized_forward);         \
  m.impl("recompose", &OPS::recompose);                           \
  m.impl("factorized_backward", &OPS::factorized_backward);       \
  m.impl("factorized_input_grad", &OPS::factorized_input_grad);   \
  m.impl("recomposed_backward", &OPS::recomposed_backward)
