#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Open MPI and build tools from the OS packages,
# a virtual environment in .venv with the pinned packages, and Horovod 0.28.1 compiled
# once against the pinned TensorFlow. The Horovod wheel is cached outside the repository
# (HOROVOD_WHEEL_CACHE), keyed by the Horovod, TensorFlow and Python versions, so a clean
# clone, CI and later runs reuse it instead of compiling for three minutes again.
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv_dir="${VENV_DIR:-$repo_dir/.venv}"
python_bin="${PYTHON:-python3}"
requirements="$repo_dir/requirements.txt"

pinned_version() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$requirements"; }
horovod_version="$(pinned_version horovod)"
tensorflow_version="$(pinned_version tensorflow-cpu)"

log() { echo "[setup] $*"; }

install_os_packages() {
    local missing=()
    command -v mpirun >/dev/null || missing+=(openmpi-bin libopenmpi-dev)
    command -v cmake >/dev/null || missing+=(cmake)
    command -v g++ >/dev/null || missing+=(g++)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v rsync >/dev/null || missing+=(rsync)  # run_multinode.sh --sync-data
    command -v ssh >/dev/null || missing+=(openssh-client)  # the default launch agent
    # sshd: the tests run a real OpenSSH server on each namespace host (tests/test_engines.py)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        echo "[setup] missing OS packages: ${missing[*]}" >&2
        echo "[setup] install them as root: apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    log "installing OS packages: ${missing[*]}"
    apt-get update -qq
    without_starting_services \
        env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Runs a command (apt-get install) with Debian's switch against starting services in place:
# openssh-server would otherwise start a system-wide sshd on port 22, which nothing here
# uses (the tests start servers of their own). An existing policy-rc.d is left as it is.
without_starting_services() {
    local policy=/usr/sbin/policy-rc.d status=0
    if [ -e "$policy" ]; then "$@"; return; fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    "$@" || status=$?
    rm -f "$policy"
    return "$status"
}

# What only the tests need: a real Slurm cluster of namespace hosts (tests/test_slurm.py).
# Installed when running as root; without them those tests are skipped, and training does
# not need them.
install_test_os_packages() {
    local missing=()
    command -v slurmd >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        log "the Slurm tests will be skipped: they need ${missing[*]} (apt-get install as root)"
        return
    fi
    log "installing OS packages for the tests: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

create_venv() {
    [ -x "$venv_dir/bin/python" ] && return
    log "creating virtual environment $venv_dir"
    "$python_bin" -m venv "$venv_dir"
    "$venv_dir/bin/pip" install -q --upgrade pip
}

# Builds the Horovod wheel unless the cache has it. TF 2.21 moved the XLA headers that
# horovod/tensorflow/xla_mpi_ops.cc includes; that file only provides opt-in XLA collectives
# (HOROVOD_ENABLE_XLA_OPS), so it is dropped from the build.
build_horovod_wheel() {
    local py_tag wheel_dir build_dir
    py_tag="$("$venv_dir/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    wheel_dir="${HOROVOD_WHEEL_CACHE:-$HOME/.cache/unet-horovod/wheels}/horovod-$horovod_version-tf$tensorflow_version-$py_tag"
    if ls "$wheel_dir"/horovod-"$horovod_version"-*.whl >/dev/null 2>&1; then
        echo "$wheel_dir"; return
    fi
    log "building Horovod $horovod_version against TensorFlow $tensorflow_version (about 3 minutes)" >&2
    build_dir="$(mktemp -d)"
    (
        cd "$build_dir"
        "$venv_dir/bin/pip" download -q --no-deps --no-binary :all: "horovod==$horovod_version"
        tar xzf "horovod-$horovod_version.tar.gz"
        sed -i '/xla_mpi_ops.cc/d' "horovod-$horovod_version/horovod/tensorflow/CMakeLists.txt"
        HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
            "$venv_dir/bin/pip" wheel -q --no-build-isolation --no-deps -w "$build_dir/out" "./horovod-$horovod_version"
    ) >&2
    mkdir -p "$wheel_dir"
    # Move into place only when complete, so an interrupted build never looks cached.
    mv "$build_dir"/out/horovod-*.whl "$wheel_dir/"
    rm -rf "$build_dir"
    echo "$wheel_dir"
}

install_python_packages() {
    local stamp="$venv_dir/.requirements.sha256" wanted wheel_dir
    wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return
    fi
    log "installing pinned Python packages"
    # TensorFlow first: the Horovod build compiles against it.
    grep -v -e '^horovod==' -e '# no-deps' "$requirements" | "$venv_dir/bin/pip" install -q -r /dev/stdin
    wheel_dir="$(build_horovod_wheel)"
    "$venv_dir/bin/pip" install -q --no-deps --find-links "$wheel_dir" "horovod==$horovod_version"
    grep -v '# no-deps' "$requirements" \
        | "$venv_dir/bin/pip" install -q --find-links "$wheel_dir" -r /dev/stdin
    # Lines marked no-deps declare bounds that would move the pins (see requirements.txt):
    # installed alone, their dependencies being the pinned lines.
    grep '# no-deps' "$requirements" | "$venv_dir/bin/pip" install -q --no-deps -r /dev/stdin
    echo "$wanted" > "$stamp"
}

install_os_packages
install_test_os_packages
create_venv
install_python_packages
log "ready: $venv_dir"
