#!/usr/bin/env bash
# Launches train_horovod.py with mpirun on every host in hosts.txt, or inside a Slurm job on
# the job's nodes: one Horovod worker per slot (task), each bound to its own cores.
#
#   ./run_multinode.sh [--hosts FILE] [--agent CMD] [--network NET] [--sync-data]
#                      [--host-timeout SECONDS] [--no-preflight | --preflight-only]
#                      [--gloo] [--dry-run] [-- TRAIN_FLAGS...]
#
# TRAIN_FLAGS go to train_horovod.py, e.g. -- --epochs 4 --batch-size 16.
#   --agent CMD       how to reach the hosts (default LAUNCH_AGENT: ssh; Open MPI plm_rsh_agent)
#   --network NET     interfaces or CIDR subnets the ranks talk over (default NETWORK_INTERFACE)
#   --sync-data       rsync DATA_DIR to every host over the agent first (only what differs)
#   --host-timeout S  a host silent this long stops the job (default HOST_TIMEOUT_SECONDS)
#   --gloo            launch with horovodrun's Gloo controller instead of mpirun (ssh only)
#   --no-preflight    skip the check that every host answers and has the same project,
#                     Python environment and data; --preflight-only: check, do not train
# Every host needs this project at the same path with the same .venv, reachable with the
# agent without a password (see README, "Multi-node execution").
set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python_bin="$repo_dir/.venv/bin/python"
[ -x "$python_bin" ] || python_bin="$(command -v python3)"
hosts_file=""
dry_run=0
agent=""
network=""
network_set=0
preflight=1
preflight_only=0
sync_data=""
host_timeout=""
gloo=0

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "run_multinode.sh: $*" >&2; exit 2; }

# A TERM, INT or HUP (a batch system's time limit, Ctrl-C, a closed terminal) at any moment
# stops everything this script started. What runs (preflight with the agent or rsync it
# started, or mpirun and through it every rank) is a child in a session and process group of
# its own (run_child), which the trap signals; the script exits non-zero once it is gone.
child_pid=""
starting_child=0
stop_signal=""
phase="start-up"
on_signal() {
    [ -z "$stop_signal" ] || return 0  # once: a second TERM makes mpirun abandon its ranks
    stop_signal="$1"
    if [ -n "$child_pid" ]; then
        signal_child TERM
    elif [ "$starting_child" -eq 0 ]; then
        stopped_by_signal
    fi  # else run_child stops the child it is starting as soon as it has its pid
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# The child's process group; the child alone if it has not made its group yet (it has not
# been waited for, so its pid cannot belong to another process).
signal_child() {
    kill "-$1" -- "-$child_pid" 2>/dev/null || kill "-$1" "$child_pid" 2>/dev/null || true
}

stopped_by_signal() {
    echo "run_multinode.sh: stopped by a signal. Rerun the same command to resume from the" \
         "last checkpoint in the output folder. (SIG$stop_signal during $phase; every" \
         "process it started has ended.)" >&2
    exit $((128 + $(kill -l "$stop_signal")))
}

# Runs a command as that child, in the background so that the trap runs as soon as a signal
# comes (bash runs traps between commands, and `wait` is one), and returns its exit status.
# After a signal, whatever its session still holds after a grace period is killed (mpirun's
# local ranks have process groups of their own in it, an agent's children are in the
# child's), and the script stops.
run_child() {
    starting_child=1
    setsid "$@" &
    child_pid=$!
    starting_child=0
    [ -z "$stop_signal" ] || signal_child TERM
    local status=0 grace=50
    while :; do
        wait "$child_pid" && status=0 || status=$?
        kill -0 "$child_pid" 2>/dev/null || break  # wait returned for a trapped signal
    done
    if [ -n "$stop_signal" ]; then
        while pgrep -s "$child_pid" >/dev/null && [ "$grace" -gt 0 ]; do
            sleep 0.1
            grace=$((grace - 1))
        done
        pkill -KILL -s "$child_pid" 2>/dev/null || true
        stopped_by_signal
    fi
    child_pid=""
    return "$status"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --hosts) [ $# -ge 2 ] || die "--hosts needs a file"; hosts_file="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --agent) [ $# -ge 2 ] && [ -n "$2" ] || die "--agent needs a command"
                 agent="$2"; shift 2 ;;
        --network) [ $# -ge 2 ] || die "--network needs interfaces or subnets"
                   network="$2"; network_set=1; shift 2 ;;
        --sync-data) sync_data="--sync-data"; shift ;;
        --host-timeout) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || die "--host-timeout needs whole seconds"
                        host_timeout="$2"; shift 2 ;;
        --no-preflight) preflight=0; shift ;;
        --gloo) gloo=1; shift ;;
        --preflight-only) preflight_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train_horovod.py flags go after --)" ;;
    esac
done

# Defaults from settings.py, and the data folder the training flags name: shell-quoted
# assignments of setting_hosts_file, setting_launch_agent, setting_network_interface,
# setting_host_timeout_seconds, setting_kmp_blocktime, setting_kmp_affinity, setting_data_dir.
launch_settings="$(cd "$repo_dir" && "$python_bin" -m brainseg.launch_settings -- "$@")" ||
    die "cannot read settings.py or the training flags (see the error above)"
eval "$launch_settings"
# Inside a Slurm allocation (sbatch, salloc) the job's nodes and tasks are the hosts and
# slots, unless --hosts names a file; the checks reach the nodes with srun, not ssh, and
# mpirun starts its daemons with srun itself (Open MPI's Slurm support).
if [ -z "$hosts_file" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    hosts_source="the Slurm allocation of job $SLURM_JOB_ID"
    hosts_text="$(cd "$repo_dir" && "$python_bin" -m brainseg.slurm)" ||
        die "cannot read the hosts of Slurm job $SLURM_JOB_ID (see the error above)"
    [ -n "$agent" ] || agent="$repo_dir/scripts/srun_agent.sh"
else
    [ -n "$hosts_file" ] || hosts_file="$setting_hosts_file"
    [ -f "$hosts_file" ] || die "$hosts_file: hosts file not found"
    hosts_source="$hosts_file"
    hosts_text="$(cat "$hosts_file")"
fi

# Parse the hosts ("name slots=N" lines) into mpirun's --host list: "name:slots,name:slots".
host_list=""
hosts=()
total_slots=0
first_host_slots=0
line_number=0
while IFS= read -r line || [ -n "$line" ]; do
    line_number=$((line_number + 1))
    line="${line%%#*}"
    read -r host slots_field extra <<<"$line" || true
    [ -n "${host:-}" ] || continue
    [[ "$host" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$ ]] ||
        die "$hosts_source:$line_number: '$host' is not a valid host name or address"
    slots=1
    if [ -n "${slots_field:-}" ]; then
        [[ "$slots_field" =~ ^slots=([1-9][0-9]*)$ ]] ||
            die "$hosts_source:$line_number: expected 'slots=N' after the host, got '$slots_field'"
        slots="${BASH_REMATCH[1]}"
    fi
    [ -z "${extra:-}" ] || die "$hosts_source:$line_number: unexpected '$extra'"
    [ "$first_host_slots" -gt 0 ] || first_host_slots="$slots"
    host_list="${host_list:+$host_list,}$host:$slots"
    hosts+=("$host")
    total_slots=$((total_slots + slots))
done <<<"$hosts_text"
[ "$total_slots" -gt 0 ] || die "$hosts_source: no hosts listed"

# Each worker gets its own cores (assumes the hosts are alike: sized from this one).
cores_per_worker=$(( $(nproc) / first_host_slots ))
[ "$cores_per_worker" -ge 1 ] || cores_per_worker=1
[ -n "$host_timeout" ] || host_timeout="$setting_host_timeout_seconds"
[ -n "$agent" ] || agent="$setting_launch_agent"
[ "$network_set" -eq 1 ] || network="$setting_network_interface"
[[ "$network" =~ ^[A-Za-z0-9_.:/,-]*$ ]] ||
    die "--network: '$network' is not a list of interfaces or subnets"

export OMP_NUM_THREADS="$cores_per_worker" KMP_BLOCKTIME="$setting_kmp_blocktime" \
    KMP_AFFINITY="$setting_kmp_affinity"
export PYTHONPATH="$repo_dir${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export VIRTUAL_ENV="${VIRTUAL_ENV:-$repo_dir/.venv}"
export PYTHONUNBUFFERED=1

mpirun_command() {
    command=(mpirun -np "$total_slots" --host "$host_list"
        --bind-to core --map-by "slot:PE=$cores_per_worker" --report-bindings
        --wdir "$repo_dir"
        --mca plm_rsh_agent "$agent")
    # A host that goes silent (link down, node off) is declared lost after about
    # HOST_TIMEOUT_SECONDS: TCP keepalive on the daemons' connections, probing every 2 s.
    local keepalive_interval=2 keepalive_probes=3 keepalive_idle
    keepalive_idle=$(( host_timeout - keepalive_interval * keepalive_probes ))
    [ "$keepalive_idle" -ge 1 ] || keepalive_idle=1
    command+=(--mca oob_tcp_keepalive_time "$keepalive_idle"
        --mca oob_tcp_keepalive_intvl "$keepalive_interval"
        --mca oob_tcp_keepalive_probes "$keepalive_probes")
    if [ -n "$network" ]; then
        command+=(--mca oob_tcp_if_include "$network" --mca btl_tcp_if_include "$network")
    fi
    for variable in $(forwarded_variables); do command+=(-x "$variable"); done
    [ "$(id -u)" -ne 0 ] || command+=(--allow-run-as-root)
}

# The variables every rank gets from this host, by either launcher: those set of the list
# below and the HOROVOD_* ones (Horovod's tuning), never one whose name suggests a secret.
# horovodrun writes each one's value into the ssh command line, which every user of the
# remote host can read (ps), so a secret must not be among them whatever its name's prefix.
forwarded_variables() {
    local variable
    for variable in PATH PYTHONPATH VIRTUAL_ENV LD_LIBRARY_PATH PYTHONUNBUFFERED \
                    OMP_NUM_THREADS KMP_BLOCKTIME KMP_AFFINITY TF_CPP_MIN_LOG_LEVEL \
                    $(compgen -e | grep '^HOROVOD_' || true); do
        [ -n "${!variable+set}" ] || continue
        looks_secret "$variable" || echo "$variable"
    done
}

looks_secret() {
    [[ "${1^^}" =~ TOKEN|SECRET|KEY|PASSW|CREDENTIAL|AUTH ]]
}

# horovodrun with Gloo: no MPI needed. It reaches other hosts with ssh, takes interface
# names (not subnets), and does not bind. It forwards its whole environment to every rank,
# on the ssh command line (`env NAME=VALUE... python ...`), so it runs in an environment
# emptied (env -i) down to the forwarded variables and what it and ssh need here (home,
# user, ssh-agent socket). --disable-cache: the checks above have just reached every host;
# horovodrun's cache (in ~/.horovod) would trust an hour-old ssh check instead of its own.
horovodrun_command() {
    [ "$agent" = "ssh" ] ||
        die "--gloo: horovodrun reaches other hosts with ssh only, not '$agent'"
    [[ ! "$network" =~ / ]] ||
        die "--gloo: horovodrun takes interface names (e.g. eth0), not the subnet '$network'"
    local horovodrun="$repo_dir/.venv/bin/horovodrun" variable
    [ -x "$horovodrun" ] || horovodrun=horovodrun
    command=(env -i)
    for variable in $(forwarded_variables) HOME USER LOGNAME LANG SSH_AUTH_SOCK; do
        [ -z "${!variable+set}" ] || command+=("$variable=${!variable}")
    done
    command+=("$horovodrun" --gloo -np "$total_slots" -H "$host_list"
        --gloo-timeout-seconds "$host_timeout" --disable-cache)
    [ -z "$network" ] || command+=(--network-interfaces "$network")
    # horovodrun's parser reads every word of its command line, the training flags too: it
    # would take `--timeline FILE` for its own --timeline-filename (or call it ambiguous).
    # After `--` it reads none, but keeps the `--` in the command it runs: `env --` runs
    # the rest unchanged.
    command+=(env --)
}

if [ "$gloo" -eq 1 ]; then horovodrun_command; else mpirun_command; fi
command+=("$python_bin" "$repo_dir/train_horovod.py" "$@")

if [ "$dry_run" -eq 1 ]; then
    printf '%q ' "${command[@]}"; echo
    exit 0
fi

cd "$repo_dir"  # relative paths in TRAIN_FLAGS are relative to the project, as with --wdir

# Before launching: every host answers and can run the same job on the same data.
if [ "$preflight" -eq 1 ] || [ "$preflight_only" -eq 1 ] || [ -n "$sync_data" ]; then
    phase="the checks before launching"
    run_child "$python_bin" preflight.py --launch-agent "$agent" \
        --host-timeout-seconds "$host_timeout" --data-dir "$setting_data_dir" \
        $sync_data -- "${hosts[@]}" || exit 2
fi
[ "$preflight_only" -eq 0 ] || exit 0
echo "Launching $total_slots workers on $host_list ($cores_per_worker cores each)"
phase="training"
status=0
run_child "${command[@]}" || status=$?
if [ "$status" -ne 0 ]; then
    echo "run_multinode.sh: training failed (${command[0]##*/} exit status $status); its" \
         "message above names the rank or host. Rerun the same command to resume from the" \
         "last checkpoint in the output folder." >&2
fi
exit "$status"
