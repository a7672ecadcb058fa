#!/usr/bin/env bash
# The launch agent inside a Slurm allocation, in place of ssh: runs a shell command on one
# node of the job with srun, so the launcher's checks (preflight.py) and --sync-data reach
# the nodes that Slurm gave the job even where compute nodes refuse ssh.
#
#   srun_agent.sh [ssh-style options] HOST COMMAND...
#
# Like ssh, the command words are joined and run by a shell on HOST; stdin and stdout pass
# through (rsync -e uses both). The step shares the job's CPUs with the others (--overlap).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/ssh_options.sh"
skip_ssh_options "$@"
set -- ${after_ssh_options[@]+"${after_ssh_options[@]}"}
[ $# -ge 2 ] || { echo "srun_agent.sh: usage: srun_agent.sh HOST COMMAND..." >&2; exit 255; }
[ -n "${SLURM_JOB_ID:-}" ] ||
    { echo "srun_agent.sh: not inside a Slurm allocation (SLURM_JOB_ID is not set)" >&2; exit 255; }
host="$1"; shift
exec srun --jobid="$SLURM_JOB_ID" --nodes=1 --ntasks=1 --nodelist="$host" --overlap \
    --quiet --kill-on-bad-exit=1 bash -c "$*"
