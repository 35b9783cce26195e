"""Speed-up ratios from a pytest-benchmark JSON: baseline median / fastdiff median per group.

    python benchmarks/report.py results.json   -> a markdown table on stdout
"""
import json
import sys
from collections import defaultdict


def ratios(path):
    data = json.load(open(path))
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"]
    rows = []
    for group, t in sorted(groups.items()):
        if "fastdiff" in t and "torch" in t:
            rows.append((group, t["fastdiff"], t["torch"], t["torch"] / t["fastdiff"]))
    return data.get("machine_info", {}), rows


def main(argv):
    machine, rows = ratios(argv[1])
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} cores\n")
    print("| benchmark | fastdiff (ms) | torch eager (ms) | speed-up |")
    print("|---|---:|---:|---:|")
    for group, f, t, r in rows:
        print(f"| {group} | {f * 1e3:.3f} | {t * 1e3:.3f} | {r:.2f}x |")


if __name__ == "__main__":
    main(sys.argv)
