"""pytest plugin of benchmarks/gpu.sh (``-p benchmarks.gpu_plugin``): what a phase leaves behind
when its time runs out.

gpu.sh stops a phase with SIGINT and, after a grace period, SIGKILL. On SIGINT pytest ends the
session normally and pytest-benchmark writes its --benchmark-json (checked on CPU: the cases
finished so far, and the one interrupted with the rounds it had). A SIGKILL (a call stuck in C
for the whole grace period) leaves nothing, so after every test this plugin also writes, when
asked to through the environment:

  FASTDIFF_PHASE_STATUS=path   the phase's pass/fail/skip/error counts so far (JSON)
  FASTDIFF_PHASE_PARTIAL=path  the benchmarks finished so far, in --benchmark-json's layout
  FASTDIFF_PHASE_SLOW=1        the first test runs, then every later one sleeps before its
                               call: a phase too slow for its limit (tests/test_gpu_script.py)

Benchmarks whose test did not finish are marked ``extra_info["partial"] = True`` in the JSON.
"""
import json
import os
import time

import pytest

_config = None
_counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
_finished: set[str] = set()      # node ids whose call passed
_calls = 0


def _write(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, default=repr)       # params hold case objects
    os.replace(tmp, path)         # a kill mid-write leaves the previous file whole


def _status(done, exitstatus=None):
    path = os.environ.get("FASTDIFF_PHASE_STATUS")
    if path:
        _write(path, {**_counts, "done": done, "exitstatus": exitstatus})


def pytest_configure(config):
    global _config
    _config = config


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    global _calls
    _calls += 1
    if os.environ.get("FASTDIFF_PHASE_SLOW") == "1" and _calls > 1:
        time.sleep(3600)          # until gpu.sh's SIGINT


def pytest_runtest_logreport(report):
    if report.when == "call":
        key = {"passed": "passed", "failed": "failed"}.get(report.outcome, "skipped")
        _counts[key] += 1
        if report.passed:
            _finished.add(report.nodeid)
    elif report.failed:
        _counts["errors"] += 1
    elif report.skipped:          # skipped at set-up (skip marks, importorskip in fixtures)
        _counts["skipped"] += 1
    if report.when == "teardown":
        _status(False)
        _snapshot()


def _snapshot():
    path = os.environ.get("FASTDIFF_PHASE_PARTIAL")
    session = getattr(_config, "_benchmarksession", None)
    if not path or session is None or not session.benchmarks:
        return
    try:                          # pytest-benchmark's internals: another version may differ
        output = {"benchmarks": [b.as_dict(include_data=False)
                                 for b in session.benchmarks if b]}
        pytest_benchmark_update_json(_config, None, output)
        _write(path, output)
    except Exception as err:      # a snapshot is a spare: never fail the run for it
        print(f"gpu_plugin: no snapshot of the benchmarks ({err!r})")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    for b in output_json.get("benchmarks", []):
        if b.get("fullname") not in _finished:
            b.setdefault("extra_info", {})["partial"] = True


def pytest_sessionfinish(session, exitstatus):
    _status(True, int(exitstatus))
