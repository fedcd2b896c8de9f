"""Tabulate sweeps: python scripts/report.py <multirun folder> [...] [--format csv] [--group-by KEY ...]."""

import sys
from argparse import Namespace

from mnist_adder.analysis.report import build_report, parse_args
from mnist_adder.cli import guarded


def run(args: Namespace) -> None:
    report, notes = build_report(args.folders, args.format, args.group_by)
    print(report)
    if notes:
        print(notes, file=sys.stderr)


if __name__ == "__main__":
    guarded(run, parse_args())
