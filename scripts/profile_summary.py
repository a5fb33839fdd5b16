#!/usr/bin/env python3
"""Summarise `ncu --csv --metrics gpu__time_duration.sum` output of one `outproj run`:
every kernel in launch order with its grid and device time, then the time per kernel
name, as markdown.

    python3 scripts/profile_summary.py profile-f32-b1.csv [--title TEXT] > profile-f32-b1.md

`outproj run` also launches what is done once per batch size (the decoder's
input-independent prefix), so a forward is the rows after those. Standard library only.
"""

import argparse
import csv
import sys
from collections import OrderedDict


def csv_lines(path):
    """The CSV lines of an ncu output file: ncu prints its own log lines (==PROF==) too."""
    with open(path, newline="") as f:
        return [line for line in f if line.startswith('"')]


def to_us(value, unit):
    """A time ncu reports in `unit` (ns when unknown), in µs."""
    return value * {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3,
                    "ms": 1e3}.get(unit, 1e-3)


def rows_of(path):
    out = []
    for r in csv.DictReader(csv_lines(path)):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        out.append((r["Kernel Name"], r.get("Grid Size", ""), r.get("Block Size", ""),
                    to_us(value, r.get("Metric Unit", "ns"))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    rows = rows_of(args.csv)
    if not rows:
        print(f"profile_summary: no kernel times in {args.csv}", file=sys.stderr)
        return 1
    total = sum(t for *_, t in rows)
    print(f"### {args.title or args.csv}: {len(rows)} kernels, {total:.1f} µs of device time\n")
    by_name = OrderedDict()
    for name, _, _, t in rows:
        n, s = by_name.get(name, (0, 0.0))
        by_name[name] = (n + 1, s + t)
    print("| kernel | launches | total µs | mean µs | share |")
    print("|---|---|---|---|---|")
    for name, (n, s) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"| `{name}` | {n} | {s:.1f} | {s / n:.2f} | {100 * s / total:.0f} % |")
    print("\n| # | kernel | grid | block | µs |")
    print("|---|---|---|---|---|")
    for i, (name, grid, block, t) in enumerate(rows):
        print(f"| {i} | `{name}` | {grid} | {block} | {t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
