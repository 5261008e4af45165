#!/usr/bin/env bash
# One idempotent set-up shared by `make test`, `make demo` and `make bench`:
# Open MPI (Debian), a virtualenv at .venv, torch, mpi4py, Horovod 0.28.1 built from its
# sdist with C++17 (cached as a wheel outside the repo), and this package in editable mode.
#
# Knobs (environment):
#   TORCH_SPEC        pip requirement for torch            (default: torch==2.13.0)
#   HOROVOD_VERSION   Horovod release to build             (default: 0.28.1)
#   HVD_SHUFFLEBN_CACHE  where built wheels are cached     (default: ~/.cache/hvd_shufflebn)
#   PYTHON            interpreter for the virtualenv       (default: python3)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HVD_SHUFFLEBN_CACHE:-$HOME/.cache/hvd_shufflebn}
PYTHON=${PYTHON:-python3}
VENV=$here/.venv
say() { printf '[setup] %s\n' "$*"; }

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
if ! "$VENV/bin/python" - "$TORCH_SPEC" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version("torch").split("+")[0], prereleases=True) else 1)
PY
then
    say "installing $TORCH_SPEC"
    pip_install "$TORCH_SPEC"
fi
pip_install -r requirements-dev.txt
command -v cmake >/dev/null 2>&1 || pip_install cmake   # Horovod's build needs it

# 3. Horovod, built once per (Horovod, torch, Python) and cached as a wheel ---------------------
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.replace("+", "_"))')
py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel_dir=$CACHE/horovod-$HOROVOD_VERSION-torch$torch_version-$py_tag
have_horovod() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
PY
}
if have_horovod; then
    say "Horovod $HOROVOD_VERSION already installed"
else
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        build=$(mktemp -d)
        trap 'rm -rf "$build"' EXIT
        say "building Horovod $HOROVOD_VERSION from its sdist (about 6 minutes on 2 cores)"
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
        mkdir -p "$wheel_dir"
        log=$wheel_dir/build.log
        say "build log: $log"
        # Progress: CMake's "[ NN%]" lines, one per compiled file, shown as they come.
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_GPU_OPERATIONS= \
        MAKEFLAGS="-j$(nproc)" \
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

# 5. Horovod must have been built with PyTorch, MPI and Gloo ------------------------------------
check=$("$VENV/bin/horovodrun" --check-build)
for part in PyTorch MPI Gloo; do
    if ! grep -qE "\[X\] $part" <<<"$check"; then
        printf '%s\n' "$check" >&2
        say "horovodrun --check-build does not list $part" >&2
        exit 1
    fi
done
say "ready: torch $torch_version, Horovod $HOROVOD_VERSION with PyTorch, MPI and Gloo"
