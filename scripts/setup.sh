#!/usr/bin/env bash
# One idempotent set-up shared by `make test`, `make demo` and `make bench`:
# Open MPI (Debian), a virtualenv at .venv, torch, mpi4py, Horovod 0.28.1 built from its
# sdist with C++17 (cached as a wheel outside the repo), and this package in editable mode.
#
# Horovod comes in two variants, each with a wheel cache of its own:
#   cpu   collectives on CPU tensors only (MPI and Gloo);
#   nccl  also CUDA tensors through NCCL (what hvd.DistributedOptimizer needs for CUDA gradients).
# The NCCL variant is built when HOROVOD_GPU_OPERATIONS=NCCL, or, when that is unset, when this
# machine has nvcc (on PATH or in $CUDA_HOME/bin), an NCCL with its header (nccl.h) and a
# library to link, and a CUDA build of torch. Otherwise the CPU variant.
#
# Knobs (environment):
#   TORCH_SPEC        pip requirement for torch            (default: torch==2.13.0)
#                     (a CUDA build: e.g. 'torch==2.13.0+cu128' with PIP_EXTRA_INDEX_URL set to
#                     https://download.pytorch.org/whl/cu128)
#   HOROVOD_VERSION   Horovod release to build             (default: 0.28.1)
#   HOROVOD_GPU_OPERATIONS  NCCL: the NCCL variant; set empty: the CPU variant (default: unset,
#                     decided as above)
#   HOROVOD_CUDA_HOME, CUDA_HOME      the CUDA toolkit     (default: from nvcc on PATH)
#   HOROVOD_NCCL_HOME, or HOROVOD_NCCL_INCLUDE + HOROVOD_NCCL_LIB    NCCL (default: searched in
#                     the CUDA toolkit, /usr and /usr/local, then the venv's nvidia-nccl package)
#   HOROVOD_NCCL_LINK, HOROVOD_BUILD_CUDA_CC_LIST    passed on to Horovod's build as they are
#   HVD_SHUFFLEBN_CACHE  where built wheels are cached     (default: ~/.cache/hvd_shufflebn)
#   HVD_SHUFFLEBN_DRY_RUN=1 (or --dry-run)  print the variant and the build environment it
#                     would use, and exit; installs and builds nothing
#   PYTHON            interpreter for the virtualenv       (default: python3)
set -euo pipefail

dry_run=${HVD_SHUFFLEBN_DRY_RUN:-0}
case $dry_run in "" | 0) dry_run=0 ;; *) dry_run=1 ;; esac
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
    esac
done

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HVD_SHUFFLEBN_CACHE:-$HOME/.cache/hvd_shufflebn}
PYTHON=${PYTHON:-python3}
VENV=$here/.venv
say() { printf '[setup] %s\n' "$*"; }

# --- The variant: what the machine and torch allow, or what the user asked ----------------------
# Sets nvcc, nvcc_release and cuda_home (empty when not found).
find_cuda() {
    nvcc="" nvcc_release="" cuda_home=""
    local home
    for home in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}"; do
        if [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then
            nvcc=$home/bin/nvcc cuda_home=$home
            break
        fi
    done
    if [ -z "$nvcc" ]; then
        nvcc=$(command -v nvcc) || return 0
        # The toolkit is nvcc's ../ unless nvcc is a wrapper elsewhere: then ask nvcc itself.
        home=$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)
        if [ ! -e "$home/include/cuda_runtime.h" ]; then
            home=$("$nvcc" --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1) || true
            home=$( { [ -n "$home" ] && cd "$home" 2>/dev/null && pwd -P; } || true)
        fi
        cuda_home=$home
    fi
    nvcc_release=$("$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -n 1) || true
}

# Sets nccl_include and nccl_lib (empty when not found), nccl_where (where it looked or found it)
# and nccl_pip=1 for the venv's nvidia-nccl. Horovod's CMake links libnccl_static.a or libnccl.so,
# so a bare libnccl.so.2 (the runtime package alone) does not count, except pip's (see the build).
find_nccl() {
    nccl_include="" nccl_lib="" nccl_pip=0
    try_nccl() {
        [ -n "$1" ] && [ -e "$1/nccl.h" ] && { [ -e "$2/libnccl.so" ] || [ -e "$2/libnccl_static.a" ]; } \
            && nccl_include=$1 nccl_lib=$2
    }
    local home inc lib
    # A location the user gave is the only one looked at.
    if [ -n "${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]; then
        nccl_where="HOROVOD_NCCL_INCLUDE=${HOROVOD_NCCL_INCLUDE:-} HOROVOD_NCCL_LIB=${HOROVOD_NCCL_LIB:-}"
        try_nccl "${HOROVOD_NCCL_INCLUDE:-}" "${HOROVOD_NCCL_LIB:-}" || true
        return 0
    fi
    if [ -n "${HOROVOD_NCCL_HOME:-}" ]; then
        nccl_where="HOROVOD_NCCL_HOME=$HOROVOD_NCCL_HOME"
        try_nccl "$HOROVOD_NCCL_HOME/include" "$HOROVOD_NCCL_HOME/lib" \
            || try_nccl "$HOROVOD_NCCL_HOME/include" "$HOROVOD_NCCL_HOME/lib64" || true
        return 0
    fi
    nccl_where="${cuda_home:+$cuda_home, }/usr, /usr/local${torch_nccl:+, $torch_nccl}"
    for home in ${cuda_home:+"$cuda_home"} /usr /usr/local; do
        inc=$home/include
        for lib in "$home"/lib/*-linux-gnu "$home/lib64" "$home/lib"; do
            try_nccl "$inc" "$lib" && return 0
        done
    done
    # pip's nvidia-nccl-cu*, which a CUDA torch brings and loads: the same NCCL in both.
    if [ -n "$torch_nccl" ] && [ -e "$torch_nccl/include/nccl.h" ] && [ -e "$torch_nccl/lib/libnccl.so.2" ]; then
        nccl_include=$torch_nccl/include nccl_lib=$torch_nccl/lib nccl_pip=1
    fi
    return 0
}

# Sets torch_version (as in the wheel cache's name), torch_cuda ("none" for a CPU-only torch),
# py_tag and torch_nccl; torch_version is empty when the venv has no torch yet.
find_torch() {
    torch_version="" torch_cuda="" py_tag="" torch_nccl=""
    [ -x "$VENV/bin/python" ] || return 0
    local line
    line=$("$VENV/bin/python" - 2>/dev/null <<'PY'
import os, sys, sysconfig
import torch
nccl = [p for p in {os.path.join(sysconfig.get_paths()[k], "nvidia", "nccl")
                    for k in ("purelib", "platlib")} if os.path.isdir(p)]
print(torch.__version__.replace("+", "_"), torch.version.cuda or "none",
      f"cp{sys.version_info[0]}{sys.version_info[1]}", nccl[0] if nccl else "")
PY
) || return 0
    read -r torch_version torch_cuda py_tag torch_nccl <<<"$line"
}

# Sets variant (cpu or nccl), why, and build_env (the HOROVOD_* of Horovod's build).
decide() {
    find_torch
    find_cuda
    find_nccl
    local found="" missing=()
    if [ -n "$nvcc" ]; then
        found="nvcc ${nvcc_release:-?} at $nvcc"
    elif [ -x /usr/local/cuda/bin/nvcc ]; then
        missing+=("no nvcc on PATH or in \$CUDA_HOME/bin (add /usr/local/cuda/bin to PATH or set CUDA_HOME=/usr/local/cuda)")
    else
        missing+=("no nvcc on PATH or in \$CUDA_HOME/bin")
    fi
    if [ -n "$nccl_include" ]; then
        found+="${found:+, }NCCL ($nccl_include, $nccl_lib)"
    else
        missing+=("no NCCL (nccl.h with libnccl.so or libnccl_static.a) in $nccl_where")
    fi
    if [ -z "$torch_version" ]; then
        found+="${found:+; }torch's CUDA unknown (no torch in .venv yet: decided again once it is installed)"
    elif [ "$torch_cuda" = none ]; then
        missing+=("torch ${torch_version/_/+} is CPU-only (a CUDA build: see TORCH_SPEC)")
    else
        found+="${found:+, }torch ${torch_version/_/+} with CUDA $torch_cuda"
    fi

    if [ -n "${HOROVOD_GPU_OPERATIONS+set}" ]; then   # the user's choice, even an empty one
        case $HOROVOD_GPU_OPERATIONS in
            "") variant=cpu why="HOROVOD_GPU_OPERATIONS is set empty" ;;
            NCCL) variant=nccl why="HOROVOD_GPU_OPERATIONS=NCCL; ${found:-found nothing}" ;;
            *)
                say "HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS: this set-up builds the NCCL variant, or the CPU one when it is set empty" >&2
                exit 1 ;;
        esac
    elif [ ${#missing[@]} = 0 ]; then
        variant=nccl why=$found
    else
        variant=cpu why=$(printf '%s; ' "${missing[@]}")
        why=${why%; }
    fi

    build_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
               HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1)
    if [ "$variant" = cpu ]; then
        build_env+=(HOROVOD_GPU_OPERATIONS=)
    else
        build_env+=(HOROVOD_GPU_OPERATIONS=NCCL)
        [ -z "$cuda_home" ] || build_env+=("HOROVOD_CUDA_HOME=$cuda_home")
        [ -z "$nccl_include" ] || build_env+=("HOROVOD_NCCL_INCLUDE=$nccl_include" "HOROVOD_NCCL_LIB=$nccl_lib")
    fi
}

# Problems with the variant found before any build; a CPU-only torch with NCCL asked is fatal
# (Horovod's CMake would stop on it after minutes).
check_variant() {
    [ "$variant" = nccl ] || return 0
    [ -n "$nvcc" ] || say "warning: no nvcc found; Horovod's build has to find the CUDA toolkit itself" >&2
    [ -n "$nccl_include" ] || say "warning: no NCCL found in $nccl_where; Horovod's build has to find it itself" >&2
    if [ -n "$nvcc_release" ] && [ -n "$torch_cuda" ] && [ "$torch_cuda" != none ] \
            && [ "${nvcc_release%%.*}" != "${torch_cuda%%.*}" ]; then
        say "warning: nvcc is CUDA $nvcc_release but torch was built with CUDA $torch_cuda;" \
            "a toolkit of torch's major version (HOROVOD_CUDA_HOME) is safer" >&2
    fi
    if [ "$torch_cuda" = none ]; then
        say "the NCCL variant needs a CUDA build of torch, but torch ${torch_version/_/+} is CPU-only:" >&2
        say "  install one with TORCH_SPEC (e.g. TORCH_SPEC='torch==2.13.0+cu128' with" >&2
        say "  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128), or set HOROVOD_GPU_OPERATIONS= for the CPU variant" >&2
        exit 1
    fi
    return 0
}

# The wheel cache, per (Horovod, torch, Python, variant). The CPU variant keeps the name it had
# before there were variants, so that existing caches stay valid.
wheel_dir_for() {
    local dir=$CACHE/horovod-$HOROVOD_VERSION-torch${torch_version:-<version>}-${py_tag:-<cpXY>}
    [ "$variant" = cpu ] || dir+=-$variant
    printf '%s' "$dir"
}

if [ "$dry_run" = 1 ]; then
    say "dry run: nothing is installed or built"
    decide
    say "Horovod variant: $variant ($why)"
    check_variant
    say "build environment of Horovod $HOROVOD_VERSION:"
    for var in "${build_env[@]}"; do say "  $var"; done
    # The user's other HOROVOD_* (HOROVOD_NCCL_LINK, ...) reach the build as they are.
    while IFS= read -r var; do
        [[ " ${build_env[*]} " == *" ${var%%=*}="* ]] || say "  $var (from the environment)"
    done < <(env | grep '^HOROVOD_' | sort)
    wheel_dir=$(wheel_dir_for)
    if [ -z "$torch_version" ]; then
        say "wheel cache: $wheel_dir (torch's version once installed)"
    elif ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        say "wheel cache: $wheel_dir (has the wheel: no build)"
    else
        say "wheel cache: $wheel_dir (empty: would build, about 6 minutes on 2 cores)"
    fi
    exit 0
fi

# 1. Open MPI ---------------------------------------------------------------------------------
if command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1; then
    say "Open MPI found: $(mpirun --version 2>/dev/null | head -n 1)"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing Open MPI from Debian (openmpi-bin libopenmpi-dev)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
else
    cat >&2 <<MSG
[setup] Open MPI is missing and cannot be installed here (needs apt-get as root).
[setup] Install it yourself, then run this again:
[setup]     sudo apt-get install openmpi-bin libopenmpi-dev      (Debian/Ubuntu)
[setup] or put an existing MPI's mpirun and mpicc on PATH.
MSG
    exit 1
fi

# 2. Virtualenv, torch, mpi4py, test tools ------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtualenv at .venv"
    "$PYTHON" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
# The full version (2.13.0+cpu): TORCH_SPEC='torch==2.13.0+cu128' replaces a CPU-only torch,
# while 'torch==2.13.0' accepts either.
if ! "$VENV/bin/python" - "$TORCH_SPEC" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version("torch"), prereleases=True) else 1)
PY
then
    say "installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
fi
pip_install -r requirements-dev.txt
command -v cmake >/dev/null 2>&1 || pip_install cmake   # Horovod's build needs it

# 3. Horovod, built once per (Horovod, torch, Python, variant) and cached as a wheel -------------
decide
if [ -z "$torch_version" ]; then
    say "torch does not import in .venv: $VENV/bin/python -c 'import torch' says why" >&2
    exit 1
fi
say "Horovod variant: $variant ($why)"
check_variant
wheel_dir=$(wheel_dir_for)
# The installed Horovod must be the variant asked: a CPU one where NCCL is asked is replaced.
have_horovod() {
    "$VENV/bin/python" - "$variant" <<'PY' 2>/dev/null
import sys
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
assert bool(hvd.nccl_built()) == (sys.argv[1] == "nccl")
PY
}
if have_horovod; then
    say "Horovod $HOROVOD_VERSION ($variant) already installed"
else
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        say "building Horovod $HOROVOD_VERSION ($variant) from its sdist (about 6 minutes on 2 cores)"
        "$VENV/bin/python" -m pip download --disable-pip-version-check -q --no-deps \
            --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
        tar -xzf "$build"/horovod-"$HOROVOD_VERSION".tar.gz -C "$build"
        src=$build/horovod-$HOROVOD_VERSION
        # torch >= 2.1 headers need C++17. Raising only the torch target's standard breaks the link
        # (gloo's kDefaultTimeout is then defined twice), so build everything as C++17.
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
            "$src"/CMakeLists.txt "$src"/horovod/torch/CMakeLists.txt
        sed -i 's/-std=c++11 -fPIC/-std=c++17 -fPIC/' "$src"/third_party/gloo/CMakeLists.txt
        grep -q 'CMAKE_CXX_STANDARD 17' "$src"/CMakeLists.txt "$src"/horovod/torch/CMakeLists.txt
        grep -q 'std=c++17' "$src"/third_party/gloo/CMakeLists.txt
        if [ "$nccl_pip" = 1 ]; then
            # pip's NCCL has only libnccl.so.2, and CMake looks for libnccl.so: link through a
            # libnccl.so of our own. At run time libnccl.so.2 is the one torch has loaded.
            mkdir "$build/nccl-lib"
            ln -s "$nccl_lib/libnccl.so.2" "$build/nccl-lib/libnccl.so"
            build_env+=("HOROVOD_NCCL_LIB=$build/nccl-lib")
        fi
        mkdir -p "$wheel_dir"
        log=$wheel_dir/build.log
        say "build log: $log"
        # Progress: CMake's "[ NN%]" lines, one per compiled file, shown as they come.
        env "${build_env[@]}" MAKEFLAGS="-j$(nproc)" \
            "$VENV/bin/python" -m pip wheel --disable-pip-version-check -v --no-deps \
            --no-build-isolation -w "$wheel_dir" "$src" 2>&1 \
            | tee "$log" | grep --line-buffered -oE '\[ *[0-9]+%\] (Building|Linking)[^/]*[^ ]*' \
            | sed -u 's#^#[setup]   #' || true
        if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
            say "Horovod build FAILED; the last lines of $log:" >&2
            tail -n 40 "$log" >&2
            exit 1
        fi
    fi
    say "installing cached wheel $(ls "$wheel_dir"/horovod-*.whl)"
    pip_install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
    pip_install cloudpickle psutil pyyaml packaging
fi

# 4. This package -----------------------------------------------------------------------------
if ! "$VENV/bin/python" -m pip show -q hvd_shufflebn >/dev/null 2>&1; then
    say "installing hvd_shufflebn (editable)"
    pip_install --no-deps --no-build-isolation -e .
fi

# 5. Horovod must have been built with what was asked: PyTorch, MPI, Gloo, and NCCL for nccl --
check=$("$VENV/bin/horovodrun" --check-build)
parts=(PyTorch MPI Gloo)
[ "$variant" = cpu ] || parts+=(NCCL)
for part in "${parts[@]}"; do
    if ! grep -qE "\[X\] $part" <<<"$check"; then
        printf '%s\n' "$check" >&2
        say "horovodrun --check-build does not list $part" >&2
        exit 1
    fi
done
with=$(printf '%s, ' "${parts[@]}")
say "ready: torch ${torch_version/_/+}, Horovod $HOROVOD_VERSION ($variant variant) with ${with%, }"
