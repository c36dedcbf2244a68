// The CUDA backend's torch-facing code (../spectral_ops.h) over CPU tensors, with the kernels run by
// the emulator (emu_kernels.cpp). Registers the imse_ext schema (with the per-sample-code ops of
// docs/design.md §8) again under the namespace imse_emu, so that tests reach exactly the code paths of the CUDA ops without a GPU, with the switch op
// imse_emu::cuda_fused_mode and imse_emu::launches() (emulated kernel launches so far: 0 more after a
// call means the call took the ATen path).
// Built only by the tests (tests/gpu/test_cuda_build.py), never by setup.py.
#include "../spectral_ops.h"
#include "../../spectral_schema.h"

namespace {

struct EmulatedDevice {
  static constexpr c10::DeviceType kType = c10::DeviceType::CPU;
  static constexpr const char* kName = "CPU (emulated CUDA)";
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static void* stream(const at::Device&) { return nullptr; }
};

using EmuOps = imse_cuda_ops::Ops<EmulatedDevice>;

}  // namespace

namespace imse_emu_rt {
int64_t launch_count();  // cuda_emu.h
}

TORCH_LIBRARY(imse_emu, m) {
  IMSE_DEFINE_SCHEMA(m);
  IMSE_DEFINE_INDEXED_SCHEMA(m);
  IMSE_DEFINE_SWITCH(m, EmuOps);
  m.def("launches() -> int", &imse_emu_rt::launch_count);
}

TORCH_LIBRARY_IMPL(imse_emu, CPU, m) {
  IMSE_REGISTER_IMPLS(m, EmuOps);
  IMSE_REGISTER_INDEXED_IMPLS(m, EmuOps);
}
