"""Gather every evaluation's metrics.json into RESULTS_ROOT/report.md and report.csv: our numbers beside
the papers', one table per data set and evaluation protocol (utils/tools/report.py)."""
import argparse
import sys
from pathlib import Path

from utils.cli.steps import guarded


def main(argv=None):
    from utils.tools.report import write_report

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results_root", type=Path, default=Path("results"),
                        help="the folder the evaluations' metrics.json files are under (default: results)")
    args = parser.parse_args(argv)
    md_path, csv_path = write_report(args.results_root)
    print(f"report: {md_path} (and {csv_path})")
    return 0


if __name__ == "__main__":
    sys.exit(guarded("report", main))
