"""The wheel, as a user installs it: `pip wheel .` builds it with cubins, it installs into a
fresh virtual environment, imports there, says what it carries (`fastdiff info`), and passes the
quick CPU subset of the tests (`-m quick`).

The fresh environment reuses this interpreter's installed packages (torch, triton, pytest,
...) through a .pth file instead of downloading them (the tests are offline); fastdiff itself
comes only from the wheel. The wheel here is built for sm_90 (FASTDIFF_CUDA_ARCHS), whose
kernels tests/test_prebuild.py has just compiled into Triton's cache: each more architecture is
another ~3 minutes of compiling on CI's 2 cores (the default wheel's sm_80, sm_86 and sm_89 about
9), which would take the suite past 15 minutes. The default architectures are checked
separately (test_archs_from_the_environment; `make wheel` builds them).
"""
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = [90]


def _run(cmd, timeout, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTDIFF_CUDA_ARCHS"] = ",".join(map(str, ARCHS))
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
          str(ROOT), "-w", str(out)], timeout=1800, env=env)
    wheels = list(out.glob("fastdiff-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh venv with the wheel installed; returns its python."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], timeout=120)
    py = root / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   timeout=60).stdout.strip()
    parents = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
               *site.getsitepackages(), site.getusersitepackages()}
    # Directories added by a .pth line do not have their own .pth files processed, so an
    # editable install of fastdiff in this interpreter stays invisible there.
    Path(purelib, "_fastdiff_test_parent.pth").write_text(
        "\n".join(p for p in sorted(parents) if os.path.isdir(p)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
          "--no-index", "-q", str(wheel)], timeout=300)
    return py


def _clean_env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}


def test_archs_from_the_environment():
    """setup.py compiles for FASTDIFF_CUDA_ARCHS as kernels/prebuild.py parses it."""
    from fastdiff.kernels.prebuild import parse_archs

    assert parse_archs(None) == [80, 86, 89, 90]  # the default wheel
    assert parse_archs("80;sm_90") == [80, 90] and parse_archs("none") == []
    with pytest.raises(ValueError, match="FASTDIFF_CUDA_ARCHS must list SM versions"):
        parse_archs("ampere")


def test_wheel_carries_cubins_for_every_requested_arch(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    cubins = [n for n in names if n.startswith("fastdiff/kernels/cubins/")
              and n.endswith(".cubin")]
    assert "fastdiff/kernels/cubins/manifest.json" in names
    for arch in ARCHS:
        assert any(n.endswith(f"-sm{arch}.cubin") for n in cubins), arch
    so = [n for n in names if n.startswith("fastdiff/_C") and n.endswith(".so")]
    # Python's limited API: one abi3 extension for every Python >= 3.10 (the H200's 3.12 could
    # not install the cp311 wheel); an older build's version-tagged _C is not shipped beside it.
    assert so == ["fastdiff/_C.abi3.so"], so
    assert "-cp310-abi3-" in Path(wheel).name, Path(wheel).name


def test_wheel_metadata_states_the_torch_it_loads_with(wheel):
    # The extension is on libtorch's stable ABI, built for setup.py's TORCH_TARGET: it loads
    # with that torch and every later one, and Requires-Dist says exactly that.
    target = re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", (ROOT / "setup.py").read_text(), re.M)
    with zipfile.ZipFile(wheel) as z:
        meta = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    reqs = [line for line in meta.splitlines() if line.startswith("Requires-Dist: torch")]
    assert reqs == [f"Requires-Dist: torch>={target[1]}.{target[2]}"], reqs


def test_wheel_imports_and_reports_what_it_carries(venv, tmp_path):
    r = _run([str(venv), "-c", "import fastdiff; print(fastdiff.__file__)"], timeout=300,
             cwd=tmp_path, env=_clean_env())
    assert str(venv.parent.parent) in r.stdout, "fastdiff was not imported from the venv"
    r = _run([str(venv), "-m", "fastdiff", "info"], timeout=300, cwd=tmp_path, env=_clean_env())
    print(r.stdout)
    assert "prebuilt kernels" in r.stdout and "none" not in r.stdout.split("prebuilt kernels")[1]
    for arch in ARCHS:
        assert f"sm_{arch}:" in r.stdout


def test_quick_cpu_subset_passes_in_the_venv(venv, tmp_path):
    # The tests and their configuration, without the source tree they sit in.
    shutil.copytree(ROOT / "tests", tmp_path / "tests")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    r = subprocess.run([str(venv), "-m", "pytest", "-q", "-m", "quick and not cuda", "-p",
                        "no:cacheprovider", "tests"], capture_output=True, text=True,
                       timeout=1200, cwd=tmp_path, env=_clean_env())
    print(r.stdout[-2000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the installed cubins were checked there (not skipped as in a source tree)
    r2 = _run([str(venv), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
               "tests/test_prebuilt.py::test_installed_cubins_cover_every_plan"],
              timeout=600, cwd=tmp_path, env=_clean_env())
    assert "1 passed" in r2.stdout, r2.stdout[-2000:]


def _from_setup(*names):
    """The named top-level constants and functions of setup.py (it runs setup() on import)."""
    import ast
    tree = ast.parse((ROOT / "setup.py").read_text())
    keep = [n for n in tree.body
            if (isinstance(n, ast.FunctionDef) and n.name in names)
            or (isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
                and n.targets[0].id in names)]
    ns = {}
    exec(compile(ast.Module(keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns


def test_building_against_torch_older_than_2_13_is_refused():
    """Built against torch 2.11's headers the extension segfaulted in denoise_step with a state
    (H200, benchmarks/results/gpu-2026-11-30-b/3-probe); built against 2.13's it runs on 2.11.
    setup.py refuses the older headers, naming the way out."""
    ns = _from_setup("TORCH_TARGET", "MIN_BUILD_TORCH", "build_torch_problem")
    problem = ns["build_torch_problem"]
    msg = problem("2.11.0+cu130")
    assert msg and "torch 2.11.0+cu130" in msg and ">= 2.13" in msg and "FASTDIFF_EXTENSION" in msg
    assert problem("2.12.1") is not None
    assert problem("2.13.0+cpu") is None and problem("2.14.0.dev20261201") is None
    assert problem("3.0.0") is None
    import torch
    assert problem(torch.__version__) is None  # this machine builds it
