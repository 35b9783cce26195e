"""Runs the benchmark suite and writes its report (``make bench``):

    python benchmarks/run.py [--suite kernels|e2e|all] [--quick] [--out DIR] [-k EXPR]

DIR (default bench-results) gets results.json (compact: environment, per case the median, its
spread and rounds, rates and speed-ups), results.md and chart.png; the table is printed too.
--quick runs tiny cases: it checks that the suite runs, not how fast anything is.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"kernels": ["test_kernels.py"], "e2e": ["test_e2e.py"],
         "all": ["test_kernels.py", "test_e2e.py"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(FILES), default="all")
    p.add_argument("--quick", action="store_true", help="tiny cases: checks the suite runs")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("-k", dest="select", default=None,
                   help="only cases matching this pytest -k expression (e.g. 'sd15 and attention')")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "benchmarks-raw.json")
        pytest_args = [os.path.join(HERE, f) for f in FILES[args.suite]]
        pytest_args += ["-q", "-p", "no:cacheprovider", "--benchmark-json", raw,
                        "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name"]
        if args.quick:
            pytest_args.append("--bench-quick")
        if args.select:
            pytest_args += ["-k", args.select]
        code = pytest.main(pytest_args)
        if code not in (0, 5) or not os.path.exists(raw):
            print(f"benchmarks/run.py: the suite failed (pytest exit {int(code)})",
                  file=sys.stderr)
            return int(code) or 1
        import report                    # benchmarks/ is on sys.path: pytest put it there

        env = report.environment()
        title = (f"fastdiff benchmarks ({args.suite}{', quick' if args.quick else ''}) on "
                 f"{env['device']}")
        md, _ = report.write_results(report.load_raw(raw), args.out, title)
    print("\n" + md)
    print(f"\nwrote {args.out}/results.json, results.md, chart.png ({env['device']}, torch "
          f"{env['torch']}, commit {(env['git_commit'] or '?')[:10]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
