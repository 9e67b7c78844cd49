"""Builds collab_ops._C: the C++ CPU kernels always, the CUDA kernels when asked.

CUDA is built when COLLAB_OPS_CUDA=1, or when COLLAB_OPS_CUDA is unset and the installed torch has
CUDA and nvcc is found (CUDA_HOME). COLLAB_OPS_CUDA=0 forces a CPU-only build. Architectures come
from TORCH_CUDA_ARCH_LIST, as torch.utils.cpp_extension reads it. Nothing is downloaded.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("COLLAB_OPS_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise SystemExit(f"COLLAB_OPS_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and (torch.version.cuda is None or CUDA_HOME is None):
            raise SystemExit(
                "COLLAB_OPS_CUDA=1 needs a CUDA build of torch and nvcc "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
            )
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    with_cuda = want_cuda()
    # -fno-trapping-math lets GCC compute both sides of a float select, which the kernels' masked
    # loops need to vectorise; it changes no result (nothing here reads the FP exception flags).
    # -ffp-contract=off: no fused multiply-adds, so the AVX2/AVX-512 clones of a kernel give the
    # same bits as the baseline build (torch's flags select GNU C++, where contraction is on).
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not with_cuda:
        return CppExtension(
            "collab_ops._C",
            srcs,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    srcs += sources("csrc/cuda/*.cpp") + sources("csrc/cuda/*.cu")
    return CUDAExtension(
        "collab_ops._C",
        srcs,
        include_dirs=include_dirs,
        define_macros=[("COLLAB_OPS_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    name="collab_ops",
    version="0.1.0",
    description="Fused kernels for large/small language-model collaboration",
    packages=find_packages(include=["collab_ops", "collab_ops.*"]),
    # The demo's model family (weights, configs, tokenizer) ships inside the package.
    package_data={"collab_ops.demo": ["weights/*.json", "weights/*/*.json", "weights/*/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
