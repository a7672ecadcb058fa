"""A cluster of hosts on one machine: Linux network namespaces joined by a bridge.

Each host is a network namespace with its own address on a private /24 subnet, joined to the
others through a veth pair plugged into a Linux bridge, and reached with
scripts/netns_rsh.sh (the launch agent, in place of ssh). All hosts share the filesystem,
so the project, its .venv and the data are at the same path on every host, as on a real
cluster with a shared home; NETNS_RSH_PRIVATE_DIR gives each host a folder of its own. Used
by tests/test_multihost.py and bench/multihost.py. Needs root and iproute2.
"""
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.join(REPO_DIR, "scripts", "netns_rsh.sh")


def unavailable_reason():
    """Why namespace hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns add, veth pairs, a bridge)"
    if shutil.which("ip") is None:
        return "network-namespace hosts need iproute2's `ip` command"
    if shutil.which("unshare") is None:
        return "network-namespace hosts need util-linux's `unshare` command"
    return None


def ip(*words, check=True):
    return subprocess.run(["ip", *words], check=check, capture_output=True, text=True)


# Each kind of cluster has a name prefix and a range of subnets of its own, so that the
# tests of one kind never meet the names or addresses of another's running at the same time:
# {prefix: first of 50 second octets}. "u": tests/test_multihost.py and bench/multihost.py
# (reached with scripts/netns_rsh.sh); "s": brainseg/netns_ssh.py (OpenSSH servers).
CLUSTER_KINDS = {"u": 200, "s": 150}


class NamespaceCluster:
    """`num_hosts` namespace hosts; names and the subnet derive from this process's id so
    that concurrent test runs do not collide, and from `kind` (CLUSTER_KINDS)."""

    def __init__(self, num_hosts, kind="u"):
        tag = f"{kind}{os.getpid()}"  # at most 8 characters: interface names stay under 16
        self.bridge = f"{tag}br"
        self.namespaces = [f"{tag}h{i + 1}" for i in range(num_hosts)]
        self.veths = [f"{tag}v{i + 1}" for i in range(num_hosts)]
        second_octet = CLUSTER_KINDS[kind] + os.getpid() % 50
        self.subnet_prefix = f"10.{second_octet}.{os.getpid() % 250 + 1}"
        self.subnet = f"{self.subnet_prefix}.0/24"
        self.hosts = [f"{self.subnet_prefix}.{i + 1}" for i in range(num_hosts)]

    def create(self):
        remove_stale_clusters()
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")
        for namespace, veth, address in zip(self.namespaces, self.veths, self.hosts):
            ip("netns", "add", namespace)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")  # orted and MPI use loopback too
        return self

    def write_hosts_file(self, path, num_hosts=None, slots=1):
        with open(path, "w") as file:
            for host in self.hosts[:num_hosts]:
                file.write(f"{host} slots={slots}\n")
        return str(path)

    def command_on(self, index, command):
        """argv that runs the shell `command` on host `index` (0 is the launching host)."""
        return [AGENT, self.namespaces[index], command]

    def pids(self, index):
        """Processes running on host `index` (every process in its network namespace)."""
        result = ip("netns", "pids", self.namespaces[index], check=False)
        return [int(pid) for pid in result.stdout.split()]

    def all_pids(self):
        return {namespace: self.pids(i) for i, namespace in enumerate(self.namespaces)}

    def transmitted_bytes(self, index):
        """Bytes host `index` sent onto the bridge (counted on the bridge side of its veth)."""
        with open(f"/sys/class/net/{self.veths[index]}/statistics/rx_bytes") as file:
            return int(file.read())

    def cut_off(self, index):
        """Pulls the host's cable: its veth goes down, its processes keep running."""
        ip("link", "set", self.veths[index], "down")

    def reconnect(self, index, timeout=20):
        """Plugs the cable back and waits until the host reaches host 0 over TCP again."""
        ip("link", "set", self.veths[index], "up")
        probe = ("import socket, time\n"
                 "for attempt in range(40):\n"
                 "    try:\n"
                 f"        socket.create_connection(('{self.hosts[0]}', 9), timeout=0.5)\n"
                 "    except ConnectionRefusedError:\n"
                 "        break  # the host answered: nothing listens on port 9\n"
                 "    except OSError:\n"
                 "        time.sleep(0.5)\n"
                 "else:\n"
                 "    raise SystemExit('unreachable')\n")
        subprocess.run(["ip", "netns", "exec", self.namespaces[index], sys.executable, "-c", probe],
                       check=True, timeout=timeout, capture_output=True)

    def kill_everything(self):
        for index in range(len(self.namespaces)):
            for pid in self.pids(index):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def destroy(self):
        """Kills every process left in the namespaces, then removes namespaces, veths and
        the bridge. Safe to call on a half-built cluster."""
        self.kill_everything()
        deadline = time.monotonic() + 10
        while any(self.all_pids().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for namespace in self.namespaces:
            ip("netns", "delete", namespace, check=False)  # takes its end of the veth along
        for veth in self.veths:
            ip("link", "delete", veth, check=False)
        ip("link", "delete", self.bridge, check=False)


def remove_stale_clusters():
    """Deletes clusters whose creating process is gone without tearing them down (a test
    run killed with SIGKILL cannot run its clean-up)."""
    names = ip("netns", "list", check=False).stdout.split()
    kind = f"[{''.join(CLUSTER_KINDS)}]"
    links = re.findall(rf"^\d+: ({kind}\d+(?:br|v\d+))[@:]", ip("-o", "link").stdout, re.M)
    for name in names + links:
        match = re.fullmatch(rf"{kind}(\d+)(h\d+|br|v\d+)", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            tag_pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split() if name in names else []
            for pid in tag_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            ip(*(["netns", "delete"] if name in names else ["link", "delete"]), name,
               check=False)


@contextlib.contextmanager
def namespace_cluster(num_hosts, kind="u"):
    """A NamespaceCluster that is torn down on exit, whatever happened inside."""
    cluster = NamespaceCluster(num_hosts, kind)
    try:
        yield cluster.create()
    finally:
        cluster.destroy()
