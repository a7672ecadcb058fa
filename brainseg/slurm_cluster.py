"""A real Slurm cluster on one machine: slurmctld and one slurmd per network-namespace host.

Each namespace host of brainseg/netns.py becomes a Slurm node named after its namespace, with
its own address (NodeAddr) and a UTS namespace whose host name is that name, as on a real
cluster (Open MPI and Slurm both tell nodes apart by host name). The controller runs on the
first host. One munge daemon authenticates them all: munge talks over a Unix socket, and the
namespaces share the filesystem. Everything (configuration, state, spool, logs, the munge key)
lives in one private folder, and every daemon is stopped on exit, so nothing is left running
and the machine's own /etc/slurm and /etc/munge are never read or written.

Debian's slurm-wlm and munge packages provide the daemons (scripts/setup.sh installs them when
run as root). Used by tests/test_slurm.py. The configuration is the smallest that a batch job
with srun and Open MPI needs: no cgroups (proctrack/linuxproc, task/none), no accounting
database; finished jobs stay visible to `scontrol show job` for MinJobAge seconds and are
recorded with their exit code in a job-completion log (jobcomp/filetxt).
"""
import contextlib
import os
import shutil
import signal
import subprocess
import time

from brainseg import netns

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")
CONTROLLER_PORT = 16817
NODE_DAEMON_PORT = 16818
START_TIMEOUT_SECONDS = 30


def unavailable_reason():
    """Why a Slurm cluster cannot be made here, or None when it can."""
    reason = netns.unavailable_reason()
    if reason:
        return reason
    missing = [program for program in DAEMONS if shutil.which(program) is None]
    if missing:
        return (f"a test Slurm cluster needs {', '.join(missing)} (Debian packages slurm-wlm "
                f"and munge; scripts/setup.sh installs them as root)")
    return None


def _configuration(folder, cluster, cpus_per_node):
    """slurm.conf for the namespace hosts: node i is namespace i at its address."""
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={address} CPUs={cpus_per_node} State=UNKNOWN"
        for name, address in zip(cluster.namespaces, cluster.hosts))
    return f"""\
ClusterName=brainseg-test
SlurmctldHost={cluster.namespaces[0]}({cluster.hosts[0]})
SlurmctldPort={CONTROLLER_PORT}
SlurmdPort={NODE_DAEMON_PORT}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes share this machine's cores: trust the CPU counts above, not the hardware.
SlurmdParameters=config_overrides
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc={folder}/jobcomp.log
MinJobAge=600
KillWait=10
{nodes}
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """Slurm daemons on a NamespaceCluster; `folder` holds everything they write."""

    def __init__(self, cluster, folder, cpus_per_node=2):
        self.cluster = cluster
        self.folder = os.path.abspath(folder)
        self.cpus_per_node = cpus_per_node
        self.nodes = list(cluster.namespaces)
        self.environment = dict(os.environ, SLURM_CONF=os.path.join(self.folder, "slurm.conf"))
        self.daemons = []

    def start(self):
        os.makedirs(os.path.join(self.folder, "state"), mode=0o700, exist_ok=True)
        for node in self.nodes:
            os.makedirs(os.path.join(self.folder, f"spool-{node}"), exist_ok=True)
        with open(os.path.join(self.folder, "slurm.conf"), "w") as file:
            file.write(_configuration(self.folder, self.cluster, self.cpus_per_node))
        # The machine has cgroup v1 hierarchies under a tmpfs, which slurmd's autodetection
        # does not recognise; task/none and proctrack/linuxproc then use none of them.
        with open(os.path.join(self.folder, "cgroup.conf"), "w") as file:
            file.write("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
        self._start_munge()
        self._spawn(0, "slurmctld", ["slurmctld", "-D", "-i"])
        for index, node in enumerate(self.nodes):
            self._spawn(index, f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait_until_idle()
        return self

    def _start_munge(self):
        key = os.path.join(self.folder, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400), "wb") as file:
            file.write(os.urandom(128))
        subprocess.run(
            ["munged", "--force", f"--key-file={key}", f"--socket={self._munge_socket}",
             f"--pid-file={self.folder}/munged.pid", f"--log-file={self.folder}/munged.log",
             f"--seed-file={self.folder}/munged.seed"],
            check=True, capture_output=True, text=True, timeout=20)

    @property
    def _munge_socket(self):
        return os.path.join(self.folder, "munge.socket")

    def _spawn(self, index, name, argv):
        """Starts a daemon in the foreground on host `index`, in a UTS namespace whose host
        name is the node's, its output going to <folder>/<name>.out."""
        node = self.nodes[index]
        command = ["ip", "netns", "exec", self.cluster.namespaces[index],
                   "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', node, *argv]
        with open(os.path.join(self.folder, f"{name}.out"), "w") as log:
            self.daemons.append(subprocess.Popen(command, env=self.environment, stdout=log,
                                                 stderr=subprocess.STDOUT))

    def _wait_until_idle(self):
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        states = ""
        while time.monotonic() < deadline:
            for daemon in self.daemons:
                if daemon.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited at start-up ({daemon.args[-3:]});"
                                       f" see the logs in {self.folder}")
            result = self.run(["sinfo", "--noheader", "--format=%N %T", "--Node"], check=False)
            states = result.stdout
            if result.returncode == 0 and states.split() and all(
                    line.split()[1] == "idle" for line in states.splitlines()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm nodes did not become idle within {START_TIMEOUT_SECONDS} s "
                           f"(sinfo: {states.strip()!r}); see the logs in {self.folder}")

    def command(self, argv, index=0):
        """argv that runs a Slurm client command (sbatch, scancel, ...) on host `index`."""
        return ["ip", "netns", "exec", self.cluster.namespaces[index], *argv]

    def run(self, argv, index=0, check=True, timeout=60, **kwargs):
        return subprocess.run(self.command(argv, index), env=self.environment, check=check,
                              capture_output=True, text=True, timeout=timeout, **kwargs)

    def job_fields(self, job_id):
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, ...)."""
        output = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)]).stdout
        return dict(field.split("=", 1) for field in output.split() if "=" in field)

    def completion_record(self, job_id):
        """The job-completion log's line for the job, as a dict, or None before it ends."""
        path = os.path.join(self.folder, "jobcomp.log")
        if not os.path.exists(path):
            return None
        with open(path) as file:
            for line in file:
                fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
                if fields.get("JobId") == str(job_id):
                    return fields
        return None

    def stop(self):
        """Stops every daemon (TERM, then KILL), munged last. Safe on a half-started one."""
        for daemon in self.daemons:
            with contextlib.suppress(ProcessLookupError):
                daemon.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        if os.path.exists(self._munge_socket):
            subprocess.run(["munged", "--stop", f"--socket={self._munge_socket}"],
                           check=False, capture_output=True, timeout=20)


@contextlib.contextmanager
def slurm_cluster(num_hosts, folder, cpus_per_node=2):
    """A Slurm cluster of `num_hosts` namespace hosts, stopped and torn down on exit."""
    with netns.namespace_cluster(num_hosts) as cluster:
        slurm = SlurmCluster(cluster, folder, cpus_per_node)
        try:
            yield slurm.start()
        finally:
            slurm.stop()
