"""The benchmark suite runs (quick mode) and its report is right; no timing is asserted."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("pytest_benchmark")
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
if not os.path.isfile(os.path.join(BENCHMARKS, "cases.py")):   # tests copied beside a wheel
    pytest.skip("the benchmark suite lives in the source tree's benchmarks/",
                allow_module_level=True)
sys.path.insert(0, BENCHMARKS)
import cases  # noqa: E402  (benchmarks/: the suite is not part of the package)
import report  # noqa: E402


def test_bench_quick_writes_table_json_and_chart(tmp_path):
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "run.py"), "--quick", "--out",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| op case | system |" in r.stdout and "| sampling case |" in r.stdout
    results = json.loads((out / "results.json").read_text())
    systems = {(row["kind"], row["system"]) for row in results["rows"]}
    assert {("kernel", "fastdiff"), ("kernel", "eager"), ("kernel", "compile"),
            ("e2e", "engine"), ("e2e", "accelerate"), ("e2e", "diffusers")} <= systems
    env = results["environment"]
    assert env["torch"] and env["device"] and env["quick"] is True
    assert (out / "chart.png").stat().st_size > 1000
    assert (out / "results.md").read_text().startswith("Device: ")
    assert "raw" not in results and all(row["spread"] is not None for row in results["rows"])


def _raw(device):
    def entry(kind, case, system, median, **info):
        return {"stats": {"median": median}, "extra_info": {"kind": kind, "case": case,
                                                            "system": system, **info}}
    return {"fastdiff_env": {"device": device}, "benchmarks": [
        entry("kernel", "gn", "fastdiff", 20e-6, inner=10, bytes=3_000_000, flops=0),
        entry("kernel", "gn", "eager", 50e-6, inner=10, bytes=3_000_000, flops=0),
        entry("kernel", "attn", "fastdiff", 1e-3, inner=1, bytes=1, flops=400_000_000_000),
        entry("kernel", "attn", "eager", 2e-3, inner=1, bytes=1, flops=400_000_000_000),
        entry("e2e", "sd", "engine", 0.5, steps=50, batch=1, ttfi=3.0),
        entry("e2e", "sd", "diffusers", 1.0, steps=50, batch=1, ttfi=1.5),
    ]}


def test_report_rates_rooflines_and_speedups(tmp_path):
    rows = {(r.case, r.system): r for r in report.rows_from_benchmarks(_raw("NVIDIA H100 80GB"))}
    gn = rows[("gn", "fastdiff")]
    assert gn.seconds == pytest.approx(2e-6)
    assert gn.gbs == pytest.approx(1500.0) and gn.of_roofline == pytest.approx(0.5)
    assert gn.speedup == pytest.approx(2.5)
    attn = rows[("attn", "fastdiff")]
    assert attn.tflops == pytest.approx(400.0) and attn.of_roofline == pytest.approx(400 / 798)
    sd = rows[("sd", "engine")]
    assert sd.its == pytest.approx(100.0) and sd.speedup == pytest.approx(2.0) and sd.ttfi == 3.0
    cpu = report.rows_from_benchmarks(_raw("AMD EPYC"))
    assert all(r.of_roofline is None for r in cpu)
    md, _ = report.write_results(_raw("NVIDIA H100 80GB"), str(tmp_path))
    assert "50%" in md and "2.50x" in md
    assert os.path.getsize(tmp_path / "chart.png") > 1000


def test_bench_errors_are_messages():
    r = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "run.py"), "--suite", "nope"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
    with pytest.raises(ValueError, match="'system' must be one of"):
        cases.kernel_fn(cases.kernel_cases(True)[0], "tensorrt", "cpu", None)
