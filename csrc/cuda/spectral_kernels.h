// Launch interface of the CUDA kernels in spectral_kernels.cu. Plain C++: no torch and no CUDA
// headers, so the kernels compile without torch (fast nvcc) and the torch-facing code in
// spectral_ops.h compiles without nvcc. All matrices are dense with unit stride along one dim.
//
// Every function returns 0 on success, else an error code for error_string(): a cudaError_t value
// (launch failures) or one of the kErr* codes below (refused before any launch).
#pragma once

#include <cstdint>

namespace imse_cuda {

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// Accumulation ("acc") type of a dtype: float64 for kF64, float32 otherwise. The scale vectors and
// the ds partial sums are in the acc type.
inline DType acc_dtype(DType t) { return t == kF64 ? kF64 : kF32; }

enum RedMode : int {
  kRedNone = 0,
  kRedCols = 1,  // partial[mb][n] = sum over the rows m of block mb of C(m,n) * R(m,n)
  kRedRows = 2,  // partial[nb][m] = sum over the columns n of block nb of C(m,n) * R(m,n)
};

enum Error : int {
  kErrNeedSm80 = 10001,       // tensor-core path (fp16/bf16/tf32) on a GPU older than sm_80
  kErrTooLarge = 10002,       // a dimension the grid cannot cover
  kErrUnsupported = 10003,    // a layout or dtype combination this file does not instantiate
  kErrDevice = 10004,         // the device attributes could not be read
};

// C(M,N) = sum_k A(m,k)·scale_k[k]·B(k,n), in the acc type, then the epilogue:
//   C := C·scale_n[n] + bias[n] stored in dtype (when C is given),
//   the ds-style reductions of the *unscaled* C against R (when red != kRedNone).
// A(m,k) = A[m*lda + k] when a_kmajor, else A[k*lda + m];
// B(k,n) = B[k*ldb + n] when b_nmajor, else B[n*ldb + k]; R and C are row-major (ldr, ldc).
// Instantiated layouts: (a_kmajor, b_nmajor) = (1,0), (1,1), (0,1).
struct Gemm {
  DType dtype = kF32;
  bool tf32 = false;  // fp32 inputs through TF32 tensor cores (else exact fp32 FMA)
  int64_t M = 0, N = 0, K = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  bool a_kmajor = true;
  const void* B = nullptr;
  int64_t ldb = 0;
  bool b_nmajor = true;
  const void* scale_k = nullptr;  // acc type, K entries
  const void* scale_n = nullptr;  // acc type, N entries
  const void* bias = nullptr;     // dtype, N entries
  void* C = nullptr;
  int64_t ldc = 0;
  RedMode red = kRedNone;
  const void* R = nullptr;
  int64_t ldr = 0;
  void* partial = nullptr;  // acc type: [m_blocks][N] (kRedCols) or [n_blocks][M] (kRedRows)
};

struct GemmPlan {
  int kind = 0;  // internal: which kernel family and tile configuration
  int64_t m_blocks = 0, n_blocks = 0;
  // Rows of Gemm::partial that run_gemm writes (m_blocks for kRedCols, n_blocks for kRedRows).
  int64_t partial_rows(const Gemm& g) const { return g.red == kRedCols ? m_blocks : (g.red == kRedRows ? n_blocks : 0); }
};

int plan_gemm(const Gemm& g, GemmPlan* plan);
// Launches on `stream` (a cudaStream_t). M == 0 or N == 0 launches nothing.
int run_gemm(const Gemm& g, const GemmPlan& plan, void* stream);

// out[l] = sum_{b < blocks} partial[b*L + l], b in increasing order (deterministic); acc type.
int reduce_partials(DType acc, const void* partial, int64_t blocks, int64_t L, void* out, void* stream);

// The fused two-stage product with h kept in shared memory (fp16/bf16 only):
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

// Whether run_fused should be used for this problem on the current device: the dtype is fp16/bf16,
// h fits in shared memory, and (IMSE_CUDA_FUSED=auto, the default) there are enough row blocks to
// fill the GPU; IMSE_CUDA_FUSED=1 forces it wherever it can run, 0 disables it.
bool fused_wanted(const Fused& f);
int run_fused(const Fused& f, void* stream);

const char* error_string(int code);

}  // namespace imse_cuda
