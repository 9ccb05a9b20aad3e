"""The ``memnet`` command line."""

from __future__ import annotations

import argparse
import sys

from memnet import cli as core_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    core_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
