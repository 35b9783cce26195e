"""Speed-up ratios from pytest-benchmark JSON files: baseline median / fastdiff median per group.

    python benchmarks/report.py run1.json [run2.json ...]   -> a markdown table on stdout

With several runs (the machines are shared and noisy) each run's ratio is listed and the median
ratio across runs is the one to quote.
"""
import json
import statistics
import sys
from collections import defaultdict


def ratios(path):
    """{group: (fastdiff median s, torch median s)} for one benchmark JSON file."""
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"]
    rows = {g: (t["fastdiff"], t["torch"]) for g, t in groups.items()
            if "fastdiff" in t and "torch" in t}
    return data.get("machine_info", {}), data.get("datetime", "?"), rows


def main(argv):
    runs = [ratios(p) for p in argv[1:]]
    machine = runs[0][0]
    cpu = machine.get("cpu", {})
    print(f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; "
          f"{len(runs)} run(s), first at {runs[0][1]}\n")
    print("| benchmark | fastdiff (ms) | torch eager (ms) | speed-up per run | median speed-up |")
    print("|---|---:|---:|---|---:|")
    for group in sorted(runs[0][2]):
        per = [r[2][group] for r in runs if group in r[2]]
        speed = [t / f for f, t in per]
        f_ms = statistics.median(f for f, _ in per) * 1e3
        t_ms = statistics.median(t for _, t in per) * 1e3
        print(f"| {group} | {f_ms:.3f} | {t_ms:.3f} | {', '.join(f'{s:.2f}' for s in speed)} "
              f"| {statistics.median(speed):.2f}x |")


if __name__ == "__main__":
    main(sys.argv)
