"""Triton kernels of the `triton` backend (docs/design.md §3).

- `chain.py`          one-launch fused F route: out = ((A·B1) ⊙ s)·B2 (+ bias), with optional
                      ds / h epilogues (forward, backward and input grad)
- `scaled_matmul.py`  GEMM with s applied on the fly (prologue along K or epilogue along N) and
                      the optional ds epilogue: recomposition and the stages of the split paths
- `recomposed_ds.py`  ds = rowsum((Uᵀ·G) ⊙ Vh) without writing Uᵀ·G
- `tuning.py`         tile configurations per architecture, and the per-shape choice among them by timing
- `runtime.py`        interpreter detection, dtype and device rules, and the tile mapping shared by the kernels

`tools/triton_compile_check.py` lowers every kernel configuration for sm_80 / sm_90 without a GPU.
"""
