// Launch interface of the custom CUDA kernels in spectral_kernels.cu: only what cuBLAS cannot do
// (docs/design.md §3); every plain GEMM goes to cuBLAS through ATen in spectral_ops.h. Plain C++: no
// torch and no CUDA headers, so the kernels compile without torch (fast nvcc) and spectral_ops.h
// compiles without nvcc. Matrices are dense and row-major unless said otherwise.
//
// Every function returns 0 on success, else an error code for error_string(): a cudaError_t value
// (launch failures) or one of the kErr* codes below (refused before any launch).
#pragma once

#include <cstdint>

namespace imse_cuda {

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

enum Error : int {
  kErrNeedSm80 = 10001,     // the fused kernel on a GPU older than sm_80
  kErrTooLarge = 10002,     // a dimension the grid cannot cover
  kErrUnsupported = 10003,  // a layout or dtype combination this file does not instantiate
  kErrDevice = 10004,       // the device attributes could not be read
};

// Deterministic ds: out[k] = Σ_n A[n,k]·B[n,k] over the M rows of the (M × L) matrices A and B, in
// the accumulation type (float64 for kF64, else float32). Per-block partials go to `workspace`
// (colsum_blocks(M) × L accumulation values), then a fixed-order sum: no atomics, bitwise
// repeatable for a given shape. M == 0 gives zeros.
int64_t colsum_blocks(int64_t M);
int colsum_product(DType dtype, const void* A, const void* B, int64_t M, int64_t L, void* workspace, void* out,
                   void* stream);

// Per-sample codes (docs/design.md §8): S is a (K × r) code table in the accumulation type (float64
// for kF64, else float32), index / perm / code int64 device arrays.
//
// gather_scale: out[n,k] = h[n,k]·S[index[n],k] (h, out: N × r; out may be h), computed in the
// accumulation type and rounded once to the dtype. One pass. A code outside [0, K) gives a NaN row
// (the Python op rejects such codes; nothing is read out of bounds).
int gather_scale(DType dtype, const void* h, const void* S, const int64_t* index, int64_t N, int64_t r, int64_t K,
                 void* out, void* stream);

// Deterministic segmented dS: out[c,k] = Σ_{n: index[n]=c} h[n,k]·t[n,k] (out K × r, accumulation
// type), with the rows given in code-sorted order: perm (N) the rows of a stable sort of index by
// code, code (N) the sorted codes. Fixed chunks of the sorted rows write one partial per (chunk,
// code) pair to `workspace` (segment_workspace_rows(N, K) × r accumulation values), then each code
// sums its chunks in increasing order: no atomics, bitwise repeatable for a given shape and index,
// h ⊙ t never written. Codes no row uses get zeros; codes outside [0, K) are skipped.
int64_t segment_chunks(int64_t N);
int64_t segment_workspace_rows(int64_t N, int64_t K);
int segment_product(DType dtype, const void* h, const void* t, const int64_t* perm, const int64_t* code, int64_t N,
                    int64_t r, int64_t K, void* workspace, void* out, void* stream);

// The fused chain with h kept in shared memory (fp16/bf16 only):
//   Y(M,N) = ((X·B1) ⊙ s)·B2 + bias,  X (M,K1) row-major, B1 (K1,R), B2 (R,N), s float32 (R).
// B1(k,j) = B1[k*ldb1 + j] when b1_nmajor else B1[j*ldb1 + k]; likewise B2.
// Forward: X = x, B1 = Vhᵀ (b1_nmajor = false), B2 = Uᵀ (b2_nmajor = false).
// Input gradient: X = grad, B1 = U (true), B2 = Vh (true).
struct Fused {
  DType dtype = kBF16;
  int64_t M = 0, K1 = 0, R = 0, N = 0;
  const void* X = nullptr;
  int64_t ldx = 0;
  const void* B1 = nullptr;
  int64_t ldb1 = 0;
  bool b1_nmajor = false;
  const void* s = nullptr;
  const void* B2 = nullptr;
  int64_t ldb2 = 0;
  bool b2_nmajor = false;
  const void* bias = nullptr;
  void* Y = nullptr;
  int64_t ldy = 0;
};

// Whether run_fused should serve this problem on the current device. mode 0: never; 1: wherever it
// can run (fp16/bf16, sm_80+, non-empty, h of a row block fits in shared memory); -1 (auto): where
// it can run, its row blocks alone fill the GPU, and a measurement showed it faster than cuBLAS on
// this architecture (fused_measured_faster): nowhere yet.
bool fused_wanted(const Fused& f, int mode);
bool fused_measured_faster(int cc);
int run_fused(const Fused& f, void* stream);

const char* error_string(int code);

}  // namespace imse_cuda
