// Standalone check of the kernels in ../spectral_kernels.cu under the emulator, without torch: every
// GEMM family, layout, dtype, epilogue and reduction mode, and the fused kernel, against a float64
// reference. Built with ThreadSanitizer by tests/test_cuda_build.py, where any read of shared memory
// that is not ordered after its write by a __syncthreads (a missing barrier) is a reported data race:
//
//   g++ -std=c++17 -O1 -g -fsanitize=thread -Wno-unknown-pragmas emu_selftest.cpp emu_kernels.cpp -lpthread
//
// Exit status 0 when every case is within tolerance; prints one line per failure.
#define IMSE_EMU 1
#include "cuda_emu.h"

#include <cstdio>
#include <random>

#include "../spectral_kernels.h"

using namespace imse_cuda;

namespace {

std::mt19937_64 rng(1234);

double uniform() { return std::uniform_real_distribution<double>(-1.0, 1.0)(rng); }

// A matrix stored in one of the four dtypes, with its exact float64 values.
struct Buffer {
  DType dtype;
  std::vector<unsigned char> bytes;
  std::vector<double> values;
  Buffer(DType t, size_t n, bool random, double scale = 1.0) : dtype(t), values(n, 0.0) {
    bytes.resize(n * size() + 16);
    for (size_t i = 0; i < n; ++i) set(i, random ? uniform() * scale : 0.0);
  }
  size_t size() const { return dtype == kF64 ? 8 : (dtype == kF32 ? 4 : 2); }
  void* ptr() { return bytes.data(); }
  void set(size_t i, double v) {
    unsigned char* p = bytes.data() + i * size();
    switch (dtype) {
      case kF64: std::memcpy(p, &v, 8); break;
      case kF32: { float f = static_cast<float>(v); std::memcpy(p, &f, 4); v = f; break; }
      case kF16: { __half h = __float2half_rn(static_cast<float>(v)); std::memcpy(p, &h, 2); v = __half2float(h); break; }
      case kBF16: { __nv_bfloat16 h = __float2bfloat16_rn(static_cast<float>(v)); std::memcpy(p, &h, 2); v = __bfloat162float(h); break; }
    }
    values[i] = v;
  }
  double get(size_t i) const {
    const unsigned char* p = bytes.data() + i * size();
    switch (dtype) {
      case kF64: { double d; std::memcpy(&d, p, 8); return d; }
      case kF32: { float f; std::memcpy(&f, p, 4); return f; }
      case kF16: { __half h; std::memcpy(&h, p, 2); return __half2float(h); }
      case kBF16: { __nv_bfloat16 h; std::memcpy(&h, p, 2); return __bfloat162float(h); }
    }
    return 0;
  }
};

double tol_for(DType t, bool tf32) {
  if (t == kF64) return 1e-12;
  if (t == kF32) return tf32 ? 5e-3 : 2e-5;
  return t == kF16 ? 5e-3 : 3e-2;
}

const char* name_of(DType t) { return t == kF64 ? "f64" : t == kF32 ? "f32" : t == kF16 ? "f16" : "bf16"; }

int failures = 0, cases = 0;

void expect_close(const char* what, const std::vector<double>& got, const std::vector<double>& ref, double tol) {
  double scale = 1e-30, err = 0;
  for (double v : ref) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < ref.size(); ++i) err = std::max(err, std::fabs(got[i] - ref[i]));
  ++cases;
  if (!(err / scale <= tol)) {
    ++failures;
    std::printf("FAIL %s: max error %.3g relative to %.3g (tolerance %.3g)\n", what, err / scale, scale, tol);
  }
}

void gemm_case(DType t, bool tf32, bool a_kmajor, bool b_nmajor, int M, int N, int K, RedMode red, bool scales,
               bool bias, const char* tile) {
  setenv("IMSE_CUDA_TILE", tile, 1);
  const DType acc = acc_dtype(t);
  Buffer A(t, size_t(M) * K, true), B(t, size_t(K) * N, true), C(t, size_t(M) * N, false), R(t, size_t(M) * N, true);
  Buffer sk(acc, K, true), sn(acc, N, true), bs(t, N, true);
  Gemm g;
  g.dtype = t;
  g.tf32 = tf32;
  g.M = M, g.N = N, g.K = K;
  g.A = A.ptr(), g.lda = a_kmajor ? K : M, g.a_kmajor = a_kmajor;
  g.B = B.ptr(), g.ldb = b_nmajor ? N : K, g.b_nmajor = b_nmajor;
  if (scales) g.scale_k = sk.ptr(), g.scale_n = sn.ptr();
  if (bias) g.bias = bs.ptr();
  g.C = C.ptr(), g.ldc = N;
  g.red = red, g.R = R.ptr(), g.ldr = N;
  GemmPlan plan;
  int e = plan_gemm(g, &plan);
  Buffer partial(acc, size_t(std::max<int64_t>(plan.partial_rows(g), 1)) * (red == kRedCols ? N : M), false);
  Buffer reduced(acc, red == kRedCols ? N : M, false);
  g.partial = partial.ptr();
  if (e == 0) e = run_gemm(g, plan, nullptr);
  if (e == 0 && red != kRedNone)
    e = reduce_partials(acc, partial.ptr(), plan.partial_rows(g), red == kRedCols ? N : M, reduced.ptr(), nullptr);
  char what[256];
  std::snprintf(what, sizeof what, "gemm %s%s A%s B%s %dx%dx%d red=%d scales=%d bias=%d tile=%s", name_of(t),
                tf32 ? "/tf32" : "", a_kmajor ? "k" : "m", b_nmajor ? "n" : "k", M, N, K, int(red), int(scales),
                int(bias), tile);
  if (e != 0) {
    ++failures;
    std::printf("FAIL %s: %s\n", what, error_string(e));
    return;
  }
  std::vector<double> raw(size_t(M) * N, 0.0), ref(size_t(M) * N), got(size_t(M) * N);
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double sum = 0;
      for (int k = 0; k < K; ++k) {
        const double a = A.values[a_kmajor ? size_t(m) * K + k : size_t(k) * M + m];
        const double b = B.values[b_nmajor ? size_t(k) * N + n : size_t(n) * K + k];
        sum += a * (scales ? sk.values[k] : 1.0) * b;
      }
      raw[size_t(m) * N + n] = sum;
      ref[size_t(m) * N + n] = sum * (scales ? sn.values[n] : 1.0) + (bias ? bs.values[n] : 0.0);
      got[size_t(m) * N + n] = C.get(size_t(m) * N + n);
    }
  expect_close(what, got, ref, tol_for(t, tf32));
  if (red != kRedNone) {
    const int L = red == kRedCols ? N : M;
    std::vector<double> rref(L, 0.0), rgot(L);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) rref[red == kRedCols ? n : m] += raw[size_t(m) * N + n] * R.values[size_t(m) * N + n];
    for (int l = 0; l < L; ++l) rgot[l] = reduced.get(l);
    std::string w = std::string(what) + " (reduction)";
    expect_close(w.c_str(), rgot, rref, tol_for(t, tf32));
  }
}

void fused_case(DType t, bool nmajor, int M, int K1, int Rk, int N, bool bias) {
  setenv("IMSE_CUDA_FUSED", "1", 1);
  Buffer X(t, size_t(M) * K1, true), B1(t, size_t(K1) * Rk, true), B2(t, size_t(Rk) * N, true), Y(t, size_t(M) * N, false);
  Buffer s(kF32, Rk, true), bs(t, N, true);
  Fused f;
  f.dtype = t;
  f.M = M, f.K1 = K1, f.R = Rk, f.N = N;
  f.X = X.ptr(), f.ldx = K1;
  f.B1 = B1.ptr(), f.ldb1 = nmajor ? Rk : K1, f.b1_nmajor = nmajor;
  f.s = s.ptr();
  f.B2 = B2.ptr(), f.ldb2 = nmajor ? N : Rk, f.b2_nmajor = nmajor;
  f.bias = bias ? bs.ptr() : nullptr;
  f.Y = Y.ptr(), f.ldy = N;
  char what[256];
  std::snprintf(what, sizeof what, "fused %s nmajor=%d %dx%dx%dx%d bias=%d", name_of(t), int(nmajor), M, K1, Rk, N,
                int(bias));
  if (!fused_wanted(f)) {
    ++failures;
    std::printf("FAIL %s: fused kernel refused with IMSE_CUDA_FUSED=1\n", what);
    return;
  }
  const int e = run_fused(f, nullptr);
  if (e != 0) {
    ++failures;
    std::printf("FAIL %s: %s\n", what, error_string(e));
    return;
  }
  std::vector<double> ref(size_t(M) * N), got(size_t(M) * N);
  std::vector<double> hs(Rk);
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < Rk; ++j) {
      double sum = 0;
      for (int k = 0; k < K1; ++k) sum += X.values[size_t(m) * K1 + k] * B1.values[nmajor ? size_t(k) * Rk + j : size_t(j) * K1 + k];
      hs[j] = sum * s.values[j];
    }
    for (int n = 0; n < N; ++n) {
      double sum = 0;
      for (int j = 0; j < Rk; ++j) sum += hs[j] * B2.values[nmajor ? size_t(j) * N + n : size_t(n) * Rk + j];
      ref[size_t(m) * N + n] = sum + (bias ? bs.values[n] : 0.0);
      got[size_t(m) * N + n] = Y.get(size_t(m) * N + n);
    }
  }
  expect_close(what, got, ref, tol_for(t, false));
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const DType types[] = {kF16, kBF16, kF32, kF64};
  struct Layout { bool a_kmajor, b_nmajor; RedMode red; };
  const Layout layouts[] = {{true, false, kRedNone}, {true, true, kRedCols}, {false, true, kRedRows}};
  const int shapes[][3] = {{70, 45, 37}, {64, 64, 64}, {129, 136, 40}};
  const int nshapes = quick ? 2 : 3;
  for (DType t : types)
    for (int tf = 0; tf < (t == kF32 ? 2 : 1); ++tf)
      for (const Layout& l : layouts)
        for (int si = 0; si < nshapes; ++si) {
          const bool tc = t == kF16 || t == kBF16 || tf;
          for (const char* tile : {"small", "big"}) {
            if (!tc && tile[0] == 'b') continue;  // one configuration for the exact kernels
            gemm_case(t, tf != 0, l.a_kmajor, l.b_nmajor, shapes[si][0], shapes[si][1], shapes[si][2], l.red,
                      si != 1, si != 2, tile);
          }
        }
  for (DType t : {kF16, kBF16})
    for (int nm = 0; nm < 2; ++nm) {
      fused_case(t, nm != 0, 70, 40, 136, 150, true);
      if (!quick) fused_case(t, nm != 0, 65, 24, 20, 130, false);
    }
  std::printf("emu_selftest: %d checks, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
