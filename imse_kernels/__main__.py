"""`python -m imse_kernels`: versions, the available backends (and why any other is unavailable), and
whether this CPU runs bf16/fp16 natively."""
import platform

import torch

import imse_kernels
from imse_kernels.backends import backend_status, disabled_backends, requested_backend, serving_backend
from imse_kernels.precision import cpu_precision_report
from imse_kernels.proc_status import cpu_model


def main() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        from imse_kernels import _build_info

        built = (f"torch {_build_info.TORCH_VERSION}, "
                 f"CUDA extension: {_build_info.CUDA_BUILT} ({_build_info.CUDA_ARCH_LIST})")
    except ImportError:
        built = "no compiled extension"
    print(f"imse_kernels {imse_kernels.__version__}  (python {platform.python_version()}, {platform.machine()})")
    print(f"torch        {torch.__version__}  "
          f"(CUDA {torch.version.cuda}, device available: {torch.cuda.is_available()})")
    print(f"triton       {triton_version}")
    print(f"built with   {built}")
    print(f"cpu          {cpu_model()}, {torch.backends.cpu.get_cpu_capability()}: {cpu_precision_report()}; "
          f"CPU autocast: docs/design.md §14")
    print("backends:")
    for name, reason in backend_status().items():
        print(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    for name, reason in disabled_backends().items():
        print(f"  disabled for auto: {name}: {reason}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    sel = requested_backend()
    print(f"selection    {sel} (IMSE_BACKEND / use_backend)")
    for d in devices:
        try:
            print(f"  {d.type}: {serving_backend(d)}")
        except RuntimeError as exc:
            print(f"  {d.type}: {exc}")


if __name__ == "__main__":
    main()
