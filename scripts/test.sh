#!/usr/bin/env bash
# Builds and tests output-projector on a machine without a GPU, installing what
# the GPU-backend tests need when it is missing:
#   - Mesa lavapipe (Vulkan on the CPU) for wgpu, with apt-get, when no Vulkan
#     driver is installed;
#   - NVRTC 13.0 and the CUDA headers from PyPI into .venv-cuda;
#   - libclang (apt-get), which the `nvtx` feature's bindings are generated with;
#   - on x86-64, the aarch64 target, a cross gcc and qemu-user (rustup, apt-get),
#     which build and run the CPU backend's tests for aarch64 (its NEON tiles).
# Missing toolchains fail the tests (REQUIRE_WGPU=1, REQUIRE_NVRTC=1,
# REQUIRE_AARCH64=1); set any to 0 beforehand to let those tests skip instead.
# OUTPROJ_SKIP_INSTALL=1 installs nothing. Extra arguments go to every
# `cargo test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "test.sh: cargo not found; install Rust (https://rustup.rs), version 1.90 or newer" >&2
    exit 1
fi

# shellcheck source=scripts/env.sh
source scripts/env.sh
if [[ ${OUTPROJ_SKIP_INSTALL:-0} != 1 ]]; then
    outproj_ensure_vulkan || outproj_log "warning: could not install a Vulkan driver; wgpu tests will report it"
    outproj_ensure_nvrtc || outproj_log "warning: could not install NVRTC; nvrtc tests will report it"
    outproj_ensure_libclang || outproj_log "warning: could not install libclang; the nvtx build will fail"
    if [[ $(uname -m) == x86_64 ]]; then
        outproj_ensure_aarch64 || outproj_log "warning: could not install the aarch64 toolchain; its tests will report it"
    fi
    outproj_export_env
fi
export REQUIRE_WGPU="${REQUIRE_WGPU:-1}"
export REQUIRE_NVRTC="${REQUIRE_NVRTC:-1}"
export REQUIRE_AARCH64="${REQUIRE_AARCH64:-1}"

outproj_log "$(rustc --version), $(cargo --version)"
outproj_log "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
outproj_log "OUTPROJ_CUDA_INCLUDE=${OUTPROJ_CUDA_INCLUDE:-}"
outproj_log "NODEVICE_SELECT=$NODEVICE_SELECT REQUIRE_WGPU=$REQUIRE_WGPU REQUIRE_NVRTC=$REQUIRE_NVRTC REQUIRE_AARCH64=$REQUIRE_AARCH64"

# The nvtx feature on in every step: one feature set is one build (another
# rebuilds some 40 dependencies, minutes on 2 cores). Without a profiler its
# ranges do nothing; the default build differs only in src/profile.rs's empty
# stand-ins for them.
locked=()
if [[ ${CI:-} == true && -f Cargo.lock ]]; then
    locked=(--locked)
fi
cargo_flags=(--features nvtx "${locked[@]}")

# The toolchains first, output shown: the adapter, NVRTC's version and the
# register/spill report, or the one-line reason a check was skipped. Only here:
# Cargo.toml keeps this target out of a plain `cargo test`.
cargo test "${cargo_flags[@]}" --test toolchain "$@" -- --nocapture
# Everything else: unit tests, binaries, integration tests, doctests.
cargo test "${cargo_flags[@]}" "$@"
# Keep the benches compiling without running them. `cargo test --benches
# --no-run` builds them with the test profile and so reuses the build above
# (`cargo build --benches` would build every dependency again, in dev).
cargo test "${cargo_flags[@]}" --benches --no-run "$@"
# The API documentation builds without a warning: every public item documented
# (`#![warn(missing_docs)]`) and every intra-doc link resolved.
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc "${cargo_flags[@]}" --no-deps
# The CPU backend's NEON tiles, on an x86-64 machine: the library's unit tests
# (every tile shape, bit for bit against the baseline loop) and the CPU
# backend's ops and projector against the reference and PyTorch's golden
# output, built for aarch64 and run under qemu-aarch64. Only the CPU backend:
# the GPU backends are left out of this build, and the tests that spend their
# time in the float64 reference at full size (minutes under emulation) run on
# x86-64 only. (The bf16 tiles' results are the baseline's bit for bit on
# every instruction set, which the unit tests check here for NEON.)
if [[ $(uname -m) == x86_64 ]]; then
    if outproj_have_aarch64; then
        cargo test --target aarch64-unknown-linux-gnu --no-default-features "${locked[@]}" --lib --test cpu_ops "$@" -- \
            --skip linear_matches_reference --skip projector_matches_reference \
            --skip results_do_not_depend_on_threads --skip gemms_in_16_bits_match_reference \
            --skip projector_in_16_bits_matches_reference --exact
    elif [[ $REQUIRE_AARCH64 == 1 ]]; then
        outproj_log "aarch64: no Rust target, cross gcc or qemu-aarch64 (REQUIRE_AARCH64=1); see scripts/env.sh"
        exit 1
    else
        outproj_log "aarch64: toolchain missing; the NEON tests are skipped (REQUIRE_AARCH64=0)"
    fi
fi
outproj_log "all tests passed"
