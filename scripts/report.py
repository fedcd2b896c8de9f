"""Tabulate sweeps: python scripts/report.py <run folders...> [--format csv] [--group-by KEY ...];
with --out DIR, the results page (DIR/index.md, its figures and DIR/runs.json); runs.json in place of the
folders writes the page again from it."""

import sys
from argparse import Namespace

from mnist_adder.cli import guarded
from mnist_adder.reporting.report import build_report, parse_args


def run(args: Namespace) -> None:
    if args.out is not None:
        # Imported here: matplotlib is needed for the page only.
        from mnist_adder.reporting.results_page import build_results

        page, notes = build_results(args.folders, args.out, args.group_by)
        print(f"results page: {page}")
    else:
        report, notes = build_report(args.folders, args.format, args.group_by)
        print(report)
    if notes:
        print(notes if isinstance(notes, str) else "\n".join(notes), file=sys.stderr)


if __name__ == "__main__":
    guarded(run, parse_args())
