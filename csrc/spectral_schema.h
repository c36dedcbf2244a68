// The op schemas of the compiled backends, shared by the CPU (defines them) and CUDA
// (implements them) extensions. Python owns the user-facing op `imse::spectral_linear`;
// these are the backend primitives beneath it. All tensors are 2-D row-major "linear weights":
// x (N x d_in), U (d_out x r), s (r), Vh (r x d_in), h = x Vh^T (N x r), W = (U*s) Vh.
#pragma once

#define IMSE_DEFINE_SCHEMA(m)                                                                              \
  m.def("factorized_forward(Tensor x, Tensor U, Tensor s, Tensor Vh, Tensor? bias, bool save_h) -> (Tensor, Tensor)"); \
  m.def("recompose(Tensor U, Tensor s, Tensor Vh) -> Tensor");                                             \
  m.def("factorized_backward(Tensor grad, Tensor h, Tensor U, Tensor s, Tensor Vh, bool need_dx) -> (Tensor, Tensor)"); \
  m.def("factorized_input_grad(Tensor grad, Tensor U, Tensor s, Tensor Vh) -> Tensor");                    \
  m.def("recomposed_backward(Tensor grad, Tensor x, Tensor U, Tensor s, Tensor Vh, Tensor W, bool need_dx) -> (Tensor, Tensor)")

// Per-sample codes (docs/design.md, section 8): S is a (K x r) code table, row n of x uses
// S[index[n]], index int64 (N). Defined by the CPU extension (with its CPU kernels); the CUDA
// extension registers CUDA kernels for them, and the emulator its own copies under imse_emu.
#define IMSE_DEFINE_INDEXED_SCHEMA(m)                                                                      \
  m.def("indexed_forward(Tensor x, Tensor U, Tensor S, Tensor Vh, Tensor? bias, Tensor index, bool save_h) -> (Tensor, Tensor)"); \
  m.def("indexed_backward(Tensor grad, Tensor h, Tensor U, Tensor S, Tensor Vh, Tensor index, bool need_dx) -> (Tensor, Tensor)"); \
  m.def("indexed_input_grad(Tensor grad, Tensor U, Tensor S, Tensor Vh, Tensor index) -> Tensor")
