"""benchmarks/gpu.sh keeps to its deadline and leaves a report when a phase is cut off: run here
in quick mode with a tiny deadline and one phase made too slow (GPU_SLOW_PHASE), as a lent GPU
machine would stop a run. And what it relies on: pytest-benchmark writes its JSON when pytest is
interrupted by SIGINT, with benchmarks/gpu_plugin.py's counts and partial marks."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None,
                                reason="needs bash and coreutils' timeout")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_sh_cuts_the_slow_phase_at_the_deadline_and_reports_the_rest(tmp_path):
    out = tmp_path / "out"
    deadline, grace = 40, 5
    env = {**os.environ, "OUT": str(out), "QUICK": "1", "PYTHON": sys.executable,
           "GPU_SKIP_BUILD": "1",             # this package is installed already
           "PHASES": "first-call,kernels,e2e", "GPU_SLOW_PHASE": "kernels",
           "GPU_DEADLINE": str(deadline), "GPU_GRACE": str(grace), "GPU_REPORT_S": "8",
           "GPU_MIN_PHASE": "1", "TMPDIR": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": ""}        # the CPU run, also on a machine with a GPU
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], env=env,
                       capture_output=True, text=True, timeout=3 * deadline)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert elapsed <= deadline + grace, f"gpu.sh took {elapsed:.0f} s:\n{r.stdout[-3000:]}"

    results = json.loads((out / "results.json").read_text())
    phases = {p["phase"]: p for p in results["phases"]}
    assert list(phases) == ["first-call", "kernels", "e2e"]
    first = phases["first-call"]              # CUDA only: collected and skipped here
    assert first["status"] == "ok" and first["failed"] == first["errors"] == 0
    assert first["skipped"] > 0
    kernels = phases["kernels"]               # its first test ran, then it slept
    assert kernels["status"] == "cut" and kernels["passed"] == 1, kernels
    assert phases["e2e"]["status"] == "skipped" and "too little time" in phases["e2e"]["note"]
    rows = results["rows"]
    assert len(rows) == 1 and rows[0]["kind"] == "kernel" and not rows[0]["partial"]
    assert "raw" not in results and results["environment"]["git_commit"]

    md = (out / "results.md").read_text()
    assert "| kernels | cut |" in md and "| op case | system |" in md
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert {"log", "results.json", "results.md", "chart.png"} <= {p.name for p in files}
    assert not list(tmp_path.glob("fastdiff-gpu.*"))  # the raw JSON's folder is gone
    summary = r.stdout[r.stdout.index("==== summary"):]
    assert "| kernels | cut |" in summary and "| e2e | skipped |" in summary
    assert (out / "log").read_text().rstrip().endswith(r.stdout.rstrip().splitlines()[-1])


def test_gpu_sh_wheel_phase_says_what_is_missing(tmp_path):
    """The wheel phase (issue 17: the wheel built here, on the GPU machine's torch; a default
    phase since it first ran, 2026-11-30, in place of tests-prebuilt) imports the wheel's
    fastdiff rather than this tree's, and without a wheel fails saying so, leaving the phases
    after it to run."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "QUICK": "1", "PYTHON": sys.executable,
           "GPU_SKIP_BUILD": "1", "PHASES": "wheel,first-call", "GPU_DEADLINE": "120",
           "GPU_MIN_PHASE": "1", "TMPDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": "",
           "GPU_WHEEL": str(tmp_path / "fastdiff-0-none.whl")}   # no such wheel
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    phases = {p["phase"]: p for p in json.loads((out / "results.json").read_text())["phases"]}
    assert list(phases) == ["wheel", "first-call"]
    assert phases["wheel"]["status"] == "failed" and phases["first-call"]["status"] == "ok"
    assert "no fastdiff wheel to test" in (out / "tests.log").read_text()
    default = subprocess.run(["bash", "-c", "grep -n 'default) want+=' benchmarks/gpu.sh"],
                             cwd=ROOT, capture_output=True, text=True).stdout
    assert "build wheel tests first-call" in default and "tests-prebuilt" not in default


SUITE = """
import time

def test_fast(benchmark):
    benchmark.pedantic(time.sleep, args=(0.001,), rounds=3)

def test_slow(benchmark):
    benchmark.pedantic(time.sleep, args=(0.2,), rounds=1000)

def test_never_reached(benchmark):
    benchmark(time.sleep, 0.001)
"""


def test_pytest_benchmark_writes_its_json_when_interrupted(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    status, partial, raw = (tmp_path / n for n in ("status.json", "partial.json", "raw.json"))
    env = {**os.environ, "PYTHONPATH": ROOT, "FASTDIFF_PHASE_STATUS": str(status),
           "FASTDIFF_PHASE_PARTIAL": str(partial)}
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "benchmarks.gpu_plugin", "--benchmark-json", str(raw),
                          "test_suite.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):                  # until test_fast is done, then into test_slow
            if status.exists() and json.loads(status.read_text())["passed"] == 1:
                break
            time.sleep(0.05)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        log, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 2, log             # pytest: interrupted
    benchmarks = {b["name"]: b for b in json.loads(raw.read_text())["benchmarks"]}
    assert set(benchmarks) == {"test_fast", "test_slow"}, log
    assert "partial" not in benchmarks["test_fast"]["extra_info"]
    slow = benchmarks["test_slow"]            # the rounds it had when interrupted
    assert slow["extra_info"]["partial"] and 1 <= slow["stats"]["rounds"] < 1000
    counts = json.loads(status.read_text())
    assert counts["passed"] == 1 and counts["done"] and counts["exitstatus"] == 2
    # the spare written after each test, for a run killed outright
    assert [b["name"] for b in json.loads(partial.read_text())["benchmarks"]] == ["test_fast"]


def test_report_reads_a_killed_phase_from_its_spare_copy(tmp_path):
    """A phase killed outright leaves pytest-benchmark's JSON empty (it opens the file at the
    start): the report takes the plugin's copy instead, and says which rows were cut off."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()

    def entry(case, system, median, **info):
        return {"name": f"{case}-{system}", "stats": {"median": median, "rounds": 4},
                "extra_info": {"kind": "kernel", "case": case, "system": system, "inner": 1,
                               "bytes": 1e9, "flops": 0, **info}}
    (raw / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "torch": "2.11.0",
                                              "git_commit": "abc"}))
    (raw / "phases.tsv").write_text("tests\tok\t50\t100\t0\t\n"
                                    "kernels\tcut\t90\t75\t137\tkilled\n"
                                    "e2e\tskipped\t0\t\t\ttoo little time left: 3 s\n")
    (raw / "tests.status.json").write_text(json.dumps(
        {"passed": 290, "failed": 2, "skipped": 15, "errors": 0, "done": True}))
    (raw / "kernels.status.json").write_text(json.dumps(
        {"passed": 2, "failed": 0, "skipped": 0, "errors": 0, "done": False}))
    (raw / "kernels.json").write_text("")
    (raw / "kernels.partial.json").write_text(json.dumps({"benchmarks": [
        entry("gn", "fastdiff", 1e-3), entry("gn", "eager", 2e-3),
        entry("gn", "compile", 4e-3, partial=True)]}))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_report.py"),
                        str(raw), str(out), "--summary", "--deadline", "420"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [p["status"] for p in results["phases"]] == ["ok", "cut", "skipped"]
    assert results["phases"][0]["failed"] == 2 and results["deadline_s"] == 420
    assert [(row["system"], row["partial"]) for row in results["rows"]] == [
        ("fastdiff", False), ("eager", False), ("compile", True)]
    assert "| gn | compile (cut: 4 rounds) |" in (out / "results.md").read_text()
    assert "gn 2.00x, vs compile 4.00x*, 23% of roofline" in r.stdout
    assert "| tests | ok | 50 s | 100 s | 290 | 2 | 15 | 0 |" in r.stdout
