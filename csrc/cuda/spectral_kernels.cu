// The custom CUDA kernels of the spectral linear layer (see spectral_kernels.h). Plain GEMMs are not
// here: they go to cuBLAS through ATen (spectral_ops.h). What is left fuses work cuBLAS cannot:
//   fused_kernel   Y = ((X·B1) ⊙ s)·B2 + bias with the (rows × r) intermediate in shared memory
//                  (fp16/bf16 WMMA, fp32 accumulation; docs/design.md §3, "the fused chain kernel");
//   colsum_kernel  per-row-block partials of Σ_n A[n,k]·B[n,k] (ds, no materialised product), and
//   reduce_kernel  their fixed-order sum: deterministic ds without float atomics (§3);
//   gather_scale_kernel   per-sample codes: hs[n] = h[n] ⊙ S[index[n]] in one pass (docs/design.md §8);
//   segment_partial_kernel / segment_reduce_kernel   per-sample codes: the deterministic segmented
//                  dS[k] = Σ_{n: index[n]=k} h_n ⊙ t_n over code-sorted rows, no float atomics (§8).
// No torch headers: nvcc compiles this file alone, and tests/gpu/test_cuda_build.py also compiles it with
// the host compiler against emu/cuda_emu.h (IMSE_EMU) to run every kernel on a CPU.
#ifdef IMSE_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "spectral_kernels.h"

namespace imse_cuda {
namespace {

using namespace nvcuda;

#ifdef IMSE_EMU
#define IMSE_SMEM(name) unsigned char* name = ::imse_emu_rt::g_dyn_smem
#else
#define IMSE_SMEM(name) extern __shared__ __align__(256) unsigned char name[]
#endif

// bf16 WMMA needs sm_80; older targets (never built by default) get a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define IMSE_TC_AVAILABLE 0
#else
#define IMSE_TC_AVAILABLE 1
#endif

// ---------------------------------------------------------------------------------------------
// Element types

template <typename T> struct Num;
template <> struct Num<float> {
  using acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <> struct Num<double> {
  using acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <> struct Num<__half> {
  using acc = float;
  static constexpr int vec = 8;  // elements per 16-byte vector
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  using acc = float;
  static constexpr int vec = 8;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ void copy16(void* dst, const void* src) {
#ifdef IMSE_EMU
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16) __builtin_trap();
  std::memcpy(dst, src, 16);
#else
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// ---------------------------------------------------------------------------------------------
// A ROWS × COLS tile whose COLS run along contiguous global memory, staged through registers
// (NT threads, ITERS 16-byte vectors each) into shared memory with row stride LD = COLS + one vector
// of padding (keeps every 8th row 32-byte aligned for WMMA and spreads banks).

template <typename T, int ROWS, int COLS, int NT>
struct Tile {
  static constexpr int VEC = Num<T>::vec;
  static constexpr int LD = COLS + VEC;
  static constexpr int ELEMS = ROWS * LD;
  static constexpr int SLOTS = ROWS * COLS / VEC;
  static_assert(COLS % VEC == 0 && SLOTS % NT == 0, "tile shape does not divide among the threads");
  static constexpr int ITERS = SLOTS / NT;
  struct alignas(16) Vec { T v[VEC]; };
  Vec reg[ITERS];

  // Global -> registers. src points at the tile origin; rows >= nrows and columns >= ncols read as
  // zero and are never touched. vec_ok: src and ld allow 16-byte loads.
  __device__ __forceinline__ void load(const T* __restrict__ src, int64_t ld, int nrows, int ncols, bool vec_ok) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int slot = static_cast<int>(threadIdx.x) + it * NT;
      const int row = slot / (COLS / VEC), col = (slot % (COLS / VEC)) * VEC;
      if (row < nrows && vec_ok && col + VEC <= ncols) {
        copy16(&reg[it], src + row * ld + col);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          reg[it].v[e] = (row < nrows && col + e < ncols) ? src[row * ld + col + e] : Num<T>::from_acc(0.0f);
      }
    }
  }

  // Registers -> shared memory.
  __device__ __forceinline__ void store(T* dst) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int slot = static_cast<int>(threadIdx.x) + it * NT;
      copy16(dst + (slot / (COLS / VEC)) * LD + (slot % (COLS / VEC)) * VEC, &reg[it]);
    }
  }
};

// Cs holds a BM × BN fp32 accumulator tile (row stride CLD): C[m0.., n0..] = Cs + bias, in bounds.
template <typename T, int BM, int BN, int NT, int CLD>
__device__ __forceinline__ void store_tile(const float* Cs, int m0, int n0, int M, int N, T* C, int64_t ldc,
                                           const T* bias) {
  for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
    const int i = idx / BN, j = idx % BN, gm = m0 + i, gn = n0 + j;
    if (gm < M && gn < N) {
      const float o = Cs[i * CLD + j] + (bias != nullptr ? Num<T>::to_acc(bias[gn]) : 0.0f);
      C[gm * ldc + gn] = Num<T>::from_acc(o);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fused Y = ((X·B1) ⊙ s)·B2 + bias (fp16/bf16). One block owns BM rows: phase 1 builds
// hs = (X·B1) ⊙ s for all R columns in shared memory (in chunks of RC columns); phase 2 walks the
// output columns in BN tiles, A operand straight from hs, B2 tiles streamed. Nothing of size
// (M × R) touches global memory.

struct FusedCfg {
  static constexpr int BM = 64, RC = 128, BN = 128, BK = 32, WM = 2, WN = 4, NT = 256;
  static constexpr int WTM = BM / WM, WTN = 128 / WN, FM = WTM / 16, FN = WTN / 16;  // 32 × 32 per warp
  static constexpr int CLD = 128 + 4;
};

template <typename T>
struct FusedArgs {
  int M, K1, R, N;
  const T* X;
  int64_t ldx;
  const T* B1;
  int64_t ldb1;
  const float* s;
  const T* B2;
  int64_t ldb2;
  const T* bias;
  T* Y;
  int64_t ldy;
  bool vec_x, vec_b1, vec_b2;
};

template <typename T, bool B1_NMAJ, bool B2_NMAJ>
struct FusedLayout {
  using C = FusedCfg;
  using TX = Tile<T, C::BM, C::BK, C::NT>;
  using TB1 = std::conditional_t<B1_NMAJ, Tile<T, C::BK, C::RC, C::NT>, Tile<T, C::RC, C::BK, C::NT>>;
  using TB2 = std::conditional_t<B2_NMAJ, Tile<T, C::BK, C::BN, C::NT>, Tile<T, C::BN, C::BK, C::NT>>;
  static constexpr size_t p1_bytes = 2 * (TX::ELEMS + TB1::ELEMS) * sizeof(T);
  static constexpr size_t p2_bytes = 2 * TB2::ELEMS * sizeof(T);
  static constexpr size_t stage_bytes = static_cast<size_t>(C::BM) * C::CLD * sizeof(float);
  static constexpr size_t work_bytes =
      p1_bytes > p2_bytes ? (p1_bytes > stage_bytes ? p1_bytes : stage_bytes) : (p2_bytes > stage_bytes ? p2_bytes : stage_bytes);
  // hs row stride: R rounded up to the chunk width, plus one vector of padding.
  __host__ __device__ static int64_t hld(int64_t R) { return (R + C::RC - 1) / C::RC * C::RC + Num<T>::vec; }
  __host__ __device__ static size_t smem(int64_t R) { return static_cast<size_t>(C::BM) * hld(R) * sizeof(T) + work_bytes; }
};

template <typename T, bool B1_NMAJ, bool B2_NMAJ>
__global__ void __launch_bounds__(FusedCfg::NT) fused_kernel(FusedArgs<T> p) {
#if IMSE_TC_AVAILABLE
  using C = FusedCfg;
  using L = FusedLayout<T, B1_NMAJ, B2_NMAJ>;
  using TX = typename L::TX;
  using TB1 = typename L::TB1;
  using TB2 = typename L::TB2;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using LB1 = std::conditional_t<B1_NMAJ, wmma::row_major, wmma::col_major>;
  using LB2 = std::conditional_t<B2_NMAJ, wmma::row_major, wmma::col_major>;
  IMSE_SMEM(smem);
  const int HLD = static_cast<int>(L::hld(p.R));
  T* hs = reinterpret_cast<T*>(smem);
  unsigned char* work = smem + static_cast<size_t>(C::BM) * HLD * sizeof(T);
  T* Xs = reinterpret_cast<T*>(work);
  T* B1s = Xs + 2 * TX::ELEMS;
  T* B2s = reinterpret_cast<T*>(work);
  float* Cs = reinterpret_cast<float*>(work);

  const int m0 = blockIdx.x * C::BM;
  const int warp = threadIdx.x / 32, wm = warp / C::WN, wn = warp % C::WN;
  const int rows = p.M - m0;

  // Phase 1: hs[:, c0:c0+RC] = (X[m0:m0+BM, :] · B1[:, c0:c0+RC]) ⊙ s, zero beyond R.
  for (int c0 = 0; c0 < p.R; c0 += C::RC) {
    AccFrag acc[C::FM][C::FN];
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    TX lx;
    TB1 lb;
    auto load = [&](int k0) {
      lx.load(p.X + m0 * p.ldx + k0, p.ldx, rows, p.K1 - k0, p.vec_x);
      if (B1_NMAJ) lb.load(p.B1 + k0 * p.ldb1 + c0, p.ldb1, p.K1 - k0, p.R - c0, p.vec_b1);
      else lb.load(p.B1 + c0 * p.ldb1 + k0, p.ldb1, p.R - c0, p.K1 - k0, p.vec_b1);
    };
    auto store = [&](int stage) {
      lx.store(Xs + stage * TX::ELEMS);
      lb.store(B1s + stage * TB1::ELEMS);
    };
    const int ntiles = (p.K1 + C::BK - 1) / C::BK;
    if (ntiles > 0) {
      load(0);
      store(0);
    }
    __syncthreads();
    for (int t = 0; t < ntiles; ++t) {
      if (t + 1 < ntiles) load((t + 1) * C::BK);
      const T* xa = Xs + (t & 1) * TX::ELEMS;
      const T* bb = B1s + (t & 1) * TB1::ELEMS;
#pragma unroll
      for (int kk = 0; kk < C::BK; kk += 16) {
        FragA fa[C::FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB1> fb[C::FN];
#pragma unroll
        for (int i = 0; i < C::FM; ++i) wmma::load_matrix_sync(fa[i], xa + (wm * C::WTM + i * 16) * TX::LD + kk, TX::LD);
#pragma unroll
        for (int j = 0; j < C::FN; ++j) {
          const int n = wn * C::WTN + j * 16;
          wmma::load_matrix_sync(fb[j], B1_NMAJ ? bb + kk * TB1::LD + n : bb + n * TB1::LD + kk, TB1::LD);
        }
#pragma unroll
        for (int i = 0; i < C::FM; ++i)
#pragma unroll
          for (int j = 0; j < C::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      if (t + 1 < ntiles) store((t + 1) & 1);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j)
        wmma::store_matrix_sync(Cs + (wm * C::WTM + i * 16) * C::CLD + wn * C::WTN + j * 16, acc[i][j], C::CLD,
                                wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < C::BM * C::RC; idx += C::NT) {
      const int i = idx / C::RC, j = idx % C::RC, r = c0 + j;
      const float v = r < p.R ? Cs[i * C::CLD + j] * p.s[r] : 0.0f;
      hs[i * HLD + r] = Num<T>::from_acc(v);
    }
    __syncthreads();
  }

  // Phase 2: Y[m0:m0+BM, n0:n0+BN] = hs · B2[:, n0:n0+BN] + bias, over the R rounded up to BK.
  const int ktiles = (p.R + C::BK - 1) / C::BK;
  for (int n0 = blockIdx.y * C::BN; n0 < p.N; n0 += gridDim.y * C::BN) {
    AccFrag acc[C::FM][C::FN];
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    TB2 lb;
    auto load = [&](int k0) {
      if (B2_NMAJ) lb.load(p.B2 + k0 * p.ldb2 + n0, p.ldb2, p.R - k0, p.N - n0, p.vec_b2);
      else lb.load(p.B2 + n0 * p.ldb2 + k0, p.ldb2, p.N - n0, p.R - k0, p.vec_b2);
    };
    if (ktiles > 0) {
      load(0);
      lb.store(B2s);
    }
    __syncthreads();
    for (int t = 0; t < ktiles; ++t) {
      if (t + 1 < ktiles) load((t + 1) * C::BK);
      const T* bb = B2s + (t & 1) * TB2::ELEMS;
#pragma unroll
      for (int kk = 0; kk < C::BK; kk += 16) {
        FragA fa[C::FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB2> fb[C::FN];
#pragma unroll
        for (int i = 0; i < C::FM; ++i)
          wmma::load_matrix_sync(fa[i], hs + (wm * C::WTM + i * 16) * HLD + t * C::BK + kk, HLD);
#pragma unroll
        for (int j = 0; j < C::FN; ++j) {
          const int n = wn * C::WTN + j * 16;
          wmma::load_matrix_sync(fb[j], B2_NMAJ ? bb + kk * TB2::LD + n : bb + n * TB2::LD + kk, TB2::LD);
        }
#pragma unroll
        for (int i = 0; i < C::FM; ++i)
#pragma unroll
          for (int j = 0; j < C::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      if (t + 1 < ktiles) lb.store(B2s + ((t + 1) & 1) * TB2::ELEMS);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j)
        wmma::store_matrix_sync(Cs + (wm * C::WTM + i * 16) * C::CLD + wn * C::WTN + j * 16, acc[i][j], C::CLD,
                                wmma::mem_row_major);
    __syncthreads();
    store_tile<T, C::BM, C::BN, C::NT, C::CLD>(Cs, m0, n0, p.M, p.N, p.Y, p.ldy, p.bias);
    __syncthreads();
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Deterministic ds: colsum_kernel writes partial[b][k] = Σ_{n in row block b} A[n,k]·B[n,k]
// (kColRows rows per block; 32 columns × 8 row lanes per block, lanes summed in order), then
// reduce_kernel sums the blocks in increasing order. The order depends on the shape only.

constexpr int kColCols = 32, kColLanes = 8, kColThreads = kColCols * kColLanes;
constexpr int64_t kColRows = 256;

template <typename T>
struct ColsumArgs {
  const T* A;
  const T* B;
  int64_t M, L;
  typename Num<T>::acc* partial;
};

template <typename T>
__global__ void __launch_bounds__(kColThreads) colsum_kernel(ColsumArgs<T> p) {
  using acc_t = typename Num<T>::acc;
  IMSE_SMEM(smem);
  acc_t* lanes = reinterpret_cast<acc_t*>(smem);
  const int tx = threadIdx.x % kColCols, ty = threadIdx.x / kColCols;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kColCols + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kColRows;
  const int64_t m1 = p.M - m0 < kColRows ? p.M : m0 + kColRows;
  acc_t sum = 0;
  if (k < p.L)
    for (int64_t n = m0 + ty; n < m1; n += kColLanes) sum += Num<T>::to_acc(p.A[n * p.L + k]) * Num<T>::to_acc(p.B[n * p.L + k]);
  lanes[ty * kColCols + tx] = sum;
  __syncthreads();
  if (ty == 0 && k < p.L) {
    acc_t total = 0;
    for (int i = 0; i < kColLanes; ++i) total += lanes[i * kColCols + tx];
    p.partial[static_cast<int64_t>(blockIdx.x) * p.L + k] = total;
  }
}

template <typename Acc>
struct ReduceArgs {
  const Acc* partial;
  int64_t blocks, L;
  Acc* out;
};

template <typename Acc>
__global__ void __launch_bounds__(256) reduce_kernel(ReduceArgs<Acc> p) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (l < p.L) {
    Acc sum = 0;
    for (int64_t b = 0; b < p.blocks; ++b) sum += p.partial[b * p.L + l];
    p.out[l] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Per-sample codes (docs/design.md §8): row n of h uses row index[n] of the (K × r) code table S.
//
// gather_scale_kernel: out[n,k] = h[n,k]·S[index[n],k] in the accumulation type, rounded once to T.
// One warp per row (lanes stride over the r columns, so every access is coalesced and index[n] is
// read once per lane), rows in a grid-stride loop. A code outside [0, K) (the Python op rejects
// those) never reads outside S: its row comes out NaN.

constexpr int kGatherThreads = 256, kGatherRowsPerBlock = kGatherThreads / 32;
constexpr int64_t kGatherMaxBlocks = 8192;

template <typename T>
struct GatherArgs {
  const T* h;
  const typename Num<T>::acc* S;
  const int64_t* index;
  int64_t N, r, K;
  T* out;
};

template <typename T>
__global__ void __launch_bounds__(kGatherThreads) gather_scale_kernel(GatherArgs<T> p) {
  using acc_t = typename Num<T>::acc;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kGatherRowsPerBlock + warp; n < p.N;
       n += static_cast<int64_t>(gridDim.x) * kGatherRowsPerBlock) {
    const int64_t c = p.index[n];
    const bool valid = c >= 0 && c < p.K;
    const acc_t* sc = p.S + (valid ? c : 0) * p.r;
    for (int64_t k = lane; k < p.r; k += 32) {
      const acc_t v = valid ? Num<T>::to_acc(p.h[n * p.r + k]) * sc[k] : static_cast<acc_t>(NAN);
      p.out[n * p.r + k] = Num<T>::from_acc(v);
    }
  }
}

// Deterministic segmented dS. The rows are taken in code-sorted order (a stable sort, so the order
// is a function of `index` alone): position i of that order is row perm[i], of code code[i]
// (non-decreasing). segment_partial_kernel cuts the positions into fixed chunks of kSegRows; the
// thread of (chunk j, column k) walks its chunk in order and writes one partial sum of h ⊙ t per
// code it meets, at partial[(j + c)·r + k]: along the sorted order neither j nor c decreases, so
// distinct (chunk, code) pairs have distinct j + c, and the table has (chunks + K − 1) rows, the
// product h ⊙ t is never written. segment_reduce_kernel then sums, for each code c and column k, the
// partials of c's chunks in increasing chunk order (c's segment is found by binary search in code);
// codes no row uses get zeros. No atomics: the result depends on the shape and `index` only.
// Codes outside [0, K) are skipped (never written out of bounds).

constexpr int kSegCols = 32, kSegLanes = 8, kSegThreads = kSegCols * kSegLanes;
constexpr int64_t kSegRows = 64;
constexpr int kSegReduceThreads = 256;
constexpr int64_t kSegReduceMaxBlocks = 8192;

template <typename T>
struct SegPartialArgs {
  const T* h;
  const T* t;
  const int64_t* perm;
  const int64_t* code;
  int64_t N, r, K, chunks;
  typename Num<T>::acc* partial;
};

template <typename T>
__global__ void __launch_bounds__(kSegThreads) segment_partial_kernel(SegPartialArgs<T> p) {
  using acc_t = typename Num<T>::acc;
  const int tx = threadIdx.x % kSegCols, ty = threadIdx.x / kSegCols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSegLanes + ty;
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kSegCols + tx;
  if (j >= p.chunks || k >= p.r) return;
  const int64_t i0 = j * kSegRows, i1 = p.N - i0 < kSegRows ? p.N : i0 + kSegRows;
  int64_t cur = p.code[i0];
  acc_t sum = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t c = p.code[i];
    if (c != cur) {
      if (cur >= 0 && cur < p.K) p.partial[(j + cur) * p.r + k] = sum;
      cur = c;
      sum = 0;
    }
    const int64_t n = p.perm[i];
    sum += Num<T>::to_acc(p.h[n * p.r + k]) * Num<T>::to_acc(p.t[n * p.r + k]);
  }
  if (cur >= 0 && cur < p.K) p.partial[(j + cur) * p.r + k] = sum;
}

// First position i in [0, N) with code[i] >= c (N when none).
__device__ __forceinline__ int64_t lower_bound(const int64_t* code, int64_t N, int64_t c) {
  int64_t lo = 0, hi = N;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (code[mid] < c) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

template <typename Acc>
struct SegReduceArgs {
  const Acc* partial;
  const int64_t* code;
  int64_t N, r, K;
  Acc* out;
};

template <typename Acc>
__global__ void __launch_bounds__(kSegReduceThreads) segment_reduce_kernel(SegReduceArgs<Acc> p) {
  const int64_t total = p.K * p.r;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kSegReduceThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kSegReduceThreads) {
    const int64_t c = idx / p.r, k = idx % p.r;
    const int64_t s = lower_bound(p.code, p.N, c), e = lower_bound(p.code, p.N, c + 1);
    Acc sum = 0;
    if (s < e)
      for (int64_t j = s / kSegRows; j <= (e - 1) / kSegRows; ++j) sum += p.partial[(j + c) * p.r + k];
    p.out[idx] = sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename P>
int launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem, void* stream, const P& params) {
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
  }
#ifdef IMSE_EMU
  (void)stream;
  return static_cast<int>(::imse_emu_rt::launch(kernel, grid, block, smem, params));
#else
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(params);
  return static_cast<int>(cudaGetLastError());
#endif
}

struct DeviceInfo {
  int sms = 0, cc = 0, smem_optin = 0;
};

int device_info(DeviceInfo* info) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return static_cast<int>(e);
#ifndef IMSE_EMU
  // Cached per device (the emulator reads its environment every time, for the tests).
  static DeviceInfo cache[64];
  if (dev >= 0 && dev < 64 && cache[dev].sms > 0) {
    *info = cache[dev];
    return 0;
  }
#endif
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return kErrDevice;
  info->cc = major * 10 + minor;
#ifndef IMSE_EMU
  if (dev >= 0 && dev < 64) cache[dev] = *info;
#endif
  return 0;
}

bool aligned_for_vec(const void* ptr, int64_t ld, int elem_bytes) {
  const int vec = 16 / elem_bytes;
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % vec == 0;
}

template <typename T, bool B1_NMAJ, bool B2_NMAJ>
int run_fused_layout(const Fused& f, void* stream) {
  FusedArgs<T> p;
  p.M = static_cast<int>(f.M);
  p.K1 = static_cast<int>(f.K1);
  p.R = static_cast<int>(f.R);
  p.N = static_cast<int>(f.N);
  p.X = static_cast<const T*>(f.X);
  p.ldx = f.ldx;
  p.B1 = static_cast<const T*>(f.B1);
  p.ldb1 = f.ldb1;
  p.s = static_cast<const float*>(f.s);
  p.B2 = static_cast<const T*>(f.B2);
  p.ldb2 = f.ldb2;
  p.bias = static_cast<const T*>(f.bias);
  p.Y = static_cast<T*>(f.Y);
  p.ldy = f.ldy;
  p.vec_x = aligned_for_vec(f.X, f.ldx, sizeof(T));
  p.vec_b1 = aligned_for_vec(f.B1, f.ldb1, sizeof(T));
  p.vec_b2 = aligned_for_vec(f.B2, f.ldb2, sizeof(T));
  const dim3 grid(static_cast<unsigned>((f.M + FusedCfg::BM - 1) / FusedCfg::BM), 1);
  return launch(fused_kernel<T, B1_NMAJ, B2_NMAJ>, grid, dim3(FusedCfg::NT), FusedLayout<T, B1_NMAJ, B2_NMAJ>::smem(f.R),
                stream, p);
}

template <typename T>
int run_fused_typed(const Fused& f, void* stream) {
  if (!f.b1_nmajor && !f.b2_nmajor) return run_fused_layout<T, false, false>(f, stream);
  if (f.b1_nmajor && f.b2_nmajor) return run_fused_layout<T, true, true>(f, stream);
  return kErrUnsupported;
}

template <typename T>
int colsum_typed(const void* A, const void* B, int64_t M, int64_t L, void* workspace, void* out, void* stream) {
  using acc_t = typename Num<T>::acc;
  const int64_t blocks = colsum_blocks(M);
  if (blocks > 0) {
    const ColsumArgs<T> p{static_cast<const T*>(A), static_cast<const T*>(B), M, L, static_cast<acc_t*>(workspace)};
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>((L + kColCols - 1) / kColCols));
    const int e = launch(colsum_kernel<T>, grid, dim3(kColThreads), kColThreads * sizeof(acc_t), stream, p);
    if (e != 0) return e;
  }
  const ReduceArgs<acc_t> r{static_cast<const acc_t*>(workspace), blocks, L, static_cast<acc_t*>(out)};
  return launch(reduce_kernel<acc_t>, dim3(static_cast<unsigned>((L + 255) / 256)), dim3(256), 0, stream, r);
}

template <typename T>
int gather_scale_typed(const void* h, const void* S, const int64_t* index, int64_t N, int64_t r, int64_t K, void* out,
                       void* stream) {
  const GatherArgs<T> p{static_cast<const T*>(h), static_cast<const typename Num<T>::acc*>(S), index, N, r, K,
                        static_cast<T*>(out)};
  const int64_t want = (N + kGatherRowsPerBlock - 1) / kGatherRowsPerBlock;
  const int64_t blocks = want < kGatherMaxBlocks ? want : kGatherMaxBlocks;
  return launch(gather_scale_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kGatherThreads), 0, stream, p);
}

template <typename T>
int segment_typed(const void* h, const void* t, const int64_t* perm, const int64_t* code, int64_t N, int64_t r,
                  int64_t K, void* workspace, void* out, void* stream) {
  using acc_t = typename Num<T>::acc;
  const int64_t chunks = segment_chunks(N);
  if (chunks > 0) {
    const SegPartialArgs<T> p{static_cast<const T*>(h), static_cast<const T*>(t), perm, code, N, r, K, chunks,
                              static_cast<acc_t*>(workspace)};
    const dim3 grid(static_cast<unsigned>((chunks + kSegLanes - 1) / kSegLanes),
                    static_cast<unsigned>((r + kSegCols - 1) / kSegCols));
    const int e = launch(segment_partial_kernel<T>, grid, dim3(kSegThreads), 0, stream, p);
    if (e != 0) return e;
  }
  const SegReduceArgs<acc_t> q{static_cast<const acc_t*>(workspace), code, N, r, K, static_cast<acc_t*>(out)};
  const int64_t want = (K * r + kSegReduceThreads - 1) / kSegReduceThreads;
  const int64_t blocks = want < kSegReduceMaxBlocks ? want : kSegReduceMaxBlocks;
  return launch(segment_reduce_kernel<acc_t>, dim3(static_cast<unsigned>(blocks)), dim3(kSegReduceThreads), 0, stream,
                q);
}

constexpr int64_t kIntMax = 2147483647;

}  // namespace

int64_t colsum_blocks(int64_t M) { return (M + kColRows - 1) / kColRows; }

int colsum_product(DType dtype, const void* A, const void* B, int64_t M, int64_t L, void* workspace, void* out,
                   void* stream) {
  if (L == 0) return 0;
  if (M < 0 || L < 0 || colsum_blocks(M) > kIntMax || (L + kColCols - 1) / kColCols > 65535) return kErrTooLarge;
  switch (dtype) {
    case kF16: return colsum_typed<__half>(A, B, M, L, workspace, out, stream);
    case kBF16: return colsum_typed<__nv_bfloat16>(A, B, M, L, workspace, out, stream);
    case kF32: return colsum_typed<float>(A, B, M, L, workspace, out, stream);
    case kF64: return colsum_typed<double>(A, B, M, L, workspace, out, stream);
  }
  return kErrUnsupported;
}

int64_t segment_chunks(int64_t N) { return (N + kSegRows - 1) / kSegRows; }

int64_t segment_workspace_rows(int64_t N, int64_t K) {
  const int64_t chunks = segment_chunks(N);
  return chunks > 0 && K > 0 ? chunks + K - 1 : 0;
}

int gather_scale(DType dtype, const void* h, const void* S, const int64_t* index, int64_t N, int64_t r, int64_t K,
                 void* out, void* stream) {
  if (N == 0 || r == 0) return 0;
  if (N < 0 || r < 0 || K < 0) return kErrTooLarge;
  switch (dtype) {
    case kF16: return gather_scale_typed<__half>(h, S, index, N, r, K, out, stream);
    case kBF16: return gather_scale_typed<__nv_bfloat16>(h, S, index, N, r, K, out, stream);
    case kF32: return gather_scale_typed<float>(h, S, index, N, r, K, out, stream);
    case kF64: return gather_scale_typed<double>(h, S, index, N, r, K, out, stream);
  }
  return kErrUnsupported;
}

int segment_product(DType dtype, const void* h, const void* t, const int64_t* perm, const int64_t* code, int64_t N,
                    int64_t r, int64_t K, void* workspace, void* out, void* stream) {
  if (K == 0 || r == 0) return 0;
  if (N < 0 || r < 0 || K < 0 || (segment_chunks(N) + kSegLanes - 1) / kSegLanes > kIntMax ||
      (r + kSegCols - 1) / kSegCols > 65535 || K > INT64_MAX / r)
    return kErrTooLarge;
  switch (dtype) {
    case kF16: return segment_typed<__half>(h, t, perm, code, N, r, K, workspace, out, stream);
    case kBF16: return segment_typed<__nv_bfloat16>(h, t, perm, code, N, r, K, workspace, out, stream);
    case kF32: return segment_typed<float>(h, t, perm, code, N, r, K, workspace, out, stream);
    case kF64: return segment_typed<double>(h, t, perm, code, N, r, K, workspace, out, stream);
  }
  return kErrUnsupported;
}

// The architectures on which the fused chain was measured faster than cuBLAS's two GEMMs: `auto` uses
// it only there. None yet: no GPU has run it, and on sm_90 it needs 133 KB of shared memory at
// r = 768 (one block per SM), likely slower than cuBLAS (docs/design.md §10). IMSE_CUDA_FUSED=1 or
// cuda_fused_kernels(True) still run it wherever it can run.
bool fused_measured_faster(int cc) {
  (void)cc;
  return false;
}

bool fused_wanted(const Fused& f, int mode) {
  if (mode == 0 || (f.dtype != kF16 && f.dtype != kBF16) || f.b1_nmajor != f.b2_nmajor) return false;
  if (f.M <= 0 || f.N <= 0 || f.K1 <= 0 || f.R <= 0 || f.M > kIntMax || f.N > kIntMax || f.K1 > kIntMax ||
      f.R > kIntMax)
    return false;
  DeviceInfo dev;
  if (device_info(&dev) != 0 || dev.cc < 80) return false;
  const size_t need = f.b1_nmajor ? FusedLayout<__half, true, true>::smem(f.R) : FusedLayout<__half, false, false>::smem(f.R);
  if (need > static_cast<size_t>(dev.smem_optin)) return false;
  // auto: one block per FusedCfg::BM rows; only worth it where measured faster and when those blocks
  // alone fill the GPU.
  return mode == 1 || (fused_measured_faster(dev.cc) && (f.M + FusedCfg::BM - 1) / FusedCfg::BM >= dev.sms);
}

int run_fused(const Fused& f, void* stream) {
  if (f.M == 0 || f.N == 0) return 0;
  if (f.M > kIntMax || f.N > kIntMax || f.K1 > kIntMax || f.R > kIntMax) return kErrTooLarge;
  DeviceInfo dev;
  const int e = device_info(&dev);
  if (e != 0) return e;
  if (dev.cc < 80) return kErrNeedSm80;
  if (f.dtype == kF16) return run_fused_typed<__half>(f, stream);
  if (f.dtype == kBF16) return run_fused_typed<__nv_bfloat16>(f, stream);
  return kErrUnsupported;
}

const char* error_string(int code) {
  switch (code) {
    case 0: return "no error";
    case kErrNeedSm80: return "the fused fp16/bf16 kernel needs a GPU of compute capability 8.0 or newer";
    case kErrTooLarge: return "a dimension is too large for the kernels' grid";
    case kErrUnsupported: return "internal: layout or dtype combination not instantiated";
    case kErrDevice: return "could not read the CUDA device attributes";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // namespace imse_cuda
