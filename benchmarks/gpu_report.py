"""The report of benchmarks/gpu.sh, rewritten after every phase so a run cut off at any point
leaves one: results.json (compact: environment, phases with their pass/fail counts, per-case
medians), results.md and chart.png in OUT.

    python benchmarks/gpu_report.py RAW OUT [--summary]

RAW is gpu.sh's scratch folder (outside OUT): env.json (report.environment() of the
machine), phases.tsv (one line per phase: name, status, seconds, limit, exit code, note),
<phase>.status.json (counts, benchmarks/gpu_plugin.py), <phase>.json (pytest-benchmark's
--benchmark-json) or, where that is missing or empty (a phase killed), <phase>.partial.json.
--summary prints the short table gpu.sh ends with: phases, counts, key ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

COUNTS = ("passed", "failed", "skipped", "errors")


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):         # absent, or empty: pytest-benchmark opens it at start
        return None


def read_phases(raw_dir: str) -> list[dict]:
    phases = []
    try:
        with open(os.path.join(raw_dir, "phases.tsv")) as f:
            lines = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except OSError:
        lines = []
    for name, status, seconds, limit, rc, note in lines:
        p = {"phase": name, "status": status, "seconds": int(seconds),
             "limit_s": int(limit) if limit else None, "exit": int(rc) if rc else None,
             "note": note}
        counts = _load(os.path.join(raw_dir, f"{name}.status.json"))
        if counts:
            p.update({k: counts.get(k, 0) for k in COUNTS})
        phases.append(p)
    return phases


def read_benchmarks(raw_dir: str, phases: list[dict]) -> list[dict]:
    out = []
    for p in phases:
        for suffix in ("json", "partial.json"):
            raw = _load(os.path.join(raw_dir, f"{p['phase']}.{suffix}"))
            if raw and raw.get("benchmarks"):
                out += raw["benchmarks"]
                break
    return out


def phase_table(phases: list[dict]) -> str:
    lines = ["| phase | status | time | limit | passed | failed | skipped | errors | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for p in phases:
        c = [str(p[k]) if k in p else "-" for k in COUNTS]
        limit = "-" if p["limit_s"] is None else f"{p['limit_s']} s"
        lines.append(f"| {p['phase']} | {p['status']} | {p['seconds']} s | {limit} | "
                     f"{' | '.join(c)} | {p['note']} |")
    return "\n".join(lines)


def key_ratios(rows) -> list[str]:
    """One line per kind: the speed-ups a reader looks for first (* = cut off, fewer rounds)."""
    def mark(r):
        return "*" if r.partial else ""

    out = []
    first = [r for r in rows if r.kind == "first_call" and r.system == "prebuilt" and r.speedup]
    if first:
        out.append("first call, JIT time / prebuilt time: " + ", ".join(
            f"{r.case} {r.speedup:.1f}x{mark(r)}" for r in first))
    kern = [r for r in rows if r.kind == "kernel" and r.system == "fastdiff" and r.speedup]
    compiled = {r.case: r for r in rows if r.kind == "kernel" and r.system == "compile"}
    # linear_geglu: the fused GEMM against cuBLAS + fastdiff.geglu, the question its run answers
    unfused = {r.case: r for r in rows if r.kind == "kernel" and r.system == "unfused"}
    if kern:
        def one(r):
            c, u = compiled.get(r.case), unfused.get(r.case)
            vs_compile = ("" if c is None
                          else f", vs compile {c.seconds / r.seconds:.2f}x{mark(c)}")
            if u is not None:
                vs_compile += f", vs unfused {u.seconds / r.seconds:.2f}x{mark(u)}"
            roof = "" if r.of_roofline is None else f", {100 * r.of_roofline:.0f}% of roofline"
            return f"{r.case} {r.speedup:.2f}x{mark(r)}{vs_compile}{roof}"
        out.append("kernels, fastdiff vs eager/SDPA: " + "; ".join(one(r) for r in kern))
    by = {(r.case, r.system): r for r in rows if r.kind == "e2e"}
    for case in dict.fromkeys(c for c, _ in by):
        parts = [f"{s} {by[(case, s)].speedup:.2f}x{mark(by[(case, s)])}"
                 for s in ("engine", "accelerate", "accelerate-cublas", "compile")
                 if (case, s) in by and by[(case, s)].speedup]
        eng, comp = by.get((case, "engine")), by.get((case, "compile"))
        if eng and comp:
            parts.append(f"engine vs compile {comp.seconds / eng.seconds:.2f}x")
        if eng:
            ttfi = "" if eng.ttfi is None else f", first image {eng.ttfi:.2f} s"
            parts.append(f"engine {eng.its:.2f} it/s{ttfi}")
        out.append(f"{case}: vs diffusers eager: " + ", ".join(parts))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw")
    p.add_argument("out")
    p.add_argument("--summary", action="store_true", help="print the summary table")
    p.add_argument("--quick", action="store_true", help="the run used the quick cases")
    p.add_argument("--deadline", type=int)
    args = p.parse_args(argv)
    env = _load(os.path.join(args.raw, "env.json")) or {
        "git_commit": os.environ.get("FASTDIFF_GIT_COMMIT")}
    env["quick"] = args.quick
    phases = read_phases(args.raw)
    extra = {"deadline_s": args.deadline, "phases": phases}
    try:
        import fastdiff  # noqa: F401  (write_results needs it: the build phase made it)
        import report
    except Exception as err:              # the build failed: the phases, and why
        print(f"gpu_report: fastdiff does not import ({err}); phases only")
        report, rows = None, []
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"environment": env, **extra, "rows": []}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"fastdiff does not import: {err}\n\n{phase_table(phases)}\n")
    if report is not None:
        raw = {"fastdiff_env": env, "benchmarks": read_benchmarks(args.raw, phases)}
        rows = report.rows_from_benchmarks(raw)
        notes = "\n\n".join([phase_table(phases), *key_ratios(rows)])
        title = f"fastdiff gpu.sh{' (quick)' if args.quick else ''} on {env.get('device')}"
        report.write_results(raw, args.out, title, extra=extra, notes=notes)
    if args.summary:
        print(f"\n==== summary: {env.get('device')}; torch {env.get('torch')}, triton "
              f"{env.get('triton')}, CUDA {env.get('cuda')}; commit {env.get('git_commit')}"
              f"{'; QUICK cases' if args.quick else ''}")
        print(phase_table(phases))
        for line in key_ratios(rows):
            print(line)
        print(f"report: {args.out}: results.md, results.json"
              f"{', chart.png' if rows else ''} ({len(rows)} timed cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
