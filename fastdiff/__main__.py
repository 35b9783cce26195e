"""The ``fastdiff`` command.

    fastdiff sample   draw digits from the shipped model into a PNG grid (the main command)
    fastdiff eval     conditional accuracy and FD of samples against real digits
    fastdiff train    train a digits model (checkpoints, resume; torchrun: DDP)
    fastdiff generate draw many samples into shards (torchrun: sharded across ranks)
    fastdiff info     what this install has: extension, versions, devices, prebuilt kernels
    fastdiff demo     run the three fused ops against torch and print agreement and time

Every command checks all its arguments before any work. Exit status: 0 done; 2 a bad argument
or input file (``fastdiff <command>: error: ...``, nothing written); 1 the run failed (training
diverged, a write failed), with the same prefix.
"""
from __future__ import annotations

import argparse
import sys

MAX_REPEATS = 10_000          # demo: timed calls per op (time, not memory, is the limit)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as ``fastdiff <command>: error: ...`` first, then the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n{self.format_usage()}")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the fused ops against torch: agreement and time")
    demo.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--repeats", type=int, default=20,
                      help=f"timed calls per op, median kept (1..{MAX_REPEATS})")
    sub.add_parser("info", help="what this install has: extension, versions, devices, "
                   "prebuilt kernels")
    from fastdiff.digits import cli  # the digits application's commands

    cli.add_subcommands(sub)
    args, extra = parser.parse_known_args(argv)
    command = sub.choices[args.command]
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run(args, cli)
    except (ValueError, FileNotFoundError) as err:   # bad arguments or input files
        command.exit(2, f"fastdiff {args.command}: error: {err}\n")
    except (FloatingPointError, OSError) as err:     # the run failed: diverged, a write failed
        command.exit(1, f"fastdiff {args.command}: error: {err}\n")


def _run(args, cli) -> int:
    if args.command == "demo":
        from fastdiff import argcheck
        from fastdiff.demo import run_demo

        argcheck.count("--repeats", args.repeats, hi=MAX_REPEATS)
        argcheck.device("--device", args.device)
        return run_demo(args.device, args.repeats)
    if args.command == "info":
        from fastdiff.info import info_lines

        print("\n".join(info_lines()))
        return 0
    return cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
