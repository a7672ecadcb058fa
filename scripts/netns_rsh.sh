#!/usr/bin/env bash
# A remote-shell agent for hosts that are Linux network namespaces on this machine: the
# multi-host tests and bench/multihost.py give it to mpirun (--mca plm_rsh_agent) and to
# run_multinode.sh (--agent) in place of ssh.
#
#   netns_rsh.sh [ssh-style options] HOST COMMAND...
#
# HOST is a namespace name or an address that one namespace owns. The command runs inside
# that namespace (its own network stack and addresses) and in a UTS namespace of its own
# whose host name is the namespace name, so Open MPI sees distinct nodes. Like ssh, the
# command words are joined and run by a shell. Needs root.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/ssh_options.sh"
skip_ssh_options "$@"
set -- ${after_ssh_options[@]+"${after_ssh_options[@]}"}
[ $# -ge 1 ] || { echo "netns_rsh.sh: usage: netns_rsh.sh HOST COMMAND..." >&2; exit 255; }
host="$1"; shift

namespace_of() {
    local name
    for name in $(ip netns list | awk '{print $1}'); do
        if [ "$name" = "$1" ] ||
           ip -n "$name" -o -4 addr show 2>/dev/null | awk '{print $4}' | grep -qx "$1/[0-9]*"; then
            echo "$name"; return 0
        fi
    done
    return 1
}

namespace="$(namespace_of "$host")" ||
    { echo "netns_rsh.sh: $host: no network namespace has this name or address" >&2; exit 255; }
# The exit status 255 mirrors ssh's "could not connect" status.
# The command runs in a session of its own (setsid --wait): as with ssh, killing this agent
# (mpirun does when it aborts) does not kill the remote command; a remote Open MPI daemon
# has to notice on its own that mpirun is gone, as on a real cluster.
if [ -z "${NETNS_RSH_PRIVATE_DIR:-}" ]; then
    exec setsid --wait ip netns exec "$namespace" unshare --uts sh -c \
        'hostname "$1"; shift; exec sh -c "$*"' netns_rsh "$namespace" "$@"
fi
# NETNS_RSH_PRIVATE_DIR=DIR gives every host a local disk: inside namespace NAME, DIR is
# DIR@NAME (bind-mounted in a mount namespace of its own), so each host can hold other data.
private_dir="${NETNS_RSH_PRIVATE_DIR%/}"
mkdir -p "$private_dir" "$private_dir@$namespace"
exec setsid --wait ip netns exec "$namespace" unshare --uts --mount sh -c \
    'hostname "$1"; mount --bind "$2@$1" "$2" && shift 2 && exec sh -c "$*"' \
    netns_rsh "$namespace" "$private_dir" "$@"
