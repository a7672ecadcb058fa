"""Namespace hosts reached by real ssh: an OpenSSH server in each, as on a user's cluster.

brainseg/netns.py makes the hosts; this starts Debian's sshd (openssh-server) in each, with
a configuration, host key and port of its own, and gives every host the same ~/.ssh (a
cluster's shared home) holding what a user sets up for run_multinode.sh:

- a key pair without a passphrase, its public half in authorized_keys (no password);
- known_hosts with every host's key, written here, so host keys are checked, never
  accepted blindly;
- a `config` with the port and `StrictHostKeyChecking yes` for the hosts' subnet.

That ~/.ssh is a temporary folder bind-mounted over the real one in each host's own mount
namespace (ssh reads ~/.ssh from the password database, not $HOME, so nothing else can
stand in for it); the real ~/.ssh is never read or written (an empty one is made as the
mount point when there is none). Each host's name resolves to its address, as a cluster's
DNS or /etc/hosts makes it (Horovod's Gloo needs it, see README "Without MPI"): the hosts
see /etc/hosts with a line per host added, bind-mounted the same way. Every command a
host's sshd is asked to run is recorded (ForceCommand) in a file of its own, so tests can
check what crossed the network, such as the environment horovodrun puts on the ssh
command line. Needs root, iproute2, util-linux
and openssh-server (scripts/setup.sh installs it).
"""
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time

from brainseg import netns

SSHD = "/usr/sbin/sshd"
SSH_PORT = 2222  # every host has its own network stack: the same port on each, not 22
START_TIMEOUT = 20  # seconds for every sshd to accept the test's key

# Runs on the host for each ssh session: records the command, then runs it as sshd would
# have without a ForceCommand ($SHELL -c COMMAND, or a login shell when there is none).
RECORDER = """#!/bin/sh
printf '%s' "$SSH_ORIGINAL_COMMAND" > "$(mktemp "$1/command.XXXXXX")"
[ -n "$SSH_ORIGINAL_COMMAND" ] || exec "$SHELL" -l
exec "$SHELL" -c "$SSH_ORIGINAL_COMMAND"
"""


def unavailable_reason():
    """Why ssh namespace hosts cannot be made here, or None when they can."""
    reason = netns.unavailable_reason()
    if reason:
        return reason
    for program in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not program or not os.access(program, os.X_OK):
            return "ssh namespace hosts need openssh-server and openssh-client " \
                   "(scripts/setup.sh installs them)"
    return None


def home_ssh_dir():
    """~/.ssh as ssh finds it: in the user's password-database home, whatever $HOME says."""
    return os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".ssh")


def keygen(path, comment):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, capture_output=True, timeout=30)
    with open(path + ".pub") as file:
        return file.read().strip()


class SshCluster:
    """A NamespaceCluster whose hosts run sshd; every file lives in one temporary folder:
    `home_ssh/` (the hosts' ~/.ssh), `host<N>/` (a host's sshd config, key, pid file, log)
    and `commands/` (one file per command that an ssh session ran)."""

    def __init__(self, num_hosts):
        self.cluster = netns.NamespaceCluster(num_hosts, kind="s")
        self.hosts = self.cluster.hosts
        self.subnet = self.cluster.subnet
        self.root = tempfile.mkdtemp(prefix="brainseg-ssh-")
        self.home_ssh = os.path.join(self.root, "home_ssh")
        self.etc_hosts = os.path.join(self.root, "etc_hosts")
        self.commands_dir = os.path.join(self.root, "commands")
        self.recorder = os.path.join(self.root, "record_command.sh")
        self.servers = []

    # --- set-up ---------------------------------------------------------------------------

    def create(self):
        self.cluster.create()
        os.makedirs(self.commands_dir)
        self._write_client_files(self._write_host_keys())
        self._write_etc_hosts()
        self._write(self.recorder, RECORDER, mode=0o755)
        os.makedirs(home_ssh_dir(), mode=0o700, exist_ok=True)  # the bind mount's target
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation
        for index in range(len(self.hosts)):
            self.servers.append(self._start_sshd(index))
        self._wait_until_every_host_answers()
        return self

    def host_dir(self, index):
        return os.path.join(self.root, f"host{index + 1}")

    def _write_host_keys(self):
        """One host key per host; returns the known_hosts lines that vouch for them."""
        lines = []
        for index, address in enumerate(self.hosts):
            os.makedirs(self.host_dir(index), mode=0o700)
            public = keygen(os.path.join(self.host_dir(index), "ssh_host_ed25519_key"),
                            f"host {address}")
            lines.append(f"[{address}]:{SSH_PORT} {' '.join(public.split()[:2])}\n")
        return lines

    def _write_client_files(self, known_hosts_lines):
        os.makedirs(self.home_ssh, mode=0o700)
        user_key = keygen(os.path.join(self.home_ssh, "id_ed25519"), "brainseg test user")
        self._write(os.path.join(self.home_ssh, "authorized_keys"), user_key + "\n")
        self._write(os.path.join(self.home_ssh, "known_hosts"), "".join(known_hosts_lines))
        self._write(os.path.join(self.home_ssh, "config"), (
            "# The namespace hosts of one test run (brainseg/netns_ssh.py)\n"
            f"Host {self.cluster.subnet_prefix}.*\n"
            f"    Port {SSH_PORT}\n"
            "    StrictHostKeyChecking yes\n"
            "    BatchMode yes\n"))

    def _write_etc_hosts(self):
        """This machine's /etc/hosts, and every host's name with its address."""
        with open("/etc/hosts") as file:
            machine = file.read()
        names = "".join(f"{address} {namespace}\n" for address, namespace
                        in zip(self.hosts, self.cluster.namespaces))
        self._write(self.etc_hosts, machine.rstrip("\n") + "\n" + names, mode=0o644)

    def _write_server_config(self, index):
        host_dir = self.host_dir(index)
        config = os.path.join(host_dir, "sshd_config")
        self._write(config, "\n".join([
            f"ListenAddress {self.hosts[index]}:{SSH_PORT}",
            f"HostKey {host_dir}/ssh_host_ed25519_key",
            f"PidFile {host_dir}/sshd.pid",
            "AuthorizedKeysFile .ssh/authorized_keys",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            # PAM's session modules (pam_loginuid) fail in containers; keys need no PAM.
            "UsePAM no",
            "PrintMotd no",
            "LogLevel VERBOSE",
            f"ForceCommand {self.recorder} {self.commands_dir}",
            ""]))
        return config

    @staticmethod
    def _write(path, text, mode=0o600):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as file:
            file.write(text)

    def _start_sshd(self, index):
        """sshd in the foreground (-D), its log in the host's folder; its pid is the
        Popen's (ip netns exec, unshare and the shell all exec)."""
        config = self._write_server_config(index)
        with open(os.path.join(self.host_dir(index), "sshd.log"), "w") as log:
            return subprocess.Popen(self.on_host(index, [SSHD, "-D", "-e", "-f", config]),
                                    stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def on_host(self, index, argv):
        """argv that runs `argv` on host `index` as a user logged in there: inside its
        network namespace, with its host name (its own UTS namespace, so Open MPI sees
        distinct nodes), the cluster's ~/.ssh and /etc/hosts (its own mount namespace)."""
        setup = ('hostname "$1" && mount --bind "$2" "$3" && mount --bind "$4" /etc/hosts '
                 '&& shift 4 && exec "$@"')
        namespace = self.cluster.namespaces[index]
        return ["ip", "netns", "exec", namespace, "unshare", "--uts", "--mount", "sh", "-c",
                setup, "on_host", namespace, self.home_ssh, home_ssh_dir(), self.etc_hosts,
                *argv]

    def _wait_until_every_host_answers(self):
        """Logs in from host 1 to every host with the test's key, as a user's ssh would:
        proves the server, the key and the host-key check work before any test runs."""
        deadline = time.monotonic() + START_TIMEOUT
        for index, address in enumerate(self.hosts):
            while True:
                result = subprocess.run(self.on_host(0, ["ssh", address, "true"]), check=False,
                                        capture_output=True, text=True, timeout=START_TIMEOUT)
                if result.returncode == 0:
                    break
                if self.servers[index].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ssh to namespace host {address} failed (exit {result.returncode}): "
                        f"{result.stderr.strip()}\nits sshd's log:\n{self.sshd_log(index)}")
                time.sleep(0.2)

    # --- use ------------------------------------------------------------------------------

    def sshd_log(self, index):
        with open(os.path.join(self.host_dir(index), "sshd.log")) as file:
            return file.read()

    def recorded_commands(self):
        """Every command an ssh session was asked to run so far, in no particular order."""
        commands = []
        for name in sorted(os.listdir(self.commands_dir)):
            with open(os.path.join(self.commands_dir, name)) as file:
                commands.append(file.read())
        return commands

    def write_hosts_file(self, path, num_hosts=None, slots=1):
        return self.cluster.write_hosts_file(path, num_hosts, slots)

    def pids(self, index):
        """Processes on host `index`, its sshd left out (it runs for the whole test)."""
        servers = {server.pid for server in self.servers}
        return [pid for pid in self.cluster.pids(index) if pid not in servers]

    def all_pids(self, include_servers=False):
        """{namespace: pids} of the processes on each host, sshd itself left out unless
        asked for (it runs for the whole test)."""
        servers = {server.pid for server in self.servers}
        return {namespace: [pid for pid in pids if include_servers or pid not in servers]
                for namespace, pids in self.cluster.all_pids().items()}

    # --- tear-down ------------------------------------------------------------------------

    def destroy(self):
        """Stops every sshd, then everything else in the namespaces, and removes them and
        the temporary folder. Safe to call on a half-built cluster."""
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=5)
        self.cluster.destroy()  # SIGKILLs whatever is left, sshd included
        for server in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def ssh_cluster(num_hosts):
    """An SshCluster that is torn down on exit, whatever happened inside."""
    cluster = SshCluster(num_hosts)
    try:
        yield cluster.create()
    finally:
        cluster.destroy()
