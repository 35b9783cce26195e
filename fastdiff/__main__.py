"""The ``fastdiff`` command.

    fastdiff demo     run the three fused ops against torch and print agreement and time
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the fused ops against torch: agreement and time")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--repeats", type=int, default=20, help="timed calls per op (median kept)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastdiff.demo import run_demo

        return run_demo(args.device, args.repeats)
    return 2


if __name__ == "__main__":
    sys.exit(main())
