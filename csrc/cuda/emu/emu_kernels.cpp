// The CUDA kernels of ../spectral_kernels.cu compiled for the host against the emulator
// (cuda_emu.h). Built only by the tests (tests/gpu/test_cuda_build.py), never by setup.py.
#define IMSE_EMU 1
#define IMSE_EMU_DEFINE_GLOBALS 1
#include "../spectral_kernels.cu"
