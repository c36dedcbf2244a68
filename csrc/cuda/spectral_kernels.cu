// CUDA kernels of the spectral linear layer  y = ((x·Vhᵀ) ⊙ s)·Uᵀ + b  (see spectral_kernels.h).
//
// No torch headers here: nvcc compiles this file alone and quickly, and tests/test_cuda_build.py
// also compiles it with the host compiler against emu/cuda_emu.h (IMSE_EMU) to run every kernel on
// a CPU. Kernel families:
//   gemm_tc_kernel    WMMA tensor cores: fp16/bf16 (k=16) and TF32 (k=8), fp32 accumulation;
//   gemm_simt_kernel  exact fp32 / fp64 FMA;
//   fused_kernel      Y = ((X·B1) ⊙ s)·B2 + bias with the (rows × r) intermediate in shared memory;
//   reduce_kernel     fixed-order sum of per-block partials (deterministic ds, no atomics).
// Both GEMM families stream K in double-buffered shared-memory tiles (global loads of the next tile
// are issued into registers before the current one is multiplied), stage the accumulator tile in
// shared memory and share one epilogue: s scaling, bias, the store, and the ds reductions.
#ifdef IMSE_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

#include <cstdint>
#include <cstdlib>
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

// Tensor cores with bf16/tf32 WMMA need sm_80; older targets (never built by default) get a trap.
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
  static constexpr int vec = 4;  // elements per 16-byte vector
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};
template <> struct Num<double> {
  using acc = double;
  static constexpr int vec = 2;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};
template <> struct Num<__half> {
  using acc = float;
  static constexpr int vec = 8;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};
template <> struct Num<__nv_bfloat16> {
  using acc = float;
  static constexpr int vec = 8;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};

// WMMA operand type and k step per element type (fp32 runs as TF32).
template <typename T> struct Mma;
template <> struct Mma<__half> { using frag_t = __half; static constexpr int K = 16; static constexpr bool tf32 = false; };
template <> struct Mma<__nv_bfloat16> { using frag_t = __nv_bfloat16; static constexpr int K = 16; static constexpr bool tf32 = false; };
template <> struct Mma<float> { using frag_t = wmma::precision::tf32; static constexpr int K = 8; static constexpr bool tf32 = true; };

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
  using acc_t = typename Num<T>::acc;
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
          reg[it].v[e] = (row < nrows && col + e < ncols) ? src[row * ld + col + e] : Num<T>::from_acc(acc_t(0));
      }
    }
  }

  // Registers -> shared memory. With scale, the element at (row, col) is multiplied by
  // scale[row] (SCALE_ROWS) or scale[col] in the acc type; indices >= nscale hold zeros already.
  template <bool SCALE_ROWS>
  __device__ __forceinline__ void store(T* dst, const acc_t* __restrict__ scale, int nscale) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int slot = static_cast<int>(threadIdx.x) + it * NT;
      const int row = slot / (COLS / VEC), col = (slot % (COLS / VEC)) * VEC;
      Vec v = reg[it];
      if (scale != nullptr) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const int idx = SCALE_ROWS ? row : col + e;
          const acc_t sv = idx < nscale ? scale[idx] : acc_t(0);
          v.v[e] = Num<T>::from_acc(Num<T>::to_acc(v.v[e]) * sv);
        }
      }
      copy16(dst + row * LD + col, &v);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Epilogue, shared by every GEMM kernel: Cs holds the BM × BN accumulator tile (row stride CLD).

template <typename T>
struct GemmArgs {
  using acc_t = typename Num<T>::acc;
  int M, N, K;
  const T* A;
  int64_t lda;
  const T* B;
  int64_t ldb;
  const acc_t* scale_k;
  const acc_t* scale_n;
  const T* bias;
  T* C;
  int64_t ldc;
  int red;
  const T* R;
  int64_t ldr;
  acc_t* partial;
  bool vec_a, vec_b;
};

template <typename T, typename Acc, int BM, int BN, int NT, int CLD>
__device__ __forceinline__ void store_tile(Acc* Cs, int m0, int n0, int M, int N, T* C, int64_t ldc,
                                           const Acc* scale_n, const T* bias, int red, const T* R, int64_t ldr) {
  for (int idx = threadIdx.x; idx < BM * BN; idx += NT) {
    const int i = idx / BN, j = idx % BN, gm = m0 + i, gn = n0 + j;
    const bool ok = gm < M && gn < N;
    const Acc v = Cs[i * CLD + j];
    if (ok && C != nullptr) {
      Acc o = v;
      if (scale_n != nullptr) o *= scale_n[gn];
      if (bias != nullptr) o += Num<T>::to_acc(bias[gn]);
      C[gm * ldc + gn] = Num<T>::from_acc(o);
    }
    if (red != kRedNone) Cs[i * CLD + j] = ok ? v * Num<T>::to_acc(R[gm * ldr + gn]) : Acc(0);
  }
}

template <typename T, typename Acc, int BM, int BN, int NT, int CLD>
__device__ __forceinline__ void epilogue(const GemmArgs<T>& p, Acc* Cs, int m0, int n0) {
  store_tile<T, Acc, BM, BN, NT, CLD>(Cs, m0, n0, p.M, p.N, p.C, p.ldc, p.scale_n, p.bias, p.red, p.R, p.ldr);
  if (p.red == kRedCols) {
    __syncthreads();
    for (int j = threadIdx.x; j < BN; j += NT) {
      if (n0 + j < p.N) {
        Acc sum = 0;
        for (int i = 0; i < BM; ++i) sum += Cs[i * CLD + j];
        p.partial[static_cast<int64_t>(blockIdx.x) * p.N + n0 + j] = sum;
      }
    }
  } else if (p.red == kRedRows) {
    __syncthreads();
    for (int i = threadIdx.x; i < BM; i += NT) {
      if (m0 + i < p.M) {
        Acc sum = 0;
        for (int j = 0; j < BN; ++j) sum += Cs[i * CLD + j];
        p.partial[static_cast<int64_t>(blockIdx.y) * p.M + m0 + i] = sum;
      }
    }
  }
}

// The K loop of the GEMM kernels: A and B tiles go global → registers → shared memory (two stages,
// scale_k applied on the way in) while `mma(a_stage, b_stage)` consumes the other stage. It ends
// with a barrier, so the caller may reuse the shared memory afterwards.
template <bool A_KMAJ, bool B_NMAJ, int BK, class TA, class TB, typename T, class MmaFn>
__device__ __forceinline__ void gemm_mainloop(const GemmArgs<T>& p, int m0, int n0, T* As, T* Bs, MmaFn&& mma) {
  TA la;
  TB lb;
  auto load = [&](int k0) {
    if (A_KMAJ) la.load(p.A + m0 * p.lda + k0, p.lda, p.M - m0, p.K - k0, p.vec_a);
    else la.load(p.A + k0 * p.lda + m0, p.lda, p.K - k0, p.M - m0, p.vec_a);
    if (B_NMAJ) lb.load(p.B + k0 * p.ldb + n0, p.ldb, p.K - k0, p.N - n0, p.vec_b);
    else lb.load(p.B + n0 * p.ldb + k0, p.ldb, p.N - n0, p.K - k0, p.vec_b);
  };
  auto store = [&](int k0, int stage) {
    const auto* sk = p.scale_k != nullptr ? p.scale_k + k0 : nullptr;
    la.template store<!A_KMAJ>(As + stage * TA::ELEMS, sk, p.K - k0);
    lb.template store<false>(Bs + stage * TB::ELEMS, nullptr, 0);
  };

  const int ntiles = (p.K + BK - 1) / BK;
  if (ntiles > 0) {
    load(0);
    store(0, 0);
  }
  __syncthreads();
  for (int t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) load((t + 1) * BK);
    mma(As + (t & 1) * TA::ELEMS, Bs + (t & 1) * TB::ELEMS);
    if (t + 1 < ntiles) store((t + 1) * BK, (t + 1) & 1);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMM

template <int BM_, int BN_, int BK_, int WM_, int WN_>
struct TcCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, NT = WM_ * WN_ * 32;
  static constexpr int WTM = BM / WM, WTN = BN / WN, FM = WTM / 16, FN = WTN / 16;
  static constexpr int CLD = BN + 4;  // fp32 staging row stride (multiple of 4 floats for WMMA)
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile");
};
using TcBig = TcCfg<128, 128, 32, 2, 4>;   // 8 warps, 64 × 32 each
using TcSmall = TcCfg<64, 64, 32, 2, 2>;   // 4 warps, 32 × 32 each

template <typename T, bool A_KMAJ, bool B_NMAJ, class C>
struct TcLayout {
  using TA = std::conditional_t<A_KMAJ, Tile<T, C::BM, C::BK, C::NT>, Tile<T, C::BK, C::BM, C::NT>>;
  using TB = std::conditional_t<B_NMAJ, Tile<T, C::BK, C::BN, C::NT>, Tile<T, C::BN, C::BK, C::NT>>;
  static constexpr size_t tiles_bytes = 2 * (TA::ELEMS + TB::ELEMS) * sizeof(T);
  static constexpr size_t stage_bytes = static_cast<size_t>(C::BM) * C::CLD * sizeof(float);
  static constexpr size_t smem = tiles_bytes > stage_bytes ? tiles_bytes : stage_bytes;
};

// Multiply the shared-memory tiles a (BM×BK) and b (BK×BN) into the warp's accumulators.
template <typename T, bool A_KMAJ, bool B_NMAJ, class C, class TA, class TB, class AccFrag>
__device__ __forceinline__ void tc_tile_mma(const T* a, const T* b, int wm, int wn, AccFrag (&acc)[C::FM][C::FN]) {
#if IMSE_TC_AVAILABLE
  using FT = typename Mma<T>::frag_t;
  constexpr int MK = Mma<T>::K;
  using LA = std::conditional_t<A_KMAJ, wmma::row_major, wmma::col_major>;
  using LB = std::conditional_t<B_NMAJ, wmma::row_major, wmma::col_major>;
#pragma unroll
  for (int kk = 0; kk < C::BK; kk += MK) {
    wmma::fragment<wmma::matrix_a, 16, 16, MK, FT, LA> fa[C::FM];
    wmma::fragment<wmma::matrix_b, 16, 16, MK, FT, LB> fb[C::FN];
#pragma unroll
    for (int i = 0; i < C::FM; ++i) {
      const int m = wm * C::WTM + i * 16;
      wmma::load_matrix_sync(fa[i], A_KMAJ ? a + m * TA::LD + kk : a + kk * TA::LD + m, TA::LD);
      if constexpr (Mma<T>::tf32) {
#pragma unroll
        for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
      }
    }
#pragma unroll
    for (int j = 0; j < C::FN; ++j) {
      const int n = wn * C::WTN + j * 16;
      wmma::load_matrix_sync(fb[j], B_NMAJ ? b + kk * TB::LD + n : b + n * TB::LD + kk, TB::LD);
      if constexpr (Mma<T>::tf32) {
#pragma unroll
        for (int e = 0; e < fb[j].num_elements; ++e) fb[j].x[e] = wmma::__float_to_tf32(fb[j].x[e]);
      }
    }
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
#endif
}

// 16-bit inputs: at most 128 registers (two 8-warp blocks per SM, no spills per ptxas -v);
// TF32 keeps the compiler's choice (it would spill under that cap).
template <typename T, bool A_KMAJ, bool B_NMAJ, class C>
__global__ void __launch_bounds__(C::NT, sizeof(T) == 2 ? 2048 / C::NT / 4 : 1) gemm_tc_kernel(GemmArgs<T> p) {
#if IMSE_TC_AVAILABLE
  using L = TcLayout<T, A_KMAJ, B_NMAJ, C>;
  using TA = typename L::TA;
  using TB = typename L::TB;
  using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, Mma<T>::K, float>;
  IMSE_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + 2 * TA::ELEMS;
  float* Cs = reinterpret_cast<float*>(smem);  // reused after the main loop

  const int m0 = blockIdx.x * C::BM, n0 = blockIdx.y * C::BN;
  const int warp = threadIdx.x / 32, wm = warp / C::WN, wn = warp % C::WN;
  AccFrag acc[C::FM][C::FN];
#pragma unroll
  for (int i = 0; i < C::FM; ++i)
#pragma unroll
    for (int j = 0; j < C::FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  gemm_mainloop<A_KMAJ, B_NMAJ, C::BK, TA, TB>(p, m0, n0, As, Bs, [&](const T* a, const T* b) {
    tc_tile_mma<T, A_KMAJ, B_NMAJ, C, TA, TB>(a, b, wm, wn, acc);
  });
#pragma unroll
  for (int i = 0; i < C::FM; ++i)
#pragma unroll
    for (int j = 0; j < C::FN; ++j)
      wmma::store_matrix_sync(Cs + (wm * C::WTM + i * 16) * C::CLD + wn * C::WTN + j * 16, acc[i][j], C::CLD,
                              wmma::mem_row_major);
  __syncthreads();
  epilogue<T, float, C::BM, C::BN, C::NT, C::CLD>(p, Cs, m0, n0);
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Exact fp32 / fp64 GEMM: 64 × 64 tiles, 256 threads, 4 × 4 outputs per thread (strided by 16 so
// that shared-memory reads broadcast and the staging writes do not conflict).

struct SimtCfg {
  static constexpr int BM = 64, BN = 64, BK = 16, NT = 256, CLD = BN + 1;
};

template <typename T, bool A_KMAJ, bool B_NMAJ>
struct SimtLayout {
  using C = SimtCfg;
  using acc_t = typename Num<T>::acc;
  using TA = std::conditional_t<A_KMAJ, Tile<T, C::BM, C::BK, C::NT>, Tile<T, C::BK, C::BM, C::NT>>;
  using TB = std::conditional_t<B_NMAJ, Tile<T, C::BK, C::BN, C::NT>, Tile<T, C::BN, C::BK, C::NT>>;
  static constexpr size_t tiles_bytes = 2 * (TA::ELEMS + TB::ELEMS) * sizeof(T);
  static constexpr size_t stage_bytes = static_cast<size_t>(C::BM) * C::CLD * sizeof(acc_t);
  static constexpr size_t smem = tiles_bytes > stage_bytes ? tiles_bytes : stage_bytes;
};

template <typename T, bool A_KMAJ, bool B_NMAJ>
__global__ void __launch_bounds__(SimtCfg::NT) gemm_simt_kernel(GemmArgs<T> p) {
  using C = SimtCfg;
  using L = SimtLayout<T, A_KMAJ, B_NMAJ>;
  using TA = typename L::TA;
  using TB = typename L::TB;
  using acc_t = typename Num<T>::acc;
  IMSE_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + 2 * TA::ELEMS;
  acc_t* Cs = reinterpret_cast<acc_t*>(smem);

  const int m0 = blockIdx.x * C::BM, n0 = blockIdx.y * C::BN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0;

  gemm_mainloop<A_KMAJ, B_NMAJ, C::BK, TA, TB>(p, m0, n0, As, Bs, [&](const T* a, const T* b) {
#pragma unroll
    for (int kk = 0; kk < C::BK; ++kk) {
      acc_t av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = ty + 16 * i;
        av[i] = Num<T>::to_acc(A_KMAJ ? a[m * TA::LD + kk] : a[kk * TA::LD + m]);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = tx + 16 * j;
        bv[j] = Num<T>::to_acc(B_NMAJ ? b[kk * TB::LD + n] : b[n * TB::LD + kk]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  });
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * C::CLD + tx + 16 * j] = acc[i][j];
  __syncthreads();
  epilogue<T, acc_t, C::BM, C::BN, C::NT, C::CLD>(p, Cs, m0, n0);
}

// ---------------------------------------------------------------------------------------------
// Fused Y = ((X·B1) ⊙ s)·B2 + bias (fp16/bf16). One block owns FBM rows: phase 1 builds
// hs = (X·B1) ⊙ s for all R columns in shared memory (in chunks of FRC columns); phase 2 walks the
// output columns in FBN tiles, A operand straight from hs, B2 tiles streamed. Nothing of size
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
      lx.template store<false>(Xs + stage * TX::ELEMS, nullptr, 0);
      lb.template store<false>(B1s + stage * TB1::ELEMS, nullptr, 0);
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
      lb.template store<false>(B2s, nullptr, 0);
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
      if (t + 1 < ktiles) lb.template store<false>(B2s + ((t + 1) & 1) * TB2::ELEMS, nullptr, 0);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < C::FM; ++i)
#pragma unroll
      for (int j = 0; j < C::FN; ++j)
        wmma::store_matrix_sync(Cs + (wm * C::WTM + i * 16) * C::CLD + wn * C::WTN + j * 16, acc[i][j], C::CLD,
                                wmma::mem_row_major);
    __syncthreads();
    store_tile<T, float, C::BM, C::BN, C::NT, C::CLD>(Cs, m0, n0, p.M, p.N, p.Y, p.ldy, nullptr, p.bias, kRedNone,
                                                      nullptr, 0);
    __syncthreads();
  }
#else
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// Deterministic reduction of per-block partials.

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

// Environment knobs for tests: IMSE_CUDA_TILE=auto|big|small, IMSE_CUDA_FUSED=auto|1|0.
int env_choice(const char* name) {  // -1 auto, 0 off/small, 1 on/big
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return -1;
  if (std::strcmp(v, "0") == 0 || std::strcmp(v, "small") == 0 || std::strcmp(v, "off") == 0) return 0;
  return 1;
}

enum Kind : int { kSimt = 1, kTcBig = 2, kTcSmall = 3 };

bool aligned_for_vec(const void* ptr, int64_t ld, int elem_bytes) {
  const int vec = 16 / elem_bytes;
  return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % vec == 0;
}

template <typename T>
GemmArgs<T> make_args(const Gemm& g) {
  using acc_t = typename Num<T>::acc;
  GemmArgs<T> p;
  p.M = static_cast<int>(g.M);
  p.N = static_cast<int>(g.N);
  p.K = static_cast<int>(g.K);
  p.A = static_cast<const T*>(g.A);
  p.lda = g.lda;
  p.B = static_cast<const T*>(g.B);
  p.ldb = g.ldb;
  p.scale_k = static_cast<const acc_t*>(g.scale_k);
  p.scale_n = static_cast<const acc_t*>(g.scale_n);
  p.bias = static_cast<const T*>(g.bias);
  p.C = static_cast<T*>(g.C);
  p.ldc = g.ldc;
  p.red = g.red;
  p.R = static_cast<const T*>(g.R);
  p.ldr = g.ldr;
  p.partial = static_cast<acc_t*>(g.partial);
  p.vec_a = aligned_for_vec(g.A, g.lda, sizeof(T));
  p.vec_b = aligned_for_vec(g.B, g.ldb, sizeof(T));
  return p;
}

template <typename T, bool A_KMAJ, bool B_NMAJ>
int run_layout(const Gemm& g, const GemmPlan& plan, void* stream) {
  const GemmArgs<T> p = make_args<T>(g);
  const dim3 grid(static_cast<unsigned>(plan.m_blocks), static_cast<unsigned>(plan.n_blocks));
  if (plan.kind == kSimt) {
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
      return launch(gemm_simt_kernel<T, A_KMAJ, B_NMAJ>, grid, dim3(SimtCfg::NT), SimtLayout<T, A_KMAJ, B_NMAJ>::smem,
                    stream, p);
    }
    return kErrUnsupported;
  }
  if constexpr (!std::is_same<T, double>::value) {
    if (plan.kind == kTcBig)
      return launch(gemm_tc_kernel<T, A_KMAJ, B_NMAJ, TcBig>, grid, dim3(TcBig::NT),
                    TcLayout<T, A_KMAJ, B_NMAJ, TcBig>::smem, stream, p);
    return launch(gemm_tc_kernel<T, A_KMAJ, B_NMAJ, TcSmall>, grid, dim3(TcSmall::NT),
                  TcLayout<T, A_KMAJ, B_NMAJ, TcSmall>::smem, stream, p);
  }
  return kErrUnsupported;
}

template <typename T>
int run_typed(const Gemm& g, const GemmPlan& plan, void* stream) {
  if (g.a_kmajor && !g.b_nmajor) return run_layout<T, true, false>(g, plan, stream);
  if (g.a_kmajor && g.b_nmajor) return run_layout<T, true, true>(g, plan, stream);
  if (!g.a_kmajor && g.b_nmajor) return run_layout<T, false, true>(g, plan, stream);
  return kErrUnsupported;
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

constexpr int64_t kIntMax = 2147483647;

}  // namespace

int plan_gemm(const Gemm& g, GemmPlan* plan) {
  if (g.M < 0 || g.N < 0 || g.K < 0 || g.M > kIntMax || g.N > kIntMax || g.K > kIntMax) return kErrTooLarge;
  const bool tc = g.dtype == kF16 || g.dtype == kBF16 || (g.dtype == kF32 && g.tf32);
  int bm = 64, bn = 64;
  if (tc) {
    DeviceInfo dev;
    const int e = device_info(&dev);
    if (e != 0) return e;
    if (dev.cc < 80) return kErrNeedSm80;
    const int64_t big_blocks = ((g.M + 127) / 128) * ((g.N + 127) / 128);
    const int choice = env_choice("IMSE_CUDA_TILE");
    const bool big = choice == 1 || (choice == -1 && big_blocks >= dev.sms);
    plan->kind = big ? kTcBig : kTcSmall;
    bm = bn = big ? 128 : 64;
  } else {
    plan->kind = kSimt;
  }
  plan->m_blocks = (g.M + bm - 1) / bm;
  plan->n_blocks = (g.N + bn - 1) / bn;
  if (plan->n_blocks > 65535 || plan->m_blocks > kIntMax) return kErrTooLarge;
  return 0;
}

int run_gemm(const Gemm& g, const GemmPlan& plan, void* stream) {
  if (g.M == 0 || g.N == 0) return 0;
  switch (g.dtype) {
    case kF16: return run_typed<__half>(g, plan, stream);
    case kBF16: return run_typed<__nv_bfloat16>(g, plan, stream);
    case kF32: return run_typed<float>(g, plan, stream);
    case kF64: return run_typed<double>(g, plan, stream);
  }
  return kErrUnsupported;
}

int reduce_partials(DType acc, const void* partial, int64_t blocks, int64_t L, void* out, void* stream) {
  if (L == 0) return 0;
  const dim3 grid(static_cast<unsigned>((L + 255) / 256));
  if (acc == kF64) {
    ReduceArgs<double> p{static_cast<const double*>(partial), blocks, L, static_cast<double*>(out)};
    return launch(reduce_kernel<double>, grid, dim3(256), 0, stream, p);
  }
  ReduceArgs<float> p{static_cast<const float*>(partial), blocks, L, static_cast<float*>(out)};
  return launch(reduce_kernel<float>, grid, dim3(256), 0, stream, p);
}

bool fused_wanted(const Fused& f) {
  if (f.dtype != kF16 && f.dtype != kBF16) return false;
  if (f.b1_nmajor != f.b2_nmajor) return false;
  if (f.M <= 0 || f.N <= 0 || f.M > kIntMax || f.N > kIntMax || f.K1 > kIntMax || f.R > kIntMax) return false;
  const int choice = env_choice("IMSE_CUDA_FUSED");
  if (choice == 0) return false;
  DeviceInfo dev;
  if (device_info(&dev) != 0 || dev.cc < 80) return false;
  const size_t need = f.b1_nmajor ? FusedLayout<__half, true, true>::smem(f.R) : FusedLayout<__half, false, false>::smem(f.R);
  if (need > static_cast<size_t>(dev.smem_optin)) return false;
  if (choice == 1) return true;
  // auto: one block per FBM rows; only worth it when those blocks alone fill the GPU.
  return (f.M + FusedCfg::BM - 1) / FusedCfg::BM >= dev.sms;
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
    case kErrNeedSm80: return "the fp16/bf16/TF32 tensor-core kernels need a GPU of compute capability 8.0 or newer";
    case kErrTooLarge: return "a dimension is too large for the kernels' grid (rows < 2^31, columns < 65535 tiles)";
    case kErrUnsupported: return "internal: layout or dtype combination not instantiated";
    case kErrDevice: return "could not read the CUDA device attributes";
    default: return cudaGetErrorString(static_cast<cudaError_t>(code));
  }
}

}  // namespace imse_cuda
