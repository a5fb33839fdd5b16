#!/usr/bin/env python3
"""Merge `outproj bench --json` output(s) with scripts/torch_baseline.py's JSON into one
markdown table per precision and batch, and mark the performance targets.

    python3 scripts/compare_bench.py --ours bench-cuda.json [--ours bench-cuda-bf16.json ...] \\
        --torch torch-baseline.json [--out comparison.md]

Our rows: `projector` and `projector graph` (CUDA-graph replay) are our forward; `linear`,
`layer_norm` and `attention` are matched to PyTorch's F.linear, F.layer_norm and
F.scaled_dot_product_attention by shape. A row's precision is its `precision` field, else
the file name's `-<precision>[-b<batch>].json` suffix (bench-cuda-bf16.json,
bench-cuda-bf16-b64.json), else f32. `outproj
bench` lists each batch's op rows after that batch's projector rows, which gives their
batch. Both sides are compared on `median_us`: the median wall time of one run from
issue to completion, synchronised after each run (an op row's note adds ours back to back,
`burst_us`, and a forward row's the host's part, `host_us`: launching or replaying, where
present). Missing rows read "not measured".
Standard library only.
"""

import argparse
import json
import os
import re
import sys

PRECISIONS = ["f32", "tf32", "bf16", "f16"]
FORWARD_OURS = ["projector graph", "projector"]  # best first
# The graph again with one of the forward's features off (present where the forward
# uses it), to show what it gains: (bench row, label, feature).
GRAPH_WITHOUT = [
    ("projector graph serial", "projector graph serial launches", "dependent launch"),
    # Through memory, the decoder's norms no longer fold into their split GEMMs either.
    ("projector graph split-K in memory", "projector graph split-K in memory",
     "cluster split-K (and the decoder's folded norms)"),
    ("projector graph layer_norms apart", "projector graph layer_norms apart",
     "folded layer_norms"),
    ("projector graph attention apart", "projector graph attention apart",
     "folded attention"),
    ("projector graph mma.sync", "projector graph mma.sync", "warpgroup MMA (v6)"),
    ("projector graph literal cross-attention", "projector graph literal cross-attention",
     "absorbed cross-attention"),
    ("projector graph query-block attention", "projector graph query-block attention",
     "split-keys attention"),
]
TORCH_FORWARD = [("eager", "PyTorch eager"), ("compile default", "torch.compile (default)"),
                 ("compile reduce-overhead", "torch.compile (reduce-overhead, CUDA graphs)")]
OPS = {"attention": "F.scaled_dot_product_attention", "layer_norm": "F.layer_norm",
       "linear": "F.linear (cuBLAS)",
       "linear_layer_norm": "F.linear + residual + F.layer_norm"}
# Our op again on another kernel (present where the op takes a different one there):
# (op, our row, label).
OP_BASELINES = [("linear", "linear mma.sync", "v5 mma.sync"),
                ("linear", "linear wgmma serial", "v6 serial K loop"),
                ("linear", "linear wmma", "v3 WMMA"),
                ("linear", "linear square", "v5 128x128 tiles"),
                ("attention", "attention q-blocks", "query blocks (v2/v3)")]


def load_ours(paths, device):
    """{(precision, batch, what, shape): row} for `device`'s rows."""
    rows = {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"compare_bench: skipping {path}: {e}", file=sys.stderr)
            continue
        m = re.search(r"-(%s)(?:-b\d+)?\.json$" % "|".join(PRECISIONS), os.path.basename(path))
        file_precision = m.group(1) if m else "f32"
        batch = None
        for r in data if isinstance(data, list) else []:
            what = r.get("what", "")
            b = re.search(r"batch (\d+)$", r.get("shape", ""))
            if what.startswith("projector") and b:
                batch = int(b.group(1))
            if r.get("device") != device or what.endswith(" v1"):
                continue
            key = (r.get("precision") or file_precision, batch, what, r.get("shape", ""))
            rows[key] = r
    return rows


def load_torch(path):
    if not path:
        return {}, {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"compare_bench: skipping {path}: {e}", file=sys.stderr)
        return {}, {}
    rows = {(r.get("precision"), r.get("batch"), r.get("what"), r.get("shape", "")): r
            for r in data.get("rows", []) if r.get("what") != "cross-check"}
    env = dict(data.get("environment", {}))
    env["cross_checks"] = [r for r in data.get("rows", []) if r.get("what") == "cross-check"]
    return rows, env


def us(row):
    """A row's median in µs, or None when absent or failed."""
    if row is None or row.get("median_us") is None:
        return None
    return row["median_us"]


def fmt_us(v, unit=""):
    if v is None:
        return "not measured"
    return (f"{v:.0f}" if v >= 100 else f"{v:.1f}") + unit


def ratio(theirs, ours):
    if theirs is None or ours is None or ours <= 0:
        return "-"
    return f"{theirs / ours:.2f}x"


def why(row):
    """'failed: ...' or 'skipped: ...' for a PyTorch row not measured, else ''."""
    if row is not None and str(row.get("status", "ok")).startswith(("failed", "skipped")):
        return row["status"]
    return ""


class Data:
    def __init__(self, ours, torch):
        self.ours, self.torch = ours, torch

    def best_forward(self, precision, batch):
        """(row name, µs) of our fastest forward, graph replay preferred when present."""
        for what in FORWARD_OURS:
            r = self.ours.get((precision, batch, what, f"image batch {batch}"))
            if us(r) is not None:
                return what, us(r)
        return None, None

    def ours_forward(self, precision, batch, what):
        return us(self.ours.get((precision, batch, what, f"image batch {batch}")))

    def torch_row(self, precision, batch, what, shape=None):
        return self.torch.get((precision, batch, what, shape or f"image batch {batch}"))

    def best_compile(self, precision, batch):
        times = [us(self.torch_row(precision, batch, w)) for w in ("compile default",
                                                                   "compile reduce-overhead")]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def op_pairs(self, precision, batch):
        """[(op, shape, ours µs, torch row)] for the ops both sides know."""
        # In the order the benches list them (dict keys keep it), grouped by op.
        shapes = dict.fromkeys((w, s) for (p, b, w, s) in list(self.torch) + list(self.ours)
                               if p == precision and b == batch and w in OPS)
        out = []
        for op, shape in sorted(shapes, key=lambda k: list(OPS).index(k[0])):
            out.append((op, shape, us(self.ours.get((precision, batch, op, shape))),
                        self.torch.get((precision, batch, op, shape))))
        return out

def op_kernel_us(row):
    """An op row's kernel time: back to back (`burst_us`) where measured, else CUDA
    events, else wall time."""
    if row is None:
        return None
    for key in ("burst_us", "device_us", "median_us"):
        if row.get(key) is not None:
            return row[key]
    return None


# Checks for PREDICTIONS: (claim, check), check(d) -> (measured, holds), holds None
# where a row is missing.
def forward_within(precision, batch, low, high):
    def check(d):
        what, t = d.best_forward(precision, batch)
        if t is None:
            return "not measured", None
        return f"{what} {fmt_us(t, ' µs')}", t <= high
    return (f"{precision} batch {batch}: {low}-{high} µs", check)


def op_faster(precision, batch, op, shape, baseline, factor):
    def check(d):
        ours = op_kernel_us(d.ours.get((precision, batch, op, shape)))
        base = op_kernel_us(d.ours.get((precision, batch, f"{op} {baseline}", shape)))
        if ours is None or base is None:
            return "not measured", None
        return (f"{fmt_us(base, ' µs')} / {fmt_us(ours, ' µs')} = {base / ours:.2f}x",
                base >= factor * ours)
    return (f"{precision} `{op}` {shape}: ≥ {factor}x faster than `{op} {baseline}`", check)


def op_within(precision, batch, op, shape, limit):
    def check(d):
        t = op_kernel_us(d.ours.get((precision, batch, op, shape)))
        if t is None:
            return "not measured", None
        return fmt_us(t, " µs"), t <= limit
    return (f"{precision} `{op}` {shape}: ≤ {limit} µs", check)


def graph_gain(precision, batch, without, at_least):
    def check(d):
        graph = d.ours_forward(precision, batch, "projector graph")
        other = d.ours_forward(precision, batch, without)
        if graph is None or other is None:
            return "not measured", None
        return f"{fmt_us(other - graph, ' µs')} slower", other - graph >= at_least
    return (f"{precision} batch {batch}: `{without}` ≥ {at_least} µs slower than "
            "`projector graph`", check)


# The untimed rounds' predictions, each with what docs/PERFORMANCE.md says would refute
# it: (round, claim, check). A round that changes the forward updates its range here.
PREDICTIONS = [
    ("all rounds so far", *forward_within("bf16", 1, 95, 210)),
    ("all rounds so far", *forward_within("f32", 1, 85, 220)),
    ("all rounds so far", *forward_within("bf16", 64, 700, 1140)),
    ("9: split-keys attention", *op_faster("bf16", 1, "attention", "B1 Lq77 Lk77 H4 d128",
                                           "q-blocks", 3)),
    ("9: split-keys attention", *op_faster("f32", 1, "attention", "B1 Lq77 Lk77 H4 d128",
                                           "q-blocks", 3)),
    ("10: warpgroup MMA (v6)", *op_faster("bf16", 64, "linear", "4928x2048x512 relu",
                                          "mma.sync", 1.5)),
    ("10: warpgroup MMA (v6)", *op_faster("bf16", 64, "linear", "4928x512x2048 none",
                                          "mma.sync", 1.5)),
    ("11: absorbed cross-attention", *op_within("bf16", 1, "attention_absorbed",
                                                "B1 Lq77 Lk4 H4 C512", 4)),
    ("11: absorbed cross-attention", *graph_gain("bf16", 1,
                                                 "projector graph literal cross-attention", 12)),
    ("11: absorbed cross-attention", *graph_gain("f32", 1,
                                                 "projector graph literal cross-attention", 12)),
    ("12: v6 one MMA group in flight", *op_faster("bf16", 64, "linear", "4928x2048x512 relu",
                                                  "wgmma serial", 1.05)),
    ("12: v6 one MMA group in flight", *op_faster("bf16", 64, "linear", "4928x1536x512 none",
                                                  "wgmma serial", 1.05)),
]


def predictions(d):
    """[(round, claim, measured, verdict)]"""
    out = []
    for round_, claim, check in PREDICTIONS:
        measured, holds = check(d)
        verdict = "not measured" if holds is None else ("holds" if holds else "**refuted**")
        out.append((round_, claim, measured, verdict))
    return out


def targets(d):
    """[(target, ours, reference, status)]"""
    out = []

    def mark(ok):
        return "met" if ok else "**not met**"

    for precision, limit in (("f32", 150.0), ("bf16", 80.0)):
        what, t = d.best_forward(precision, 1)
        name = f"batch 1 {precision} ≤ {limit:.0f} µs with graph replay"
        if t is None:
            out.append((name, "not measured", f"{limit:.0f} µs", "not measured"))
        else:
            note = "" if what == "projector graph" else " (plain forward; no graph row)"
            out.append((name, fmt_us(t, " µs") + note, f"{limit:.0f} µs", mark(t <= limit)))
    used = sorted({k[0] for k in list(d.ours) + list(d.torch) if k[0] in PRECISIONS},
                  key=PRECISIONS.index) or ["f32"]
    for precision in used:
        _, t = d.best_forward(precision, 1)
        eager = us(d.torch_row(precision, 1, "eager"))
        name = f"batch 1 {precision} ≥ 10x faster than PyTorch eager"
        if t is None or eager is None:
            out.append((name, fmt_us(t, " µs"), fmt_us(eager, " µs"), "not measured"))
        else:
            ref = f"eager {fmt_us(eager, ' µs')} ({eager / t:.1f}x)"
            out.append((name, fmt_us(t, " µs"), ref, mark(eager >= 10 * t)))
    for precision in used:
        _, t = d.best_forward(precision, 1)
        comp = d.best_compile(precision, 1)
        name = f"batch 1 {precision} faster than torch.compile"
        if t is None or comp is None:
            out.append((name, fmt_us(t, " µs"), fmt_us(comp, " µs"), "not measured"))
        else:
            out.append((name, fmt_us(t, " µs"), f"best compile {fmt_us(comp, ' µs')}",
                        mark(t < comp)))
    what, t = d.best_forward("bf16", 64)
    name = "batch 64 bf16 ≤ 1 ms"
    out.append((name, fmt_us(t, " µs"), "1000 µs",
                "not measured" if t is None else mark(t <= 1000)))
    for precision in used:
        pairs = [(s, o, us(r)) for b in sorted({k[1] for k in d.torch if isinstance(k[1], int)})
                 for op, s, o, r in d.op_pairs(precision, b) if op == "attention"]
        both = [(s, o, t) for s, o, t in pairs if o is not None and t is not None]
        name = f"attention {precision} no slower than SDPA (projector shapes)"
        if not both:
            out.append((name, "not measured", "", "not measured"))
            continue
        slow = [s for s, o, t in both if o > t]
        worst = max(o / t for _, o, t in both)
        ref = f"{len(both)} of {len(pairs)} shapes measured; worst ours/SDPA {worst:.2f}"
        out.append((name, f"slower at {', '.join(slow)}" if slow else "all shapes",
                    ref, mark(not slow)))
    return out


def render(d, env, ours_device, inputs):
    lines = ["# outproj vs PyTorch: NExT-GPT image projector (legacy preset)", ""]
    if env:
        lines.append(f"PyTorch {env.get('torch', '?')} on {env.get('device_name', '?')} "
                     f"({env.get('device', '?')}); copy bandwidth "
                     f"{env.get('copy_gbytes_per_s', 0):.0f} GB/s.")
    lines.append(f"outproj rows: device `{ours_device}`. Inputs: {', '.join(inputs)}.")
    lines.append("Times: median µs of one run, issue to completion, synchronised after each "
                 "run, on both sides. Ratios > 1: ours is faster.")
    if ours_device == "reference":
        lines.append("(outproj's `reference` device is the float64 oracle, not a fast path.)")
    for r in env.get("cross_checks", []):
        rel = r.get("rel_outproj_vs_torch_f64")
        lines.append("Same weights, cross-check of `outproj run --device "
                     f"{r.get('outproj_device')}` against PyTorch float64: {r.get('status')}"
                     + (f", relative error {rel:.2e}." if rel is not None else "."))
    lines += ["", "## Targets", "", "| target | ours | reference | status |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {s} |" for a, b, c, s in targets(d)]
    lines += ["", "## Predictions (docs/PERFORMANCE.md) and what would refute them", "",
              "A forward range holds unless the time is above it. Op rows: kernel time "
              "(back to back where measured).", "",
              "| round | prediction | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {v} |" for a, b, c, v in predictions(d)]

    keys = list(d.ours) + list(d.torch)
    precisions = sorted({k[0] for k in keys if k[0] in PRECISIONS}, key=PRECISIONS.index)
    for precision in precisions:
        batches = sorted({k[1] for k in keys if k[0] == precision and isinstance(k[1], int)})
        for batch in batches:
            lines += ["", f"## {precision}, batch {batch}", "",
                      "| what | shape | ours µs | PyTorch µs | PyTorch / ours | note |",
                      "|---|---|---|---|---|---|"]
            shape = f"image batch {batch}"
            for what in reversed(FORWARD_OURS):
                t = d.ours_forward(precision, batch, what)
                host = (d.ours.get((precision, batch, what, shape)) or {}).get("host_us")
                note = f"host {fmt_us(host)} µs until the call returned" if host is not None else ""
                lines.append(f"| ours: {what} | {shape} | {fmt_us(t)} | | | {note} |")
            graph = d.ours_forward(precision, batch, "projector graph")
            for what, label, feature in GRAPH_WITHOUT:
                without = d.ours_forward(precision, batch, what)
                if without is None:
                    continue
                note = f"{feature} {without / graph:.2f}x faster" if graph else ""
                lines.append(f"| ours: {label} | {shape} | {fmt_us(without)} | | | {note} |")
            best_name, best = d.best_forward(precision, batch)
            for what, label in TORCH_FORWARD:
                r = d.torch_row(precision, batch, what)
                note = why(r) or (f"vs ours {best_name}" if best is not None and us(r) else "")
                lines.append(f"| {label} | {shape} | {fmt_us(best)} | {fmt_us(us(r))} | "
                             f"{ratio(us(r), best)} | {note} |")
            floor = us(d.torch_row(precision, batch, "floor"))
            note = (f"ours at {best / floor:.1f}x the floor" if floor and best is not None else "")
            lines.append(f"| floor: bytes / copy bandwidth | {shape} | {fmt_us(best)} | "
                         f"{fmt_us(floor)} | | {note} |")
            for op, s, o, r in d.op_pairs(precision, batch):
                burst = (d.ours.get((precision, batch, op, s)) or {}).get("burst_us")
                note = why(r) or (f"ours {burst:.1f} µs per run back to back" if burst else "")
                for base_op, what, label in OP_BASELINES:
                    base = us(d.ours.get((precision, batch, what, s)))
                    if base_op == op and base is not None and o:
                        note += f"{'; ' if note else ''}{label} {base:.1f} µs ({base / o:.2f}x ours)"
                lines.append(f"| {op} vs {OPS[op]} | {s} | {fmt_us(o)} | {fmt_us(us(r))} | "
                             f"{ratio(us(r), o)} | {note} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours", action="append", default=[], metavar="JSON",
                    help="`outproj bench --json` output (repeatable)")
    ap.add_argument("--torch", metavar="JSON", help="scripts/torch_baseline.py --json output")
    ap.add_argument("--device", help="our rows' device (default: PyTorch's, else cuda)")
    ap.add_argument("--out", metavar="PATH", help="also write the markdown here")
    args = ap.parse_args()
    torch_rows, env = load_torch(args.torch)
    device = args.device or (env.get("device", "cuda").split(":")[0] if env else "cuda")
    ours = load_ours(args.ours, device)
    inputs = [os.path.basename(p) for p in args.ours + ([args.torch] if args.torch else [])]
    text = render(Data(ours, torch_rows), env, device, inputs or ["none"])
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
