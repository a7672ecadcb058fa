# Sourced by the launch agents that stand in for ssh (netns_rsh.sh, srun_agent.sh):
# mpirun, rsync and preflight.py pass them ssh options (e.g. "-l user", "-x",
# "-o BatchMode=yes"), which neither needs. After `skip_ssh_options "$@"`, the words from
# the host on are in the array after_ssh_options.
skip_ssh_options() {
    while [ $# -gt 0 ]; do
        case "$1" in
            -l|-p|-o|-i|-e) shift 2 ;;
            -*) shift ;;
            *) break ;;
        esac
    done
    after_ssh_options=("$@")
}
