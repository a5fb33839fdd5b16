#!/usr/bin/env python3
"""PyTorch's times for the NExT-GPT image projector: the anchor `outproj bench` is
compared with (scripts/compare_bench.py merges the two).

For each precision and batch it times
  * the forward: eager (model.eval(), torch.inference_mode()), and torch.compile in the
    default mode and in "reduce-overhead" (CUDA graphs);
  * each op of one forward at the projector's shapes (the shapes of
    `OpCase::projector_ops` in src/bench.rs): F.linear (cuBLAS), F.layer_norm,
    F.linear with the residual added and F.layer_norm after it, and
    F.scaled_dot_product_attention;
  * the floor: weight bytes plus activation bytes over the measured copy bandwidth.
Every time is the median of many runs after a warm-up, each run synchronised (the
wall time from issue to completion, as `outproj bench` measures it; on CUDA the
device time between two events of the same run too). Inputs rotate among several
buffers; for the ops the buffers together (weights included) exceed twice the L2.

The model is the legacy image preset with seeded random weights. --save-weights writes
them as a NExT-GPT checkpoint that `outproj run --weights` loads; --outproj BIN also
runs that binary on the same weights and input and reports its error against PyTorch.

    python3 scripts/torch_baseline.py --json torch.json --markdown torch.md \\
        --outproj target/release/outproj
    python3 scripts/torch_baseline.py --device cpu --quick --no-compile   # smoke test

Needs torch (and numpy, which torch pulls in); the safetensors package is not needed.
A failed measurement (torch.compile without a working Triton, out of memory, ...)
becomes a row "failed: <reason>" and the rest goes on. Exits 1 when the cross-check
fails.

The cheap measurements come first (eager forwards and ops, every precision and batch),
then torch.compile, batch by batch, as compiling takes tens of seconds each. With
--budget the run stops starting measurements once that many seconds have passed (a
compile also once less time is left than the longest compile so far took); what it
did not start becomes a row "skipped: time budget". The JSON and markdown are
rewritten after every row, so a run stopped from outside keeps what it measured.
"""

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden"))
from nextgpt_model import D_MODEL, HEADS, IN_DIM, full_size, gen, randomize_  # noqa: E402

warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")

# The legacy image preset (SPEC: "Presets").
N_IN, N_OUT, OUT_DIM = 4, 77, 768
PREFIX = "gen_text_hidden_fcs.0."
HEAD_DIM = D_MODEL // HEADS
FFN_DIM = 2048

DTYPES = {"f32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# Whole-projector f32 tolerance (DESIGN: "Testing method").
CROSS_CHECK_TOL = 1e-4


# ---------------------------------------------------------------------------------------
# safetensors without the safetensors package (absent on some GPU machines)
# ---------------------------------------------------------------------------------------

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for raw in blobs:
            f.write(raw)


def load_safetensors(path):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - start, offset=8 + n + start)
        out[name] = raw.view(ST_TORCH[info["dtype"]]).reshape(info["shape"]).clone()
    return out


# ---------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------

class Timer:
    """Runs `fn(*args)` after a warm-up until `seconds` are spent and at least
    `min_runs` times, rotating over the argument sets, synchronising after each run."""

    def __init__(self, device, seconds, min_runs, warmup):
        self.cuda = device.type == "cuda"
        self.seconds, self.min_runs, self.warmup = seconds, min_runs, warmup

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, arg_sets, warmup=None):
        for i in range(self.warmup if warmup is None else warmup):
            fn(*arg_sets[i % len(arg_sets)])
        self.sync()
        gc.collect()
        gc.disable()  # no collector pauses inside a timed run
        try:
            walls, events = [], []
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            deadline = time.perf_counter() + self.seconds
            while len(walls) < self.min_runs or time.perf_counter() < deadline:
                args = arg_sets[len(walls) % len(arg_sets)]
                t0 = time.perf_counter()
                if self.cuda:
                    start.record()
                fn(*args)
                if self.cuda:
                    end.record()
                self.sync()
                walls.append(time.perf_counter() - t0)
                if self.cuda:
                    events.append(start.elapsed_time(end) * 1e3)  # ms -> us
        finally:
            gc.enable()
        return {"median_us": statistics.median(walls) * 1e6, "min_us": min(walls) * 1e6,
                "device_us": statistics.median(events) if events else None, "runs": len(walls),
                "buffers": len(arg_sets)}


def one_line(e):
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:200]


@contextlib.contextmanager
def matmul_precision(precision):
    """f32 is strict IEEE float32 (no TF32), as outproj's f32 path; tf32 allows it."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def sets_for(bytes_per_set, l2_bytes, cuda):
    """Enough argument sets that together they exceed twice the L2 (2..256)."""
    if not cuda:
        return 2
    return max(2, min(256, math.ceil(2 * l2_bytes / max(bytes_per_set, 1))))


def randn(shape, dtype, device, g):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# the ops of one forward, as `OpCase::projector_ops` lists them (image preset)
# ---------------------------------------------------------------------------------------

def projector_ops(batch):
    """(op, shape string as outproj bench prints it, parameters)."""
    m_in, m = batch * N_IN, batch * N_OUT
    ops = [("linear", (m_in, D_MODEL, IN_DIM, "none")), ("linear", (m, 3 * D_MODEL, D_MODEL, "none")),
           ("linear", (m, FFN_DIM, D_MODEL, "relu")), ("linear", (m, D_MODEL, FFN_DIM, "none")),
           ("linear", (m, OUT_DIM, D_MODEL, "none"))]
    rows = [(op, f"{mm}x{n}x{k} {act}", (mm, n, k, act)) for op, (mm, n, k, act) in ops]
    rows.append(("layer_norm", f"{m}x{D_MODEL}", (m, D_MODEL)))
    # The decoder's FFN down and the norm of its output plus the stream.
    rows.append(("linear_layer_norm", f"{m}x{D_MODEL}x{FFN_DIM}", (m, D_MODEL, FFN_DIM)))
    for lk in (N_OUT, N_IN):
        rows.append(("attention", f"B{batch} Lq{N_OUT} Lk{lk} H{HEADS} d{HEAD_DIM}",
                     (batch, N_OUT, lk)))
    return rows


def op_case(op, p, dtype, device, g, l2_bytes):
    """(function, argument sets) for one op; the argument sets include the weights."""
    elem = torch.tensor([], dtype=dtype).element_size()
    if op == "linear":
        m, n, k, act = p

        def make():
            return (randn((m, k), dtype, device, g), randn((n, k), dtype, device, g) / math.sqrt(k),
                    randn((n,), dtype, device, g))

        def fn(x, w, b):
            y = F.linear(x, w, b)
            return torch.relu_(y) if act == "relu" else y
        set_bytes = (m * k + n * k + n + m * n) * elem
    elif op == "layer_norm":
        rows, cols = p

        def make():
            return (randn((rows, cols), dtype, device, g), 1 + 0.2 * randn((cols,), dtype, device, g),
                    0.1 * randn((cols,), dtype, device, g))

        def fn(x, w, b):
            return F.layer_norm(x, (cols,), w, b, 1e-5)
        set_bytes = (2 * rows * cols + 2 * cols) * elem
    elif op == "linear_layer_norm":
        m, n, k = p

        def make():
            return (randn((m, k), dtype, device, g), randn((n, k), dtype, device, g) / math.sqrt(k),
                    randn((n,), dtype, device, g), randn((m, n), dtype, device, g),
                    1 + 0.2 * randn((n,), dtype, device, g), 0.1 * randn((n,), dtype, device, g))

        def fn(x, w, b, r, gamma, beta):
            s = F.linear(x, w, b) + r
            return s, F.layer_norm(s, (n,), gamma, beta, 1e-5)
        set_bytes = (m * k + n * k + 3 * n + 3 * m * n) * elem
    else:
        batch, lq, lk = p

        def make():
            # q [B, Lq, H*d] and packed k|v [B, Lk, 2*H*d], as the projector holds them;
            # heads are column blocks, viewed as [B, H, L, d] without a copy.
            q = randn((batch, lq, D_MODEL), dtype, device, g)
            kv = randn((batch, lk, 2 * D_MODEL), dtype, device, g)

            def heads(t):
                return t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2)
            return heads(q), heads(kv[..., :D_MODEL]), heads(kv[..., D_MODEL:])

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)
        set_bytes = 2 * batch * D_MODEL * (lq + lk) * elem
    n_sets = sets_for(set_bytes, l2_bytes, device.type == "cuda")
    return fn, [make() for _ in range(n_sets)]


# ---------------------------------------------------------------------------------------

def build_model(seed):
    """The legacy image projector with seeded weights, float32 on the CPU."""
    torch.manual_seed(seed)  # nn.Transformer's own init, overwritten below anyway
    model = full_size("legacy", OUT_DIM, N_OUT).float().eval()
    randomize_(model, gen(seed))
    return model


def copy_bandwidth(device, nbytes, timer):
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), [()], warmup=3)
    secs = (t["device_us"] or t["median_us"]) / 1e6
    return 2 * nbytes / secs, t


def cross_check(model, args, work, weights_path):
    """`outproj run` on the same weights and input against PyTorch (f64 and f32)."""
    g = gen(args.seed + 1)
    hidden = torch.randn(2, N_IN, IN_DIM, generator=g)
    embeds = torch.randn(2, N_IN, IN_DIM, generator=g)
    ipath, opath = os.path.join(work, "input.safetensors"), os.path.join(work, "output.safetensors")
    save_safetensors(ipath, {"hidden": hidden, "embeds": embeds})
    with torch.inference_mode():
        want = copy.deepcopy(model).double()(hidden.double(), embeds.double())
        torch_f32 = model(hidden, embeds).double()
    device = args.outproj_device or args.device
    cmd = [args.outproj, "run", "--device", device, "--weights", weights_path, "--modality", "image",
           "--input", ipath, "--output", opath]
    row = {"what": "cross-check", "precision": "f32", "batch": 2, "shape": "image batch 2",
           "command": " ".join(cmd), "outproj_device": device}
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        return {**row, "status": f"failed: outproj: {err[:200]}"}
    got = load_safetensors(opath)["conditioning"].double()
    if got.shape != want.shape:
        return {**row, "status": f"failed: outproj shape {list(got.shape)}, expected {list(want.shape)}"}

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    row.update(rel_outproj_vs_torch_f64=rel(got, want), rel_outproj_vs_torch_f32=rel(got, torch_f32),
               rel_torch_f32_vs_f64=rel(torch_f32, want), tolerance=CROSS_CHECK_TOL)
    ok = row["rel_outproj_vs_torch_f64"] <= CROSS_CHECK_TOL
    row["status"] = "ok" if ok else (
        f"failed: rel {row['rel_outproj_vs_torch_f64']:.2e} > {CROSS_CHECK_TOL:.0e}")
    return row


class Budget:
    """Wall seconds the run may take (None: no limit)."""

    def __init__(self, seconds):
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.longest_compile = 0.0

    def left(self):
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def allows(self, compile_=False):
        """Whether a measurement (a compile with `compile_`) may start now."""
        return self.left() > (self.longest_compile if compile_ else 0.0)


SKIPPED = "skipped: time budget"


def forward_inputs(precision, batch, device, g):
    # The forward's inputs are small: rotate 8 of them (the weights cannot rotate; they
    # are one model, as in outproj bench).
    return [(randn((batch, N_IN, IN_DIM), DTYPES[precision], device, g),) for _ in range(8)]


def forward_row(what, precision, batch, fn, inputs, timer, budget, sink, warmup=None, extra=None):
    row = {"what": what, "precision": precision, "batch": batch, "shape": f"image batch {batch}",
           **(extra or {})}
    if not budget.allows():
        row["status"] = SKIPPED
    else:
        try:
            row.update(timer(fn, inputs, warmup), status="ok")
        except Exception as e:  # recorded, never fatal: the next row may still work
            row["status"] = f"failed: {one_line(e)}"
    sink(row)


def compile_rows(model, precision, batch, args, timer, budget, sink, inputs):
    for mode in args.compile_modes:
        what = f"compile {mode}"
        row = {"what": what, "precision": precision, "batch": batch, "shape": f"image batch {batch}"}
        if not budget.allows(compile_=True):
            sink({**row, "status": SKIPPED})
            continue
        try:
            torch._dynamo.reset()
            compiled = torch.compile(model, mode=mode, dynamic=False)
            if mode == "reduce-overhead" and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                def fn(x, _c=compiled):
                    torch.compiler.cudagraph_mark_step_begin()  # each call a new step
                    return _c(x)
            else:
                fn = compiled
            t0 = time.perf_counter()
            fn(*inputs[0])  # compiles
            timer.sync()
            compile_s = time.perf_counter() - t0
            budget.longest_compile = max(budget.longest_compile, compile_s)
        except Exception as e:
            sink({**row, "status": f"failed: {one_line(e)}"})
            continue
        # CUDA graphs record on the first calls after compiling: warm up longer.
        forward_row(what, precision, batch, fn, inputs, timer, budget, sink,
                    warmup=max(timer.warmup, 5), extra={"compile_s": round(compile_s, 2)})


def op_rows(precision, batch, timer, budget, sink, device, g, l2_bytes):
    for op, shape, p in projector_ops(batch):
        row = {"what": op, "precision": precision, "batch": batch, "shape": shape,
               "impl": {"linear": "F.linear", "layer_norm": "F.layer_norm",
                        "linear_layer_norm": "F.linear + residual + F.layer_norm",
                        "attention": "F.scaled_dot_product_attention"}[op]}
        if not budget.allows():
            row["status"] = SKIPPED
        else:
            try:
                fn, sets = op_case(op, p, DTYPES[precision], device, g, l2_bytes)
                row.update(timer(fn, sets), status="ok")
                del sets
            except Exception as e:
                row["status"] = f"failed: {one_line(e)}"
        sink(row)


def save(result, args):
    """Rewrites the JSON and markdown with every row so far (a reader never sees half a file)."""
    for path, text in ((args.json, lambda: json.dumps(result, indent=1)),
                       (args.markdown, lambda: markdown(result))):
        if path:
            with open(path + ".tmp", "w") as f:
                f.write(text())
            os.replace(path + ".tmp", path)


def log(row):
    t = f"{row['median_us']:.1f} us" if "median_us" in row else row.get("status", "")
    print(f"  {row.get('precision', '-'):>4} b{row.get('batch', '-'):<3} {row['what']:<24} "
          f"{row.get('shape', ''):<28} {t}", file=sys.stderr, flush=True)


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(result):
    env = result["environment"]
    l2 = f"L2 {env['l2_bytes'] / 2**20:.0f} MiB, " if env["l2_bytes"] else ""
    bw = env.get("copy_gbytes_per_s")  # absent while the run is still before it
    bw = f"copy bandwidth {bw:.0f} GB/s" if bw else "copy bandwidth not yet measured"
    lines = [f"# PyTorch baseline: NExT-GPT image projector (legacy), {env['device_name']}", "",
             f"torch {env['torch']}, {env['device']}, {l2}{bw}. Times in µs: the median wall time of one "
             "synchronised run (issue to completion); device µs: CUDA events around the same "
             "run. buffers: argument sets rotated over.", "",
             "| precision | batch | what | shape | median µs | min µs | device µs | runs | buffers "
             "| note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["what"] == "cross-check":
            continue
        note = r.get("note", "")
        if r.get("status", "ok") != "ok":
            note = r["status"]
        elif "compile_s" in r:
            note = f"compile {r['compile_s']:.1f} s"
        lines.append(f"| {r['precision']} | {r['batch']} | {r['what']} | {r['shape']} | "
                     f"{fmt(r.get('median_us'))} | {fmt(r.get('min_us'))} | {fmt(r.get('device_us'))} | "
                     f"{r.get('runs', '-')} | {r.get('buffers', '-')} | {note} |")
    cc = [r for r in result["rows"] if r["what"] == "cross-check"]
    for r in cc:
        lines += ["", f"Cross-check (`{r['command']}`): {r['status']}"]
        if "rel_outproj_vs_torch_f64" in r:
            lines.append("||outproj - torch f64|| / ||torch f64|| = "
                         f"{r['rel_outproj_vs_torch_f64']:.2e}; "
                         f"outproj vs torch f32 {r['rel_outproj_vs_torch_f32']:.2e}; "
                         f"torch f32 vs f64 {r['rel_torch_f32_vs_f64']:.2e}.")
    return "\n".join(lines) + "\n"


def summary(result):
    """One line for gpu-check's table."""
    rows = result["rows"]

    def us(what, precision="f32", batch=1):
        for r in rows:
            if (r["what"], r["precision"], r["batch"]) == (what, precision, batch):
                return (f"{r['median_us']:.0f} us" if "median_us" in r
                        else r.get("status", "failed").split(":")[0])
        return None
    parts = [f"{w} {v}" for w in ("eager", "compile default", "compile reduce-overhead", "floor")
             if (v := us(w)) is not None]
    text = "b1 f32: " + ", ".join(parts) if parts else "no batch-1 f32 rows"
    for r in rows:
        if r["what"] == "cross-check":
            text += ("; cross-check rel %.1e" % r["rel_outproj_vs_torch_f64"]
                     if "rel_outproj_vs_torch_f64" in r else "; cross-check " + r["status"])
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precisions", default="f32,bf16,f16", help="of f32, tf32, bf16, f16")
    ap.add_argument("--batches", help="default 1,8,64 (1 with --quick)")
    ap.add_argument("--seconds", type=float, help="time per measurement (default 0.5; 0 with --quick)")
    ap.add_argument("--min-runs", type=int,
                    help="runs per measurement at least (default 50; 3 with --quick)")
    ap.add_argument("--warmup", type=int, help="warm-up runs (default 10; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: few runs, batch 1")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--compile-modes", default="default,reduce-overhead")
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads for torch")
    ap.add_argument("--save-weights", metavar="PATH", help="write the weights as a checkpoint")
    ap.add_argument("--outproj", metavar="BIN", help="cross-check `BIN run` on the same weights")
    ap.add_argument("--outproj-device", help="device for BIN (default: --device)")
    ap.add_argument("--budget", type=float, metavar="SECONDS",
                    help="start no measurement after this many seconds (see above)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--markdown", metavar="PATH")
    args = ap.parse_args()
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for p in args.precisions:
        if p not in DTYPES:
            ap.error(f"--precisions: unknown {p!r} (f32, tf32, bf16, f16)")
    batches = args.batches or ("1" if args.quick else "1,8,64")
    batches = [int(b) for b in batches.split(",")]
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    seconds = args.seconds if args.seconds is not None else (0.0 if args.quick else 0.5)
    min_runs = args.min_runs or (3 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("torch has no CUDA device here (use --device cpu)")
    timer = Timer(device, seconds, min_runs, warmup)
    props = torch.cuda.get_device_properties(device) if cuda else None
    l2 = (getattr(props, "L2_cache_size", 0) or 50 * 2**20) if cuda else 0  # 50 MiB: H100's
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
           "device_name": props.name if cuda else platform.processor() or platform.machine(),
           "l2_bytes": l2, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "seconds": seconds, "min_runs": min_runs,
           "warmup": warmup}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"unavailable: {one_line(e)}"

    rows = []
    result = {"environment": env, "rows": rows}
    budget = Budget(args.budget)

    def sink(row):
        row.setdefault("device", device.type)
        row["source"] = "torch"
        rows.append(row)
        log(row)
        save(result, args)

    model = build_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    env["parameters"] = n_params

    with tempfile.TemporaryDirectory(prefix="torch-baseline-") as work:
        weights_path = args.save_weights or os.path.join(work, "weights.safetensors")
        if args.save_weights or args.outproj:
            save_safetensors(weights_path, {PREFIX + k: v for k, v in model.state_dict().items()})
            print(f"weights: {weights_path} ({n_params} parameters, f32)", file=sys.stderr)
        if args.outproj:
            row = cross_check(model, args, work, weights_path)
            sink({**row, "device": args.outproj_device or args.device})
            print(f"cross-check: {row['status']}" + (
                f", rel vs torch f64 {row['rel_outproj_vs_torch_f64']:.2e}"
                if "rel_outproj_vs_torch_f64" in row else ""), file=sys.stderr)

    # The floor: bytes that must move at least once, over the copy bandwidth.
    copy_bytes = (1 << 30) if cuda else (32 << 20 if args.quick else 256 << 20)
    bw, t = copy_bandwidth(device, copy_bytes, timer)
    env["copy_gbytes_per_s"] = bw / 1e9
    sink({"what": "copy bandwidth", "precision": "-", "batch": "-",
          "shape": f"{copy_bytes >> 20} MiB read + written", **t, "status": "ok",
          "gbytes_per_s": bw / 1e9, "note": f"{bw / 1e9:.0f} GB/s"})

    g = torch.Generator().manual_seed(args.seed + 2)
    models, inputs = {}, {}
    with torch.inference_mode():
        for precision in args.precisions:
            dtype = DTYPES[precision]
            elem = torch.tensor([], dtype=dtype).element_size()
            models[precision] = copy.deepcopy(model).to(device=device, dtype=dtype)
            with matmul_precision(precision):
                for batch in batches:
                    w_bytes = n_params * elem
                    a_bytes = batch * (N_IN * IN_DIM + N_OUT * OUT_DIM) * elem
                    sink({"what": "floor", "precision": precision, "batch": batch,
                          "shape": f"image batch {batch}", "median_us": (w_bytes + a_bytes) / bw * 1e6,
                          "weight_bytes": w_bytes, "activation_bytes": a_bytes, "status": "ok",
                          "note": f"({w_bytes / 1e6:.1f} MB weights + {a_bytes / 1e6:.2f} MB "
                                  f"activations) / {bw / 1e9:.0f} GB/s"})
                    x = inputs[precision, batch] = forward_inputs(precision, batch, device, g)
                    forward_row("eager", precision, batch, models[precision], x, timer, budget, sink)
                    if not args.no_ops:
                        op_rows(precision, batch, timer, budget, sink, device, g, l2)
        if not args.no_compile:
            for batch in batches:
                for precision in args.precisions:
                    with matmul_precision(precision):
                        compile_rows(models[precision], precision, batch, args, timer, budget, sink,
                                     inputs[precision, batch])

    print(summary(result))
    failed = [r for r in rows if r["what"] == "cross-check" and r["status"] != "ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
