"""Benchmark set-up: device and dtype, quick mode, the environment in the JSON.

    pytest benchmarks [--bench-quick] --benchmark-json out.json   (or: python benchmarks/run.py)

Quick mode (``--bench-quick`` or FASTDIFF_BENCH_QUICK=1) runs tiny cases to check that the suite
runs (CI), not how fast anything is.
"""
import os

import pytest
import torch

import cases
import report

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true",
                     help="tiny cases, few rounds: a smoke test of the suite")


def is_quick(config) -> bool:
    return config.getoption("--bench-quick") or os.environ.get("FASTDIFF_BENCH_QUICK") == "1"


def pytest_generate_tests(metafunc):
    quick = is_quick(metafunc.config)
    if "kcase" in metafunc.fixturenames:
        ks = cases.kernel_cases(quick)
        metafunc.parametrize("kcase", ks, ids=[c.id for c in ks])
    if "ecase" in metafunc.fixturenames:
        es = cases.e2e_cases(quick, DEVICE)
        metafunc.parametrize("ecase", es, ids=[c.id for c in es], scope="module")


@pytest.fixture(scope="session")
def quick(request):
    return is_quick(request.config)


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def dtype():
    return DTYPE


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fastdiff_env"] = report.environment()
    output_json["fastdiff_env"]["quick"] = is_quick(config)
