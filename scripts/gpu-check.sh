#!/usr/bin/env bash
# Checks a prebuilt `outproj` on a machine with an NVIDIA GPU (no Rust needed):
#
#   scripts/gpu-check.sh                      # uses target/release/outproj
#   OUTPROJ=/path/to/outproj OUT=results scripts/gpu-check.sh
#
# Steps (each one's full output goes to a log file in the output folder; the
# step groups after `info` run in the order $STEPS lists them):
#   nvidia-smi       the GPU and driver (skipped without nvidia-smi)
#   nvrtc            finds libnvrtc.so.13 (CUDA 13.0; from a CUDA toolkit or the
#                    nvidia-cuda-nvrtc wheel PyTorch installs) and puts its folder
#                    on LD_LIBRARY_PATH for the steps below
#   vulkan           finds the Vulkan loader wgpu needs, or unpacks the .debs in
#                    $VULKAN_DEBS (libvulkan1 and the GL dispatch libraries)
#                    where the machine has none, and points the loader at
#                    $NVIDIA_ICD where its own folders name no NVIDIA driver
#                    (skipped without either loader)
#   info             outproj info
#   kernels          outproj kernels --arch native --kernel-cache: every kernel
#                    compiled in parallel into the kernel cache the steps below
#                    load from (the cache is on: OUTPROJ_KERNEL_CACHE defaults to
#                    1 here; 0 turns the cache and this step off); skipped
#                    without a CUDA device or with STEPS=none
#   check-cuda       outproj check --device cuda (f32); group `check`
#   check-cuda-<p>   the same for each precision in $CHECK_PRECISIONS, where the
#                    binary has --precision; group `check-precisions`
#   bench-cuda       outproj bench --device cuda --json, once per batch in $BATCHES
#                    (a fault at one batch leaves the others' rows) and, when the
#                    binary has --precision, per precision in $PRECISIONS (steps
#                    bench-cuda[-<precision>]-b<batch>); JSON in bench-cuda*.json
#   torch-baseline   scripts/torch_baseline.py with $TORCH_PYTHON: PyTorch eager and
#                    torch.compile, its ops, the copy-bandwidth floor, and a cross-check
#                    of `outproj run --device cuda` on the same weights; writes
#                    torch-baseline.json and .md (skipped without torch or its CUDA)
#   compare          scripts/compare_bench.py: ours vs PyTorch per precision and batch,
#                    with the performance targets and the untimed rounds' predictions
#                    (held or refuted), into comparison.md (and printed)
#   profile-<p>-b<n> ncu (gpu__time_duration only, caches and clocks left alone)
#                    over one `outproj run --precision <p> --batch <n>` for each
#                    precision in $PROFILE_PRECISIONS and batch in $PROFILE_BATCHES:
#                    every kernel's device time, summarised by
#                    scripts/profile_summary.py into profile-<p>-b<n>.md
#   deep-<p>-b<n>-<k> ncu --set full on a few launches of one kernel family in one
#                    `outproj run --precision <p> --batch <n>`, for each target in
#                    $DEEP_TARGETS: throughputs, L2 hit rate, occupancy and the
#                    largest warp stall reasons, summarised by scripts/deep_summary.py
#                    into deep-<p>-b<n>-<k>.md (ncu's default cache flush and locked
#                    clocks: for where the time goes, not for the time itself)
#   memcheck,        compute-sanitizer --tool <tool> on $SANITIZER_RUN (default: a
#   racecheck        check; with QUICK=1 one forward each in f32, tf32 and bf16 at
#                    batch 2, and under memcheck bf16 at batch 64),
#                    for each tool in $SANITIZER_TOOLS (skipped without
#                    compute-sanitizer)
#   check-wgpu,      the same check and bench on wgpu, when `outproj info` reports
#   bench-wgpu       a wgpu adapter that is a real GPU (the NVIDIA Vulkan driver)
# then prints one table: step, status, key figure. Exits non-zero when any step
# failed. A failed step does not stop the ones after it; a step the time budget
# (BUDGET) leaves no room for is recorded as skipped.
#
# Environment:
#   QUICK              1: a run within BUDGET=480 s on an H100/H200 (batches 1,64;
#                      f32 and bf16; 0.2 s per measurement; torch.compile in
#                      reduce-overhead mode only; sanitizers on forwards, not a check;
#                      four deep targets: the split GEMMs, the batch-64 tiles and
#                      the batch-64 tiles with the LayerNorm after them), the groups
#                      in the order the acceptance needs them: check bench torch
#                      compare check-precisions profile sanitizer deep wgpu
#   BUDGET             seconds the whole script may take (default: no limit; 480
#                      with QUICK=1, for a 10-minute slot). Each step's timeout is
#                      cut to what is left before the last RESERVE seconds (default
#                      45: compare and the summary), a step with less than MIN_STEP
#                      seconds (default 20) left is skipped, and the PyTorch step is
#                      told to stop starting measurements in time
#                      (torch_baseline.py --budget)
#   OUTPROJ            the binary (default: target/release/outproj next to this script)
#   OUT                output folder (default: ./gpu-check-<date>)
#   BATCHES            bench batch sizes (default: 1,8,64)
#   PRECISIONS         outproj bench precisions, where it has --precision
#                      (default: "f32 tf32 f16 bf16")
#   CHECK_PRECISIONS   outproj check precisions besides f32 (default: "tf32 f16 bf16")
#   BENCH_SECONDS      outproj bench --seconds (default: 1)
#   STEPS              step groups, run in the order given (default: "check
#                      check-precisions bench torch compare profile deep sanitizer
#                      wgpu"; "none": only info and the setup steps, which always
#                      run first)
#   PROFILE_PRECISIONS precisions profiled with ncu (default: "f32 bf16")
#   PROFILE_BATCHES    batch sizes profiled with ncu (default: "1 64")
#   DEEP_TARGETS       what `deep` profiles, as precision:batch:kernel-regex:skip:count
#                      (launches of kernels matching the regex, after skipping some);
#                      default: the 77-row split GEMMs of the decoder (f32 and bf16),
#                      the few-row GEMMs (`linear_rows` also matches the encoder's
#                      layer_norm_linear_rows), the batch-64 large tiles on
#                      warpgroup MMA (and those with the LayerNorm after them:
#                      linear_layer_norm_wgmma; on a GPU without wgmma, use
#                      linear_mma and linear_layer_norm_mma), the
#                      decoder's own layer_norm kernels and the batch-64 f32 attention
#                      (self: attention_flash; cross, over the 4 signal tokens:
#                      attention_few_keys), the batch-1 bf16 self-attention
#                      (attention_split_keys) and the absorbed cross-attention
#                      at batch 1 and 64 (attention_absorbed)
#   TORCH_PYTHON       the python with torch (default: python3)
#   TORCH_PRECISIONS   PyTorch precisions (default: f32,bf16,f16)
#   TORCH_TIMEOUT      seconds for the PyTorch step (default: 3600; torch.compile
#                      compiles once per precision, batch and mode)
#   SANITIZER_TOOLS    compute-sanitizer tools (default: "memcheck racecheck";
#                      synccheck and initcheck also work)
#   STEP_TIMEOUT       seconds per plain step (default: 1800)
#   SANITIZER_TIMEOUT  seconds per sanitizer step (default: 5400)
#   VULKAN_DEBS        folder with the amd64 .debs of libvulkan1 and the GL
#                      dispatch libraries, for a machine without a Vulkan loader
#                      (default: .gpu-deps; fill it with
#                      `source scripts/env.sh && outproj_fetch_vulkan_loader`, and
#                      carry it with the binary)
#   NVIDIA_ICD         the NVIDIA driver's Vulkan manifest (default:
#                      /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json)
#   OUTPROJ_KERNEL_CACHE  the kernel cache (default here: 1, the default folder;
#                      a folder; 0 for none)
set -u

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$script_dir/.." && pwd)
OUTPROJ=${OUTPROJ:-$root/target/release/outproj}
OUT=${OUT:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S)}
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    BATCHES=${BATCHES:-1,64}
    PRECISIONS=${PRECISIONS:-f32 bf16}
    CHECK_PRECISIONS=${CHECK_PRECISIONS:-bf16 tf32}  # bf16 first: the 16-bit kernels
    BENCH_SECONDS=${BENCH_SECONDS:-0.2}
    TORCH_PRECISIONS=${TORCH_PRECISIONS:-f32,bf16}
    TORCH_ARGS=${TORCH_ARGS:---seconds 0.2 --compile-modes reduce-overhead}
    SANITIZER_RUN=${SANITIZER_RUN:-forwards}
    # What the acceptance needs first: both sides' times and the comparison.
    STEPS=${STEPS:-check bench torch compare check-precisions profile sanitizer deep wgpu}
    BUDGET=${BUDGET:-480}
    DEEP_TARGETS=${DEEP_TARGETS:-f32:1:linear_tiled:3:3 bf16:1:linear_tc_vec8:3:2 bf16:64:linear_wgmma:0:1 bf16:64:linear_layer_norm_wgmma:0:1}
fi
BATCHES=${BATCHES:-1,8,64}
PRECISIONS=${PRECISIONS:-f32 tf32 f16 bf16}
CHECK_PRECISIONS=${CHECK_PRECISIONS:-tf32 f16 bf16}
BENCH_SECONDS=${BENCH_SECONDS:-1}
TORCH_ARGS=${TORCH_ARGS:-}
SANITIZER_RUN=${SANITIZER_RUN:-check}
STEP_GROUPS="check check-precisions bench torch compare profile deep sanitizer wgpu"
# Step groups to run, in this order; the others are recorded as skipped (split a
# long check over several calls with the same binary).
STEPS=${STEPS:-$STEP_GROUPS}
BUDGET=${BUDGET:-}
RESERVE=${RESERVE:-45}
MIN_STEP=${MIN_STEP:-20}
PROFILE_PRECISIONS=${PROFILE_PRECISIONS:-f32 bf16}
PROFILE_BATCHES=${PROFILE_BATCHES:-1 64}
DEEP_TARGETS=${DEEP_TARGETS:-f32:1:linear_tiled:3:4 bf16:1:linear_tc_vec8:3:3 f32:1:linear_rows:0:3 bf16:64:linear_wgmma:0:2 bf16:64:linear_layer_norm_wgmma:0:2 f32:1:layer_norm_warp:0:2 f32:64:attention_flash:0:1 f32:64:attention_few_keys:0:1 bf16:1:attention_split_keys:0:1 bf16:1:attention_absorbed:0:1 bf16:64:attention_absorbed:0:1}
TORCH_PYTHON=${TORCH_PYTHON:-python3}
TORCH_PRECISIONS=${TORCH_PRECISIONS:-f32,bf16,f16}
TORCH_TIMEOUT=${TORCH_TIMEOUT:-3600}
SANITIZER_TOOLS=${SANITIZER_TOOLS:-memcheck racecheck}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}
SANITIZER_TIMEOUT=${SANITIZER_TIMEOUT:-5400}
VULKAN_DEBS=${VULKAN_DEBS:-$root/.gpu-deps}
NVIDIA_ICD=${NVIDIA_ICD:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}

want() { [[ " $STEPS " == *" $1 "* ]]; }

deadline=""
if [[ -n $BUDGET ]]; then
    deadline=$((SECONDS + BUDGET))
fi

# starts NAME: whether step NAME may start: true without a BUDGET, else while at
# least MIN_STEP seconds are left before the RESERVE; otherwise NAME is recorded
# as skipped (not a failure: it was not run).
starts() {
    [[ -z $deadline ]] && return 0
    ((deadline - SECONDS - RESERVE >= MIN_STEP)) && return 0
    record "$1" skip "the time budget is spent (BUDGET=$BUDGET s)"
    return 1
}

steps=()
statuses=()
figures=()
failures=0

record() { # step status figure
    local fig=${3//$'\n'/ }
    if ((${#fig} > 120)); then
        fig="${fig:0:117}..."
    fi
    steps+=("$1")
    statuses+=("$2")
    figures+=("$fig")
    if [[ $2 == FAIL ]]; then
        failures=$((failures + 1))
    fi
    printf '[gpu-check] %-20s %-5s %s\n' "$1" "$2" "$fig" >&2
}

summary() {
    local i table
    table=$(
        printf '%-20s %-6s %s\n' step status "key figure"
        printf '%-20s %-6s %s\n' -------------------- ------ ----------
        for i in "${!steps[@]}"; do
            printf '%-20s %-6s %s\n' "${steps[$i]}" "${statuses[$i]}" "${figures[$i]}"
        done
    )
    echo
    echo "$table"
    if [[ -d $OUT ]]; then
        echo "$table" >"$OUT/summary.txt"
        echo "logs: $OUT"
    fi
    if ((failures > 0)); then
        echo "$failures step(s) failed"
    else
        echo "all steps passed or were skipped"
    fi
}

on_exit() {
    local rc=$?
    trap - EXIT
    summary
    [[ -n ${unpacked:-} ]] && rm -rf "$unpacked"
    if ((failures > 0)); then
        exit 1
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'record interrupted FAIL "stopped by a signal"; exit 130' INT TERM

# run_step NAME TIMEOUT CMD...: stdout to NAME.out, stderr to NAME.err, both to
# NAME.log; returns the command's status (124 on timeout).
run_step() {
    local name=$1 limit=$2
    shift 2
    local rc cut=0
    if [[ -n $deadline ]] && ((deadline - SECONDS - RESERVE < limit)); then
        # Never under MIN_STEP: compare runs within the reserve.
        limit=$((deadline - SECONDS - RESERVE))
        ((limit < MIN_STEP)) && limit=$MIN_STEP
        cut=1
    fi
    {
        echo "\$ $*"
        echo "# started $(date -Is)"
    } >"$OUT/$name.log"
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
        rc=$?
        if [[ $rc == 124 || $rc == 137 ]]; then
            if ((cut)); then
                echo "gpu-check: stopped after ${limit}s, where the time budget (BUDGET=$BUDGET) ran out"
            else
                echo "gpu-check: stopped after ${limit}s (the step's timeout)"
            fi >>"$OUT/$name.err"
        fi
    else
        "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
        rc=$?
    fi
    {
        cat "$OUT/$name.out"
        if [[ -s $OUT/$name.err ]]; then
            echo "# stderr:"
            cat "$OUT/$name.err"
        fi
        echo "# finished $(date -Is), exit status $rc"
    } >>"$OUT/$name.log"
    return "$rc"
}

# The last non-empty line of a step's stderr (the error `outproj` printed).
last_error() {
    local line
    line=$(grep -v '^[[:space:]]*$' "$OUT/$1.err" 2>/dev/null | tail -n 1)
    [[ -z $line ]] && line=$(grep -v '^[[:space:]]*$' "$OUT/$1.out" 2>/dev/null | tail -n 1)
    printf '%s' "${line:0:100}"
}

status_of() { # exit status -> ok / FAIL
    if [[ $1 == 0 ]]; then echo ok; else echo FAIL; fi
}

# "N ok, M failed, worst rel X" from an `outproj check` table.
check_figure() {
    awk '
        ($NF == "ok" || $NF == "FAIL") && NF >= 7 {
            if ($NF == "ok") ok++; else bad++
            rel = $(NF - 3) + 0
            if (rel > worst) worst = rel
        }
        END { if (ok + bad > 0) printf "%d ok, %d failed, worst rel %.2e", ok, bad, worst }
    ' "$OUT/$1.out"
}

# "batch 1: X us (graph Y us, N kernels), ..." (the projector's median device
# time, else wall time) from `outproj bench --json`.
bench_figure() {
    local json=$OUT/$1.out
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$json" <<'EOF' 2>/dev/null || echo "unparsable JSON: see $1.out"
import json, sys
rows = json.load(open(sys.argv[1]))
def us(r):
    return r["device_us"] if r.get("device_us") is not None else r["median_us"]
graph = {r["shape"]: r for r in rows if r.get("what") == "projector graph"}
parts = []
for r in rows:
    if r.get("what") == "projector":
        g = graph.get(r["shape"])
        extra = " (graph %.0f us, %s kernels)" % (us(g), g.get("launches")) if g else ""
        parts.append("batch %s: %.0f us%s" % (r["shape"].split()[-1], us(r), extra))
print(", ".join(parts) or "no projector rows")
EOF
    else
        echo "$(grep -c '"projector"' "$json") projector rows (python3 missing: see $1.out)"
    fi
}

# The folder holding libnvrtc.so.13, if any.
find_nvrtc() {
    local d py sp
    for d in ${CUDA_HOME:+$CUDA_HOME/lib64} ${CUDA_PATH:+$CUDA_PATH/lib64} \
        /usr/local/cuda-13.0/lib64 /usr/local/cuda/lib64 \
        "$root"/.venv-cuda/lib/python3*/site-packages/nvidia/cu13/lib; do
        if [[ -e $d/libnvrtc.so.13 ]]; then
            echo "$d"
            return 0
        fi
    done
    for py in python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        while IFS= read -r sp; do
            [[ -d $sp/nvidia ]] || continue
            for d in "$sp"/nvidia/cu13/lib "$sp"/nvidia/cuda_nvrtc/lib "$sp"/nvidia/*/lib; do
                if [[ -e $d/libnvrtc.so.13 ]]; then
                    echo "$d"
                    return 0
                fi
            done
        done < <("$py" -c 'import site, sys
paths = list(getattr(site, "getsitepackages", lambda: [])()) + [site.getusersitepackages()] + sys.path
print("\n".join(p for p in paths if p))' 2>/dev/null)
    done
    if command -v ldconfig >/dev/null 2>&1; then
        d=$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.13 / { print $NF; exit }')
        if [[ -n $d ]]; then
            dirname "$d"
            return 0
        fi
    fi
    return 1
}

# ---------------------------------------------------------------------------

if ! mkdir -p "$OUT"; then
    OUT=""
    record setup FAIL "cannot create the output folder"
    exit 1
fi
OUT=$(cd "$OUT" && pwd)

if [[ ! -x $OUTPROJ ]]; then
    record binary FAIL "no executable at $OUTPROJ (set OUTPROJ)"
    exit 1
fi
record binary ok "$OUTPROJ ($("$OUTPROJ" --version 2>/dev/null | head -n 1))"

if command -v nvidia-smi >/dev/null 2>&1; then
    run_step nvidia-smi "$STEP_TIMEOUT" nvidia-smi
    rc=$?
    fig=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
    record nvidia-smi "$(status_of "$rc")" "${fig:-$(last_error nvidia-smi)}"
else
    record nvidia-smi skip "nvidia-smi not found"
fi

if lib=$(find_nvrtc); then
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$lib:"*) ;;
        *) export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    record nvrtc ok "$lib"
else
    record nvrtc warn "libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc==13.0.88, or a CUDA 13.0 toolkit)"
fi

# wgpu's Vulkan loader (libvulkan.so.1) and the driver's manifest (ICD). The
# GPU machine's driver brings NVIDIA's manifest but not always a loader: then
# the .debs in $VULKAN_DEBS (libvulkan1, and the GL dispatch libraries NVIDIA's
# driver links against) are unpacked into a folder of their own, put on
# LD_LIBRARY_PATH. Where the loader's own folders hold no manifest that names
# NVIDIA, VK_DRIVER_FILES points it at $NVIDIA_ICD.
setup_vulkan() {
    local how dir deb lib
    if ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1 '; then
        how="the system's loader"
    elif compgen -G "$VULKAN_DEBS/libvulkan1_*.deb" >/dev/null; then
        if ! command -v dpkg >/dev/null 2>&1; then
            record vulkan FAIL "dpkg not found: cannot unpack $VULKAN_DEBS/libvulkan1_*.deb"
            return
        fi
        dir=$(mktemp -d) || return
        unpacked=$dir # removed on exit
        for deb in "$VULKAN_DEBS"/*.deb; do
            if ! dpkg -x "$deb" "$dir" 2>"$OUT/vulkan.err"; then
                record vulkan FAIL "dpkg -x $deb: $(last_error vulkan)"
                return
            fi
        done
        lib=$(find "$dir" -name libvulkan.so.1 | head -n 1)
        if [[ -z $lib ]]; then
            record vulkan FAIL "no libvulkan.so.1 in $VULKAN_DEBS/libvulkan1_*.deb"
            return
        fi
        export LD_LIBRARY_PATH="${lib%/*}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        how="the loader of $(basename "$VULKAN_DEBS"/libvulkan1_*.deb) in ${lib%/*}"
    else
        record vulkan skip "no libvulkan.so.1, and no $VULKAN_DEBS/libvulkan1_*.deb to bring one (scripts/env.sh: outproj_fetch_vulkan_loader): wgpu will see no GPU"
        return
    fi
    if [[ -z ${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-} && -f $NVIDIA_ICD ]] &&
        ! grep -qil nvidia /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json \
            /usr/local/share/vulkan/icd.d/*.json 2>/dev/null; then
        export VK_DRIVER_FILES=$NVIDIA_ICD
        how+=", the driver's manifest $NVIDIA_ICD"
    fi
    record vulkan ok "$how"
}
setup_vulkan

echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >"$OUT/environment.txt"
env | grep -E '^(CUDA|OUTPROJ|NVIDIA|WGPU|VK_)' >>"$OUT/environment.txt" 2>/dev/null

run_step info "$STEP_TIMEOUT" "$OUTPROJ" info
rc=$?
cuda_line=$(grep -E '^cuda ' "$OUT/info.out" | head -n 1 | tr -s ' ')
record info "$(status_of "$rc")" "${cuda_line:-$(last_error info)}"

# Every kernel compiled at once, a core per file and storage type, into the
# kernel cache the steps below load from; without it each step's process
# compiles what it uses, one file after another (minutes of the budget). On
# unless OUTPROJ_KERNEL_CACHE turns the cache off (0 or off).
case ${OUTPROJ_KERNEL_CACHE:-1} in
    0 | off) record kernels skip "OUTPROJ_KERNEL_CACHE=$OUTPROJ_KERNEL_CACHE" ;;
    *)
        export OUTPROJ_KERNEL_CACHE=${OUTPROJ_KERNEL_CACHE:-1}
        if [[ $STEPS == none ]]; then
            record kernels skip "no step group asked for"
        elif ! grep -qE '^cuda +available' "$OUT/info.out" 2>/dev/null; then
            record kernels skip "no CUDA device"
        elif starts kernels; then
            started=$SECONDS
            run_step kernels "$STEP_TIMEOUT" "$OUTPROJ" kernels --arch native --kernel-cache
            rc=$?
            if [[ $rc == 0 ]]; then
                record kernels ok "$(tail -n 1 "$OUT/kernels.out") ($((SECONDS - started)) s)"
            else
                record kernels FAIL "exit $rc: $(last_error kernels)"
            fi
        fi
        ;;
esac

# check_step NAME ARGS...: one `outproj check`.
check_step() {
    local name=$1 rc
    shift
    starts "$name" || return 0
    run_step "$name" "$STEP_TIMEOUT" "$OUTPROJ" check "$@"
    rc=$?
    if [[ $rc == 0 ]]; then
        record "$name" ok "$(check_figure "$name")"
    else
        record "$name" FAIL "exit $rc: $(check_figure "$name") $(last_error "$name")"
    fi
}

has_precision=0
if "$OUTPROJ" bench --help 2>/dev/null | grep -q -- --precision; then
    has_precision=1
fi

group_check() {
    check_step check-cuda --device cuda
}

group_check-precisions() {
    if ((has_precision)); then
        for p in $CHECK_PRECISIONS; do
            check_step "check-cuda-$p" --device cuda --precision "$p"
        done
    else
        record check-precisions skip "this outproj has no --precision"
    fi
}

# bench_step NAME BATCH ARGS...: one `outproj bench --json` at BATCH; its JSON
# also in NAME.json.
bench_step() {
    local name=$1 batch=$2 rc
    shift 2
    starts "$name" || return 0
    run_step "$name" "$STEP_TIMEOUT" "$OUTPROJ" bench "$@" --batch "$batch" \
        --seconds "$BENCH_SECONDS" --json
    rc=$?
    if [[ $rc == 0 ]]; then
        cp "$OUT/$name.out" "$OUT/$name.json"
        record "$name" ok "$(bench_figure "$name")"
    else
        record "$name" FAIL "exit $rc: $(last_error "$name")"
    fi
}

group_bench() {
    # One process per precision and batch: a kernel's fault (a sticky CUDA
    # error ends the process) costs only that batch's rows.
    for b in ${BATCHES//,/ }; do
        if ((has_precision)); then
            for p in $PRECISIONS; do
                bench_step "bench-cuda-$p-b$b" "$b" --device cuda --precision "$p"
            done
        else
            bench_step "bench-cuda-b$b" "$b" --device cuda
        fi
    done
}

# PyTorch on the same GPU: the anchor our times are compared with.
group_torch() {
    if ! "$TORCH_PYTHON" -c "import torch" >/dev/null 2>&1; then
        record torch-baseline skip "$TORCH_PYTHON cannot import torch (set TORCH_PYTHON)"
    elif ! "$TORCH_PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
        record torch-baseline skip "torch $("$TORCH_PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null) sees no CUDA device"
    else
        read -r -a torch_args <<<"$TORCH_ARGS"
        starts torch-baseline || return 0
        # It stops starting measurements a little before its timeout (a
        # measurement under way or a compile may overrun) and writes its JSON
        # after every row, so even a kill leaves what it measured.
        if [[ -n $deadline ]]; then
            local torch_budget=$((deadline - SECONDS - RESERVE - 20))
            torch_args+=(--budget "$((torch_budget > 1 ? torch_budget : 1))")
        fi
        run_step torch-baseline "$TORCH_TIMEOUT" "$TORCH_PYTHON" "$script_dir/torch_baseline.py" \
            --device cuda --batches "$BATCHES" --precisions "$TORCH_PRECISIONS" \
            --outproj "$OUTPROJ" --json "$OUT/torch-baseline.json" --markdown "$OUT/torch-baseline.md" \
            ${torch_args[@]+"${torch_args[@]}"}
        rc=$?
        fig=$(grep -v '^[[:space:]]*$' "$OUT/torch-baseline.out" 2>/dev/null | tail -n 1)
        case $rc in
            0) record torch-baseline ok "$fig" ;;
            124) record torch-baseline FAIL "timed out: $(last_error torch-baseline) (its JSON keeps the rows measured)" ;;
            *) record torch-baseline FAIL "exit $rc: ${fig:-$(last_error torch-baseline)}" ;;
        esac
    fi
}

group_compare() {
    local torch_json=""
    [[ -s $OUT/torch-baseline.json ]] && torch_json=$OUT/torch-baseline.json
    ours_json=()
    for f in "$OUT"/bench-cuda*.json; do
        [[ -e $f ]] && ours_json+=(--ours "$f")
    done
    if ((${#ours_json[@]} == 0)) && [[ -z $torch_json ]]; then
        record compare skip "no bench-cuda or torch-baseline JSON to compare"
    elif ! command -v python3 >/dev/null 2>&1; then
        record compare skip "python3 not found"
    else
        run_step compare "$STEP_TIMEOUT" python3 "$script_dir/compare_bench.py" \
            ${ours_json[@]+"${ours_json[@]}"} ${torch_json:+--torch "$torch_json"} \
            --out "$OUT/comparison.md"
        rc=$?
        if [[ $rc == 0 ]]; then
            cat "$OUT/comparison.md"
            fig=$(awk -F'|' '/^## / { sec = $0 }
                /^\| .* \| .* \| .* \| [^|]+ \|$/ && NF == 6 {
                    s = $5; gsub(/^ +| +$|\*/, "", s)
                    if (sec ~ /^## Targets/) t[s]++
                    else if (sec ~ /^## Predictions/) p[s]++ }
                END { printf "targets: %d met, %d not met, %d not measured; ",
                      t["met"], t["not met"], t["not measured"]
                      printf "predictions: %d hold, %d refuted, %d not measured",
                      p["holds"], p["refuted"], p["not measured"] }' "$OUT/comparison.md")
            record compare ok "$fig (comparison.md)"
        else
            record compare FAIL "exit $rc: $(last_error compare)"
        fi
    fi
}

# summarise NAME RC SCRIPT TITLE: after an ncu step NAME that exited with RC,
# scripts/SCRIPT turns NAME.out into NAME.md; records the step with its title line.
summarise() {
    local name=$1 rc=$2 script=$3 title=$4
    if [[ $rc == 0 ]] &&
        python3 "$script_dir/$script" "$OUT/$name.out" --title "$title" \
            >"$OUT/$name.md" 2>>"$OUT/$name.err"; then
        record "$name" ok "$(head -n 1 "$OUT/$name.md" | sed 's/^### //')"
    else
        record "$name" FAIL "exit $rc: $(last_error "$name")"
    fi
}

# Device time of every kernel of one forward (and the once-per-batch-size prefix).
group_profile() {
    if command -v ncu >/dev/null 2>&1; then
        for p in $PROFILE_PRECISIONS; do
            for b in $PROFILE_BATCHES; do
                name=profile-$p-b$b
                starts "$name" || continue
                run_step "$name" "$STEP_TIMEOUT" ncu --csv --metrics gpu__time_duration.sum \
                    --cache-control none --clock-control none \
                    "$OUTPROJ" run --device cuda --precision "$p" --batch "$b"
                summarise "$name" $? profile_summary.py "$p, batch $b"
            done
        done
    else
        record profile skip "ncu not found"
    fi
}

# Where a few kernels' time goes: ncu's full set on selected launches.
group_deep() {
    if command -v ncu >/dev/null 2>&1; then
        for target in $DEEP_TARGETS; do
            IFS=: read -r p b kernel skip count <<<"$target"
            name=deep-$p-b$b-${kernel//[^A-Za-z0-9_]/_}
            starts "$name" || continue
            run_step "$name" "$STEP_TIMEOUT" ncu --set full --page raw --csv \
                -k "regex:$kernel" --launch-skip "${skip:-0}" --launch-count "${count:-1}" \
                "$OUTPROJ" run --device cuda --precision "$p" --batch "$b"
            summarise "$name" $? deep_summary.py "$kernel, $p, batch $b"
        done
    else
        record deep skip "ncu not found"
    fi
}

group_sanitizer() {
    if command -v compute-sanitizer >/dev/null 2>&1; then
        for tool in $SANITIZER_TOOLS; do
            starts "$tool" || continue
            if [[ $SANITIZER_RUN == forwards ]]; then
                # Every fast kernel a forward uses (CUDA cores, TF32 and 16-bit tensor
                # cores), one forward each: a whole check under a sanitizer takes long.
                # Batch 64 bf16 for the large-tile GEMM, under memcheck only (racecheck
                # on its ~30 large GEMMs would take minutes).
                # shellcheck disable=SC2016 # expanded by the inner bash
                run_step "$tool" "$SANITIZER_TIMEOUT" bash -c '
                    for pb in f32:2 tf32:2 bf16:2 bf16:64; do
                        p=${pb%:*} b=${pb#*:}
                        [[ $b == 64 && $1 != memcheck ]] && continue
                        compute-sanitizer --tool "$1" --error-exitcode 86 --print-limit 100 \
                            "$2" run --device cuda --precision "$p" --batch "$b" || exit
                    done' sanitized "$tool" "$OUTPROJ"
            else
                run_step "$tool" "$SANITIZER_TIMEOUT" compute-sanitizer --tool "$tool" \
                    --error-exitcode 86 --print-limit 100 "$OUTPROJ" check --device cuda
            fi
            rc=$?
            fig=$(grep -hE '(ERROR|RACECHECK) SUMMARY' "$OUT/$tool.out" "$OUT/$tool.err" 2>/dev/null |
                sed 's/^=* *//' | tr '\n' ' ')
            case $rc in
                0) record "$tool" ok "${fig:-no errors reported}" ;;
                86) record "$tool" FAIL "${fig:-errors found}: see $tool.log" ;;
                124) record "$tool" FAIL "timed out: $(last_error "$tool")" ;;
                *) record "$tool" FAIL "exit $rc: ${fig:-$(last_error "$tool")}" ;;
            esac
        done
    else
        record sanitizer skip "compute-sanitizer not found"
    fi
}

# wgpu on the same GPU, when its adapter is a real GPU (not llvmpipe).
group_wgpu() {
    wgpu_block=$(awk '/^[^ ]/ { on = ($1 == "wgpu") } on' "$OUT/info.out" 2>/dev/null)
    if ! grep -qE '^wgpu +available' <<<"$wgpu_block"; then
        record wgpu skip "no usable wgpu adapter: $(head -n 1 <<<"$wgpu_block" | tr -s ' ' | cut -c1-80)"
    elif grep -qiE 'llvmpipe|lavapipe|swiftshader|, Cpu,' <<<"$wgpu_block" ||
        ! grep -qE 'DiscreteGpu|IntegratedGpu|VirtualGpu|NVIDIA' <<<"$wgpu_block"; then
        record wgpu skip "the wgpu adapter is not a GPU"
    else
        starts check-wgpu || return 0
        run_step check-wgpu "$STEP_TIMEOUT" "$OUTPROJ" check --device wgpu
        rc=$?
        if [[ $rc == 0 ]]; then
            record check-wgpu ok "$(check_figure check-wgpu)"
        else
            record check-wgpu FAIL "exit $rc: $(check_figure check-wgpu) $(last_error check-wgpu)"
        fi
        starts bench-wgpu || return 0
        run_step bench-wgpu "$STEP_TIMEOUT" "$OUTPROJ" bench --device wgpu --batch "$BATCHES" --json
        rc=$?
        if [[ $rc == 0 ]]; then
            record bench-wgpu ok "$(bench_figure bench-wgpu)"
        else
            record bench-wgpu FAIL "exit $rc: $(last_error bench-wgpu)"
        fi
    fi
}

# The groups asked for, in the order asked.
for group in $STEPS; do
    if [[ $group == none ]]; then
        continue
    elif [[ " $STEP_GROUPS " == *" $group "* ]]; then
        "group_$group"
    else
        record "$group" FAIL "unknown step group (one of: $STEP_GROUPS)"
    fi
done
for group in $STEP_GROUPS; do
    want "$group" || record "$group" skip "not in STEPS"
done
