#!/usr/bin/env bash
# Launches train_horovod.py on every host in hosts.txt with mpirun (one Horovod worker per
# slot), binding each worker to its own cores and exporting the environment it needs.
#
#   ./run_multinode.sh [--hosts FILE] [--dry-run] [-- TRAIN_FLAGS...]
#
# TRAIN_FLAGS go to train_horovod.py, e.g. -- --epochs 4 --batch-size 16.
# Every host must have this project at the same path with the same .venv (passwordless ssh
# from this host, as mpirun requires).
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="$repo_dir/.venv/bin/python"
[ -x "$python_bin" ] || python_bin="$(command -v python3)"
hosts_file="$repo_dir/hosts.txt"
dry_run=0

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_multinode.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --hosts) [ $# -ge 2 ] || die "--hosts needs a file"; hosts_file="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train_horovod.py flags go after --)" ;;
    esac
done
[ -f "$hosts_file" ] || die "$hosts_file: hosts file not found"

# Parse hosts.txt into mpirun's --host list: "name:slots,name:slots".
host_list=""
total_slots=0
first_host_slots=0
line_number=0
while IFS= read -r line || [ -n "$line" ]; do
    line_number=$((line_number + 1))
    line="${line%%#*}"
    read -r host slots_field extra <<<"$line" || true
    [ -n "${host:-}" ] || continue
    [[ "$host" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$ ]] ||
        die "$hosts_file:$line_number: '$host' is not a valid host name or address"
    slots=1
    if [ -n "${slots_field:-}" ]; then
        [[ "$slots_field" =~ ^slots=([1-9][0-9]*)$ ]] ||
            die "$hosts_file:$line_number: expected 'slots=N' after the host, got '$slots_field'"
        slots="${BASH_REMATCH[1]}"
    fi
    [ -z "${extra:-}" ] || die "$hosts_file:$line_number: unexpected '$extra'"
    [ "$first_host_slots" -gt 0 ] || first_host_slots="$slots"
    host_list="${host_list:+$host_list,}$host:$slots"
    total_slots=$((total_slots + slots))
done <"$hosts_file"
[ "$total_slots" -gt 0 ] || die "$hosts_file: no hosts listed"

# Each worker gets its own cores (assumes the hosts are alike: sized from this one).
cores_per_worker=$(( $(nproc) / first_host_slots ))
[ "$cores_per_worker" -ge 1 ] || cores_per_worker=1
read -r kmp_blocktime kmp_affinity < <(cd "$repo_dir" && "$python_bin" -c \
    'import settings; print(settings.KMP_BLOCKTIME, settings.KMP_AFFINITY)')

export OMP_NUM_THREADS="$cores_per_worker" KMP_BLOCKTIME="$kmp_blocktime" KMP_AFFINITY="$kmp_affinity"
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export VIRTUAL_ENV="${VIRTUAL_ENV:-$repo_dir/.venv}"
export PYTHONUNBUFFERED=1

command=(mpirun -np "$total_slots" --host "$host_list"
    --bind-to core --map-by "slot:PE=$cores_per_worker" --report-bindings
    --wdir "$repo_dir")
for variable in PATH PYTHONPATH VIRTUAL_ENV LD_LIBRARY_PATH PYTHONUNBUFFERED OMP_NUM_THREADS \
                KMP_BLOCKTIME KMP_AFFINITY TF_CPP_MIN_LOG_LEVEL; do
    [ -z "${!variable+set}" ] || command+=(-x "$variable")
done
[ "$(id -u)" -ne 0 ] || command+=(--allow-run-as-root)
command+=("$python_bin" "$repo_dir/train_horovod.py" "$@")

if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi
echo "Launching $total_slots workers on $host_list ($cores_per_worker cores each)"
exec "${command[@]}"
