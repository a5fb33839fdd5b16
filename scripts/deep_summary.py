#!/usr/bin/env python3
"""Summarise `ncu --set full --page raw --csv` output (a few kernel launches of one
`outproj run`) as markdown: per launch its grid, device time, throughput against the
hardware's peaks, L2 hit rate, occupancy, registers, the tensor pipe's busy share,
shared-memory bank conflicts, and where its warps wait (the three largest stall
reasons, in cycles per issued instruction).

    python3 scripts/deep_summary.py deep-f32-b1-linear_tiled.csv [--title TEXT] > deep.md

The raw page has one row per launch, one column per metric, and a row of units
under the header. Metrics are found by name, so a metric an ncu version lacks reads
"-". Standard library only (and scripts/profile_summary.py beside it).
"""

import argparse
import csv
import re
import sys

from profile_summary import csv_lines, to_us

# (column title, metric name or names (the first one present), unit shown)
COLUMNS = [
    ("µs", "gpu__time_duration.sum", "us"),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", ""),
    ("memory %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", ""),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed", ""),
    ("L2 hit %", "lts__t_sector_hit_rate.pct", ""),
    ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active", ""),
    ("registers", "launch__registers_per_thread", ""),
    ("cycles / issue", "smsp__average_warp_latency_per_inst_issued.ratio", ""),
    # The tensor pipe's busy share (the HMMA kernels' ceiling), and shared-memory
    # bank conflicts of loads and stores (wavefronts beyond one per request).
    ("tensor %", ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                  "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"), ""),
    ("smem ld conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum", "count"),
    ("smem st conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum", "count"),
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(.+)_per_issue_active\.ratio$")


def launches(path):
    """[(row dict, units dict)] of the CSV's data rows (ncu's ==PROF== lines dropped)."""
    rows = list(csv.reader(csv_lines(path)))
    if len(rows) < 3:
        return []
    header, units = rows[0], rows[1]
    unit_of = dict(zip(header, units))
    return [(dict(zip(header, r)), unit_of) for r in rows[2:] if len(r) == len(header)]


def number(text):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def cell(row, units, metrics, unit):
    names = (metrics,) if isinstance(metrics, str) else metrics
    metric = next((m for m in names if number(row.get(m)) is not None), None)
    if metric is None:
        return "-"
    v = number(row[metric])
    if unit == "us":
        return f"{to_us(v, units.get(metric, 'ns')):.2f}"
    return f"{v:.0f}" if metric.startswith("launch__") or unit == "count" else f"{v:.1f}"


def stalls(row, top=3):
    found = []
    for metric, text in row.items():
        m = STALL.match(metric)
        v = number(text)
        if m and v is not None and m.group(1) not in ("selected", "not_selected"):
            found.append((v, m.group(1)))
    found.sort(reverse=True)
    return ", ".join(f"{name} {v:.1f}" for v, name in found[:top]) or "-"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    rows = launches(args.csv)
    if not rows:
        print(f"deep_summary: no kernel launches in {args.csv}", file=sys.stderr)
        return 1
    print(f"### {args.title or args.csv}: {len(rows)} launches\n")
    titles = ["kernel", "grid", "block"] + [t for t, _, _ in COLUMNS] + ["top stalls"]
    print("| " + " | ".join(titles) + " |")
    print("|" + "---|" * len(titles))
    for row, units in rows:
        cells = [f"`{row.get('Kernel Name', '?')}`", row.get("Grid Size", ""),
                 row.get("Block Size", "")]
        cells += [cell(row, units, metric, unit) for _, metric, unit in COLUMNS]
        cells.append(stalls(row))
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
