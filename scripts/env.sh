# shellcheck shell=bash
# Environment for building and testing output-projector without a GPU.
#
#   source scripts/env.sh            # export the variables (installs nothing)
#   outproj_install_deps             # then, optionally: install what is missing
#   outproj_export_env               # and export again to pick up new installs
#
# What the tests need:
# - a Vulkan driver for wgpu: Mesa's lavapipe (`mesa-vulkan-drivers libvulkan1`)
#   on a machine without a GPU;
# - NVRTC 13.0 and the CUDA headers (cuda_fp16.h, cuda_bf16.h), taken from the
#   PyPI wheels `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` into `.venv-cuda`.
#   NVRTC stays at 13.0: a CUDA 13.0 driver rejects PTX from a newer NVRTC.
# - for the CPU backend's NEON tiles on an x86-64 machine: Rust's
#   aarch64-unknown-linux-gnu target (rustup), a cross linker and libc
#   (`gcc-aarch64-linux-gnu libc6-dev-arm64-cross`) and qemu's user-mode
#   emulator (`qemu-user`), which runs the aarch64 test binaries.
#
# Variables exported:
#   LD_LIBRARY_PATH       gains the wheel's lib folder (libnvrtc.so.13 and
#                         libnvrtc-builtins.so.13.0 are found by the dynamic
#                         loader; it reads LD_LIBRARY_PATH only at process start)
#   OUTPROJ_CUDA_INCLUDE  folder holding cuda_fp16.h / cuda_bf16.h
#   NODEVICE_SELECT=1     silences a harmless Mesa device-select message
#   CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_{LINKER,RUNNER}
#                         the cross linker, and qemu-aarch64 with the cross
#                         libc, when both are installed
# Nothing is exported when nothing is found; callers keep their own values.

OUTPROJ_ROOT="${OUTPROJ_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
OUTPROJ_CUDA_VENV="${OUTPROJ_CUDA_VENV:-$OUTPROJ_ROOT/.venv-cuda}"
OUTPROJ_NVRTC_WHEEL="${OUTPROJ_NVRTC_WHEEL:-nvidia-cuda-nvrtc==13.0.88}"
OUTPROJ_CUDART_WHEEL="${OUTPROJ_CUDART_WHEEL:-nvidia-cuda-runtime==13.0.96}"
# crt/mma.h, which mma.h (WMMA, the f16/bf16 tensor-core GEMM) includes.
OUTPROJ_CRT_WHEEL="${OUTPROJ_CRT_WHEEL:-nvidia-cuda-crt==13.0.88}"
# The Vulkan loader and GL dispatch libraries a bare GPU machine may lack.
OUTPROJ_GPU_DEBS="${OUTPROJ_GPU_DEBS:-libvulkan1 libglvnd0 libegl1 libgl1 libglx0 libopengl0 libgles2}"

outproj_log() { printf '[env] %s\n' "$*" >&2; }

# Prints the folder holding libnvrtc.so.13 inside the local venv, if any.
outproj_nvrtc_lib_dir() {
    local f
    for f in "$OUTPROJ_CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 \
             "$OUTPROJ_CUDA_VENV"/pkgs/nvidia/cu13/lib/libnvrtc.so.13; do
        if [[ -e "$f" ]]; then
            dirname "$f"
            return 0
        fi
    done
    return 1
}

# Prints the folder holding cuda_fp16.h inside the local venv, if any.
outproj_cuda_include_dir() {
    local f
    for f in "$OUTPROJ_CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13/include/cuda_fp16.h \
             "$OUTPROJ_CUDA_VENV"/pkgs/nvidia/cu13/include/cuda_fp16.h; do
        if [[ -e "$f" && -e "$(dirname "$f")/crt/mma.h" ]]; then
            dirname "$f"
            return 0
        fi
    done
    return 1
}

# True when a Vulkan loader and at least one ICD (driver manifest) are installed.
outproj_have_vulkan() {
    local d have_icd=0
    for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/share/vulkan/icd.d; do
        if compgen -G "$d/*.json" >/dev/null; then
            have_icd=1
        fi
    done
    [[ $have_icd == 1 ]] || return 1
    if command -v ldconfig >/dev/null 2>&1; then
        ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || return 1
    fi
    return 0
}

outproj_as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        outproj_log "need root to run: $*"
        return 1
    fi
}

# `outproj_apt_install WHAT PACKAGE...`: installs the packages with apt-get
# (for WHAT, named in the log), or says why it cannot.
outproj_apt_install() {
    local what=$1
    shift
    if ! command -v apt-get >/dev/null 2>&1; then
        outproj_log "$what: no apt-get; install $* (or your system's equivalent) by hand"
        return 1
    fi
    outproj_log "$what: installing $* with apt-get"
    outproj_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    outproj_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# Installs Mesa lavapipe + the Vulkan loader when no Vulkan driver is present.
outproj_ensure_vulkan() {
    if outproj_have_vulkan; then
        outproj_log "vulkan: driver present ($(compgen -G '/usr/share/vulkan/icd.d/*.json' | xargs -r -n1 basename | tr '\n' ' '))"
        return 0
    fi
    outproj_log "vulkan: no driver found; Mesa's lavapipe runs Vulkan on the CPU"
    outproj_apt_install vulkan mesa-vulkan-drivers libvulkan1
}

# `outproj_fetch_vulkan_loader [DIR]`: downloads the Vulkan loader's Debian
# package (libvulkan1) and the GL dispatch libraries NVIDIA's Vulkan driver
# links against (libglvnd0 and its kin), amd64 whatever this machine's
# processor, into DIR (default: .gpu-deps, which git ignores). For a GPU
# machine whose driver brings its Vulkan manifest but no loader:
# scripts/gpu-check.sh unpacks them there, so wgpu runs on that GPU. Carry DIR
# along with the binary. Needs apt-get; uses package lists of its own, so the
# system's are left alone.
outproj_fetch_vulkan_loader() {
    local dir=${1:-$OUTPROJ_ROOT/.gpu-deps} lists rc
    if ! command -v apt-get >/dev/null 2>&1; then
        outproj_log "vulkan loader: no apt-get; put the amd64 .debs of $OUTPROJ_GPU_DEBS into $dir by hand"
        return 1
    fi
    mkdir -p "$dir" || return 1
    lists=$(mktemp -d) || return 1
    mkdir -p "$lists/partial"
    local o=(-q -oAPT::Architecture=amd64 -oAPT::Architectures=amd64 "-oDir::State::Lists=$lists")
    # As root apt downloads as its own user, who cannot write these folders.
    [[ $(id -u) == 0 ]] && o+=(-oAPT::Sandbox::User=root)
    outproj_log "vulkan loader: downloading $OUTPROJ_GPU_DEBS (amd64) into $dir"
    # shellcheck disable=SC2086 # a list of package names
    apt-get "${o[@]}" update >/dev/null &&
        (cd "$dir" && apt-get "${o[@]}" download $OUTPROJ_GPU_DEBS)
    rc=$?
    rm -rf "$lists"
    return "$rc"
}

# Installs libclang (for the `nvtx` feature's bindings) with apt-get when missing.
outproj_ensure_libclang() {
    # libclang itself: libclang-cpp (which other packages install) is a
    # different library, and bindgen cannot load it.
    local dir
    for dir in "${LIBCLANG_PATH:-}" /usr/lib/* /usr/lib/llvm-*/lib; do
        [[ -n $dir ]] || continue
        if compgen -G "$dir/libclang.so*" >/dev/null || compgen -G "$dir/libclang-[0-9]*.so*" >/dev/null; then
            outproj_log "libclang: present in $dir"
            return 0
        fi
    done
    outproj_log "libclang: not found; the nvtx feature's bindings need it"
    outproj_apt_install libclang libclang-dev
}

# Installs NVRTC 13.0 and the CUDA runtime headers into $OUTPROJ_CUDA_VENV when missing.
outproj_ensure_nvrtc() {
    if outproj_nvrtc_lib_dir >/dev/null && outproj_cuda_include_dir >/dev/null; then
        outproj_log "nvrtc: present in $OUTPROJ_CUDA_VENV"
        return 0
    fi
    local py
    py=$(command -v python3 || true)
    if [[ -z $py ]]; then
        outproj_log "nvrtc: no python3, which fetches $OUTPROJ_NVRTC_WHEEL"
        outproj_apt_install nvrtc python3 python3-venv || return 1
        py=$(command -v python3)
    fi
    outproj_log "nvrtc: installing $OUTPROJ_NVRTC_WHEEL $OUTPROJ_CUDART_WHEEL $OUTPROJ_CRT_WHEEL into $OUTPROJ_CUDA_VENV"
    if [[ ! -x $OUTPROJ_CUDA_VENV/bin/python ]] && ! "$py" -m venv "$OUTPROJ_CUDA_VENV" 2>/dev/null; then
        # No ensurepip (Debian without python3-venv): plain folder install instead.
        rm -rf "$OUTPROJ_CUDA_VENV"
        outproj_log "nvrtc: python3 -m venv unavailable; installing with pip --target"
        "$py" -m pip install --disable-pip-version-check --no-input --target "$OUTPROJ_CUDA_VENV/pkgs" \
            "$OUTPROJ_NVRTC_WHEEL" "$OUTPROJ_CUDART_WHEEL" "$OUTPROJ_CRT_WHEEL"
    else
        "$OUTPROJ_CUDA_VENV/bin/python" -m pip install --disable-pip-version-check --no-input \
            "$OUTPROJ_NVRTC_WHEEL" "$OUTPROJ_CUDART_WHEEL" "$OUTPROJ_CRT_WHEEL"
    fi
    outproj_nvrtc_lib_dir >/dev/null && outproj_cuda_include_dir >/dev/null
}

# Where the aarch64 cross libc lives (Debian's libc6-dev-arm64-cross).
OUTPROJ_AARCH64_SYSROOT="${OUTPROJ_AARCH64_SYSROOT:-/usr/aarch64-linux-gnu}"

# True when Rust's aarch64-unknown-linux-gnu standard library is installed.
outproj_have_aarch64_target() {
    [[ -d $(rustc --print sysroot 2>/dev/null)/lib/rustlib/aarch64-unknown-linux-gnu ]]
}

# True when the cross linker, its libc and qemu-aarch64 are installed.
outproj_have_aarch64_tools() {
    command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 &&
        command -v qemu-aarch64 >/dev/null 2>&1 &&
        [[ -e $OUTPROJ_AARCH64_SYSROOT/lib/ld-linux-aarch64.so.1 ]]
}

# True when aarch64 test binaries can be built and run here.
outproj_have_aarch64() {
    outproj_have_aarch64_target && outproj_have_aarch64_tools
}

# Installs what outproj_have_aarch64 looks for, when it is missing.
outproj_ensure_aarch64() {
    if outproj_have_aarch64; then
        outproj_log "aarch64: target, cross linker and qemu-aarch64 present"
        return 0
    fi
    if ! outproj_have_aarch64_target; then
        if ! command -v rustup >/dev/null 2>&1; then
            outproj_log "aarch64: no Rust target aarch64-unknown-linux-gnu and no rustup to add it"
            return 1
        fi
        outproj_log "aarch64: adding the Rust target aarch64-unknown-linux-gnu with rustup"
        rustup target add aarch64-unknown-linux-gnu || return 1
    fi
    if ! outproj_have_aarch64_tools; then
        outproj_apt_install aarch64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user || return 1
    fi
    outproj_have_aarch64
}

outproj_install_deps() {
    outproj_ensure_vulkan
    outproj_ensure_nvrtc
    outproj_ensure_aarch64
}

outproj_export_env() {
    local lib inc
    if lib=$(outproj_nvrtc_lib_dir); then
        case ":${LD_LIBRARY_PATH:-}:" in
            *":$lib:"*) ;;
            *) export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
        esac
    fi
    if [[ -z ${OUTPROJ_CUDA_INCLUDE:-} ]] && inc=$(outproj_cuda_include_dir); then
        export OUTPROJ_CUDA_INCLUDE="$inc"
    fi
    export NODEVICE_SELECT="${NODEVICE_SELECT:-1}"
    if outproj_have_aarch64_tools; then
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-aarch64-linux-gnu-gcc}"
        export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER:-qemu-aarch64 -L $OUTPROJ_AARCH64_SYSROOT}"
    fi
}

outproj_export_env
