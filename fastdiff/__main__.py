"""The ``fastdiff`` command.

    fastdiff sample   draw digits from the shipped model into a PNG grid (the main command)
    fastdiff eval     conditional accuracy and FD of samples against real digits
    fastdiff train    train a digits model (checkpoints, resume; torchrun: DDP)
    fastdiff generate draw many samples into shards (torchrun: sharded across ranks)
    fastdiff info     what this install has: extension, versions, devices, prebuilt kernels
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
    sub.add_parser("info", help="what this install has: extension, versions, devices, "
                   "prebuilt kernels")
    from fastdiff.digits import cli            # the digits application's commands

    cli.add_subcommands(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastdiff.demo import run_demo

        return run_demo(args.device, args.repeats)
    if args.command == "info":
        from fastdiff.info import info_lines

        print("\n".join(info_lines()))
        return 0
    try:
        return cli.run(args)
    except (ValueError, FileNotFoundError) as err:   # bad options or files: no traceback
        parser.exit(2, f"fastdiff {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
