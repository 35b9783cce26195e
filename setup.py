"""Build fastdiff: the Python package, the Triton kernels (as fastdiff.kernels), the C++ ops and,
in a wheel, the kernels compiled ahead of time (cubins).

Build against the installed torch, without build isolation:
    pip install --no-build-isolation -e .          # development: CUDA ops use the Triton JIT
    pip wheel --no-build-isolation . -w dist/      # a wheel with cubins for sm_80/86/89/90

FASTDIFF_CUDA_ARCHS (e.g. "80,90"; "none" for no cubins) picks the architectures the wheel's
cubins are compiled for; compiling needs triton but no GPU.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from torch.utils.cpp_extension import BuildExtension, CppExtension

def cxx_flags():
    flags = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        # ATen's Vectorized<T> uses AVX2 intrinsics when CPU_CAPABILITY_AVX2 is defined.
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags + os.environ.get("FASTDIFF_CXXFLAGS", "").split()


class BuildPyWithCubins(build_py):
    """build_py, then (for a wheel, not an editable install) the cubins into the build tree."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        out = os.path.join(self.build_lib, "fastdiff", "kernels", "cubins")
        shutil.rmtree(out, ignore_errors=True)
        # kernels/prebuild.py reads FASTDIFF_CUDA_ARCHS (default 80,86,89,90; "none" for none).
        cmd = [sys.executable, "-m", "kernels.prebuild", "--emit", out, "--archs-from-env",
               "--jobs", str(os.cpu_count() or 1)]
        print(f"fastdiff: compiling the Triton kernels into {out}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            failed = [line for line in r.stdout.splitlines() if '"ok": false' in line]
            sys.exit("fastdiff: compiling the kernels ahead of time failed:\n"
                     + "\n".join(failed[:5]) + "\n" + r.stderr[-3000:])
        print(r.stderr.strip(), flush=True)


setup(
    packages=["fastdiff", "fastdiff.kernels", "fastdiff.integrations",
              "fastdiff.integrations.diffusers", "fastdiff.digits"],
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    # The shipped digits model (safetensors weights + JSON config) and the U-Net configs.
    package_data={"fastdiff": ["configs/*.json"],
                  "fastdiff.digits": ["weights/*.safetensors", "weights/*.json"]},
    ext_modules=[
        CppExtension(
            "fastdiff._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args={"cxx": cxx_flags()},
            extra_link_args=["-fopenmp", "-ldl"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True),
              "build_py": BuildPyWithCubins},
)
