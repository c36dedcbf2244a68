"""Builds the C++ CPU extension (`imse_kernels._C`) and, where a CUDA build of torch and nvcc
are present, the CUDA extension (`imse_kernels._C_cuda`). No GPU is needed to build.

Knobs (environment variables):
  IMSE_NO_EXTENSION=1        build no compiled extension (pure Python; torch/triton backends only)
  IMSE_CUDA=auto|1|0         build the CUDA extension when possible (auto), always (1, error if
                             impossible) or never (0)
  TORCH_CUDA_ARCH_LIST       CUDA archs, default "8.0;9.0+PTX"
  MAX_JOBS                   parallel compile jobs (ninja)
  CUDA_HOME                  CUDA toolkit; defaults to /usr/local/cuda when it holds nvcc
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default="auto"):
    return os.environ.get(name, default).strip().lower()


# torch's own CUDA_HOME detection follows `which nvcc`, which may be a wrapper outside the toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _write_build_info(with_cuda):
    path = os.path.join(ROOT, "imse_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py: the torch this package was compiled against."""\n')
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"CUDA_BUILT = {with_cuda!r}\n")
        f.write(f"CUDA_ARCH_LIST = {os.environ['TORCH_CUDA_ARCH_LIST']!r}\n")


def _cuda_wanted():
    mode = _flag("IMSE_CUDA")
    if mode in ("0", "false", "no", "off"):
        return False
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode in ("1", "true", "yes", "on", "force"):
        if not possible:
            raise RuntimeError(
                "IMSE_CUDA=1 but the CUDA extension cannot be built: "
                f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
            )
        return True
    return possible


def _extensions():
    if _flag("IMSE_NO_EXTENSION", "0") in ("1", "true", "yes", "on"):
        _write_build_info(False)
        return []
    cxx = ["-O3", "-fopenmp"]
    exts = [
        cpp_extension.CppExtension(
            "imse_kernels._C",
            sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    with_cuda = _cuda_wanted() and bool(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if with_cuda:
        include_dirs = [os.path.join(ROOT, "csrc")]
        try:  # the pip CUDA toolkit headers hold what the system toolkit may lack (cusparse.h)
            import nvidia

            for base in nvidia.__path__:
                for sub in ("cu13/include", "cu12/include"):
                    if os.path.isdir(os.path.join(base, sub)):
                        include_dirs.append(os.path.join(base, sub))
        except ImportError:
            pass
        exts.append(
            cpp_extension.CUDAExtension(
                "imse_kernels._C_cuda",
                sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
                + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
                include_dirs=include_dirs,
                # -lineinfo: source lines in compute-sanitizer reports, no effect on the machine code
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            )
        )
    _write_build_info(with_cuda)
    return exts


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
