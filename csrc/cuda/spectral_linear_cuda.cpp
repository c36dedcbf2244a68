// CUDA registration of the imse_ext backend primitives, the five of route F/R and the three of
// per-sample codes (schema defined by the CPU extension,
// csrc/cpu/spectral_linear_cpu.cpp, from csrc/spectral_schema.h) and of the switch op
// imse_ext::cuda_fused_mode. Compiled by the host compiler: the custom kernels live in
// spectral_kernels.cu, the torch-facing logic in spectral_ops.h. Launches go to torch's current
// stream on the inputs' device. Importing imse_kernels._C_cuda runs the registration.
#include <Python.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "spectral_ops.h"

namespace {

struct CudaDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CUDA;
  static constexpr const char* kName = "CUDA";
  using Guard = c10::cuda::CUDAGuard;
  static void* stream(const at::Device& device) {
    return static_cast<void*>(c10::cuda::getCurrentCUDAStream(device.index()).stream());
  }
};

using CudaOps = imse_cuda_ops::Ops<CudaDevice>;

}  // namespace

TORCH_LIBRARY_IMPL(imse_ext, CUDA, m) {
  IMSE_REGISTER_IMPLS(m, CudaOps);
  IMSE_REGISTER_INDEXED_IMPLS(m, CudaOps);  // per-sample codes, docs/design.md §8
}

TORCH_LIBRARY_FRAGMENT(imse_ext, m) { IMSE_DEFINE_SWITCH(m, CudaOps); }

// A Python module with no functions: importing it runs the registration above.
extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
