// Host emulation of the small CUDA subset that csrc/cuda/spectral_kernels.cu uses, so that the
// kernels (and their launchers) run on a CPU, under the normal host compiler and AddressSanitizer.
// It is a test instrument, not a backend: blocks run one after another, the threads of a block are
// real std::threads meeting at __syncthreads barriers, dynamic shared memory is filled with NaN
// bytes (0xFF) before every block, and the WMMA calls check the API's alignment rules (256-bit
// aligned pointers, ldm a multiple of 16 bytes) and give every lane the whole fragment.
//
// Compiled only when IMSE_EMU is defined (tests/gpu/test_cuda_build.py builds it); never by setup.py.
#pragma once

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace imse_emu_rt {

// ---------------------------------------------------------------------------------------------
// Runtime API subset

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9,
                   cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlock = 8, cudaDevAttrMultiProcessorCount = 16,
                      cudaDevAttrComputeCapabilityMajor = 75, cudaDevAttrComputeCapabilityMinor = 76,
                      cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "unspecified launch failure (emulated)";
  }
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return (v && *v) ? std::atoi(v) : fallback;
}

// The emulated device: IMSE_EMU_SMS multiprocessors (default 4, so that small test shapes reach the
// "many blocks" code paths), compute capability IMSE_EMU_CC (default 90), H200 shared memory limits.
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int /*device*/) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = env_int("IMSE_EMU_SMS", 4); return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = env_int("IMSE_EMU_CC", 90) / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = env_int("IMSE_EMU_CC", 90) % 10; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = env_int("IMSE_EMU_SMEM_OPTIN", 232448); return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

// Per-kernel opt-in dynamic shared memory, as the real runtime requires above 48 KiB.
struct FuncAttrs { const void* fn; int max_dyn_smem; };
inline std::vector<FuncAttrs>& func_attrs() { static std::vector<FuncAttrs> v; return v; }
inline std::mutex& func_attrs_mutex() { static std::mutex m; return m; }
inline int max_dyn_smem_of(const void* fn) {
  std::lock_guard<std::mutex> lock(func_attrs_mutex());
  for (auto& f : func_attrs()) if (f.fn == fn) return f.max_dyn_smem;
  return 48 * 1024;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  if (value < 0 || value > optin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(func_attrs_mutex());
  for (auto& f : func_attrs()) if (f.fn == reinterpret_cast<const void*>(fn)) { f.max_dyn_smem = value; return cudaSuccess; }
  func_attrs().push_back({reinterpret_cast<const void*>(fn), value});
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Execution model

extern thread_local uint3 tl_threadIdx;
extern uint3 g_blockIdx;
extern dim3 g_blockDim, g_gridDim;
extern unsigned char* g_dyn_smem;

#ifdef IMSE_EMU_DEFINE_GLOBALS
thread_local uint3 tl_threadIdx;
uint3 g_blockIdx;
dim3 g_blockDim, g_gridDim;
unsigned char* g_dyn_smem = nullptr;
#endif

class Barrier {
 public:
  explicit Barrier(int n) : count_(n), waiting_(0), generation_(0) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const unsigned long gen = generation_;
    if (++waiting_ >= count_) { release(); return; }
    cv_.wait(lock, [&] { return generation_ != gen; });
  }
  // An exited thread no longer takes part (as on sm_70+, where exited threads count as arrived).
  void leave() {
    std::unique_lock<std::mutex> lock(m_);
    --count_;
    if (waiting_ > 0 && waiting_ >= count_) release();
  }
  unsigned long generation() {
    std::unique_lock<std::mutex> lock(m_);
    return generation_;
  }

 private:
  void release() { waiting_ = 0; ++generation_; cv_.notify_all(); }
  std::mutex m_;
  std::condition_variable cv_;
  int count_, waiting_;
  unsigned long generation_;
};

extern Barrier* g_barrier;
extern std::atomic<int64_t> g_launches;  // launches so far (tests tell the custom-kernel path from ATen's)
#ifdef IMSE_EMU_DEFINE_GLOBALS
Barrier* g_barrier = nullptr;
std::atomic<int64_t> g_launches{0};
int64_t launch_count() { return g_launches.load(); }
#endif

inline void syncthreads() { g_barrier->arrive_and_wait(); }

// Worker threads kept for the life of the process (creating 256 threads per block dominated the
// run time): the threads of a block are workers 0..n-1 of this pool.
class ThreadPool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> lock(m_);
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    job_ = &fn;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int id) {
    unsigned long seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      const std::function<void(int)>* job = job_;
      lock.unlock();
      (*job)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, remaining_ = 0;
  unsigned long generation_ = 0;
};

inline ThreadPool& thread_pool() {
  static ThreadPool* pool = new ThreadPool;  // never destroyed: its threads wait until the process ends
  return *pool;
}

// The launch: checks the configuration like the runtime does, then runs every block, one after another.
template <typename P>
cudaError_t launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem, const P& params) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 || threads > 1024)
    return cudaErrorInvalidConfiguration;
  if (smem > static_cast<size_t>(max_dyn_smem_of(reinterpret_cast<const void*>(kernel)))) return cudaErrorInvalidValue;
  static std::mutex launch_mutex;  // one emulated launch at a time (the globals below are shared)
  std::lock_guard<std::mutex> launch_lock(launch_mutex);
  ++g_launches;
  std::vector<unsigned char> storage(smem + 256);
  unsigned char* base = storage.data();
  base += (256 - reinterpret_cast<uintptr_t>(base) % 256) % 256;
  g_dyn_smem = base;
  g_blockDim = block;
  g_gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_blockIdx = {bx, by, bz};
        std::memset(base, 0xFF, smem);  // NaN in every float format: unwritten shared memory shows
        Barrier barrier(static_cast<int>(threads));
        g_barrier = &barrier;
        const std::function<void(int)> body = [&](int t) {
          tl_threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          kernel(params);
          barrier.leave();
        };
        thread_pool().run(static_cast<int>(threads), body);
        g_barrier = nullptr;
      }
  g_dyn_smem = nullptr;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// ---------------------------------------------------------------------------------------------
// 16-bit float types with the conversions the kernels use (round to nearest even).

struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  _Float16 f = static_cast<_Float16>(v);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = static_cast<uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) { b.x = 0x7FC0; return b; }
  u += 0x7FFF + ((u >> 16) & 1);
  b.x = static_cast<uint16_t>(u >> 16);
  return b;
}

// ---------------------------------------------------------------------------------------------
// WMMA: the fragment holds the whole tile (row-major logical order). The calls are warp-collective,
// so lane 0 of each warp does the work for the warp and the other lanes skip it (their fragments
// stay zero and are never stored). Loads and stores check the documented alignment rules.

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct dims;
template <int M, int N, int K> struct dims<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct dims<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct dims<accumulator, M, N, K> { static constexpr int R = M, C = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int R = dims<Use, M, N, K>::R, C = dims<Use, M, N, K>::C;
  using element_type = T;
  static constexpr int num_elements = R * C;
  element_type x[R * C] = {};
};

inline bool warp_leader() {
  return (tl_threadIdx.x + g_blockDim.x * (tl_threadIdx.y + g_blockDim.y * tl_threadIdx.z)) % 32 == 0;
}

inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename P>
inline void check_pointer(const P* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::runtime_error(std::string("wmma ") + what + ": pointer not 256-bit aligned");
  if ((ldm * sizeof(P)) % 16 != 0)
    throw std::runtime_error(std::string("wmma ") + what + ": ldm not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value, "operand fragment");
  static_assert(std::is_same<typename fragment<Use, M, N, K, T, L>::element_type, P>::value, "pointer type");
  check_pointer(p, ldm, "load_matrix_sync");
  if (!warp_leader()) return;
  constexpr int R = fragment<Use, M, N, K, T, L>::R, C = fragment<Use, M, N, K, T, L>::C;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j)
      f.x[i * C + j] = std::is_same<L, row_major>::value ? p[i * ldm + j] : p[i + j * ldm];
}

template <int M, int N, int K>
inline void fill_fragment(fragment<accumulator, M, N, K, float>& f, float v) {
  if (!warp_leader()) return;
  for (int i = 0; i < M * N; ++i) f.x[i] = v;
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, "store_matrix_sync");
  if (!warp_leader()) return;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) (layout == mem_row_major ? p[i * ldm + j] : p[i + j * ldm]) = f.x[i * N + j];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  if (!warp_leader()) return;
  float af[M * K], bf[K * N], out[M * N];
  for (int i = 0; i < M * K; ++i) af[i] = to_f(a.x[i]);
  for (int i = 0; i < K * N; ++i) bf[i] = to_f(b.x[i]);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc = std::fma(af[i * K + k], bf[k * N + j], acc);
      out[i * N + j] = acc;
    }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

}  // namespace imse_emu_rt

using namespace imse_emu_rt;

#define threadIdx (::imse_emu_rt::tl_threadIdx)
#define blockIdx (::imse_emu_rt::g_blockIdx)
#define blockDim (::imse_emu_rt::g_blockDim)
#define gridDim (::imse_emu_rt::g_gridDim)
#define __syncthreads() ::imse_emu_rt::syncthreads()
