"""Build fastdiff: the Python package, the Triton kernels (as fastdiff.kernels) and the C++ ops.

Build against the installed torch, without build isolation:
    pip install --no-build-isolation -e .
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


def cxx_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # ATen's Vectorized<T> uses AVX2 intrinsics when CPU_CAPABILITY_AVX2 is defined.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags + os.environ.get("FASTDIFF_CXXFLAGS", "").split()


setup(
    packages=["fastdiff", "fastdiff.kernels"],
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    # The shipped digits model (safetensors weights + JSON config).
    package_data={"fastdiff": ["weights/*.safetensors", "weights/*.json", "configs/*.json"]},
    ext_modules=[
        CppExtension(
            "fastdiff._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags()},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
