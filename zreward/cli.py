"""``zreward`` command line: one subcommand per module, each module exposing ``add_parser(subparsers)``.

A subcommand module registers its parser with ``set_defaults(run=callable)``; ``main`` calls it with the
parsed arguments.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = ("zreward.train", "zreward.evaluate", "zreward.experiments.demo", "zreward.experiments.ablate",
                      "zreward.refl", "zreward.deploy.score", "zreward.deploy.rank", "zreward.deploy.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zreward", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
