// Standalone check of the kernels in ../spectral_kernels.cu under the emulator, without torch: the ds
// column reduction in every dtype, the fused kernel in both layouts, and the per-sample-code kernels
// (gather-scale, segmented dS; docs/design.md §8) in every dtype, against a float64 reference. Built with ThreadSanitizer by tests/gpu/test_cuda_build.py, where any read of shared memory
// that is not ordered after its write by a __syncthreads (a missing barrier) is a reported data race:
//
//   g++ -std=c++17 -O1 -g -fsanitize=thread -Wno-unknown-pragmas emu_selftest.cpp emu_kernels.cpp -lpthread
//
// Exit status 0 when every case is within tolerance; prints one line per failure.
#define IMSE_EMU 1
#include "cuda_emu.h"

#include <cstdio>
#include <algorithm>
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

double tol_for(DType t) {
  if (t == kF64) return 1e-12;
  if (t == kF32) return 2e-5;
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

void colsum_case(DType t, int M, int L) {
  const DType acc = t == kF64 ? kF64 : kF32;
  Buffer A(t, size_t(M) * L, true), B(t, size_t(M) * L, true), out(acc, L, false);
  Buffer work(acc, size_t(std::max<int64_t>(colsum_blocks(M), 1)) * L, false);
  char what[128];
  std::snprintf(what, sizeof what, "colsum %s %dx%d", name_of(t), M, L);
  const int e = colsum_product(t, A.ptr(), B.ptr(), M, L, work.ptr(), out.ptr(), nullptr);
  if (e != 0) {
    ++failures;
    std::printf("FAIL %s: %s\n", what, error_string(e));
    return;
  }
  std::vector<double> ref(L, 0.0), got(L);
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < L; ++k) ref[k] += A.values[size_t(m) * L + k] * B.values[size_t(m) * L + k];
  for (int k = 0; k < L; ++k) got[k] = out.get(k);
  expect_close(what, got, ref, t == kF64 ? 1e-12 : 1e-5);  // products of the exact inputs, summed in acc
}

void fused_case(DType t, bool nmajor, int M, int K1, int Rk, int N, bool bias) {
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
  if (!fused_wanted(f, 1)) {
    ++failures;
    std::printf("FAIL %s: fused kernel refused in mode 1\n", what);
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
  expect_close(what, got, ref, tol_for(t));
}


// Per-sample codes: K codes of which only the even ones are used (odd codes: no rows, zero dS).
void indexed_case(DType t, int N, int R, int K) {
  const DType acc = t == kF64 ? kF64 : kF32;
  Buffer h(t, size_t(N) * R, true), tt(t, size_t(N) * R, true), S(acc, size_t(K) * R, true), hs(t, size_t(N) * R, false);
  std::vector<int64_t> index(N), perm(N), code(N);
  for (int n = 0; n < N; ++n) index[n] = (static_cast<int64_t>(rng() % ((K + 1) / 2)) * 2) % K;
  for (int n = 0; n < N; ++n) perm[n] = n;
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return index[a] < index[b]; });
  for (int n = 0; n < N; ++n) code[n] = index[perm[n]];
  char what[128];
  std::snprintf(what, sizeof what, "gather_scale %s N=%d r=%d K=%d", name_of(t), N, R, K);
  int e = gather_scale(t, h.ptr(), S.ptr(), index.data(), N, R, K, hs.ptr(), nullptr);
  if (e != 0) {
    ++failures;
    std::printf("FAIL %s: %s\n", what, error_string(e));
    return;
  }
  std::vector<double> ref(size_t(N) * R), got(size_t(N) * R);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < R; ++k) {
      ref[size_t(n) * R + k] = h.values[size_t(n) * R + k] * S.values[size_t(index[n]) * R + k];
      got[size_t(n) * R + k] = hs.get(size_t(n) * R + k);
    }
  expect_close(what, got, ref, t == kF64 ? 1e-12 : (t == kF32 ? 1e-6 : tol_for(t)));  // one rounding
  Buffer out(acc, size_t(K) * R, false), work(acc, size_t(std::max<int64_t>(segment_workspace_rows(N, K), 1)) * R, false);
  std::snprintf(what, sizeof what, "segment_product %s N=%d r=%d K=%d", name_of(t), N, R, K);
  e = segment_product(t, h.ptr(), tt.ptr(), perm.data(), code.data(), N, R, K, work.ptr(), out.ptr(), nullptr);
  if (e != 0) {
    ++failures;
    std::printf("FAIL %s: %s\n", what, error_string(e));
    return;
  }
  std::vector<double> dref(size_t(K) * R, 0.0), dgot(size_t(K) * R);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < R; ++k) dref[size_t(index[n]) * R + k] += h.values[size_t(n) * R + k] * tt.values[size_t(n) * R + k];
  for (size_t i = 0; i < dgot.size(); ++i) dgot[i] = out.get(i);
  expect_close(what, dgot, dref, t == kF64 ? 1e-12 : 1e-5);
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int shapes[][2] = {{1, 8}, {70, 45}, {600, 33}, {257, 64}};
  for (DType t : {kF16, kBF16, kF32, kF64})
    for (int si = 0; si < (quick ? 2 : 4); ++si) colsum_case(t, shapes[si][0], shapes[si][1]);
  for (DType t : {kF16, kBF16})
    for (int nm = 0; nm < 2; ++nm) {
      fused_case(t, nm != 0, 70, 40, 136, 150, true);
      if (!quick) fused_case(t, nm != 0, 65, 24, 20, 130, false);
    }
  const int icases[][3] = {{1, 8, 1}, {130, 40, 5}, {300, 33, 1}, {200, 70, 9}};
  for (DType t : {kF16, kBF16, kF32, kF64})
    for (int ci = 0; ci < (quick ? 2 : 4); ++ci) indexed_case(t, icases[ci][0], icases[ci][1], icases[ci][2]);
  std::printf("emu_selftest: %d checks, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
