"""Virtual hosts on one machine: network namespaces joined by a bridge, each running its own sshd.

    with virtual_hosts(n=2) as hosts:          # hosts.names == ["hostA", "hostB"]
        hosts.run(["horovodrun", "-np", "4", "-H", "hostA:2,hostB:2", ...])

Layout (nothing is added to the root namespace):
    namespace hvdmh-switch   bridge br0, one veth end per host
    namespace hvdmh-hostA    veth "hvd0" 10.213.77.11/24, sshd, hostname hostA (own UTS namespace)
    namespace hvdmh-hostB    veth "hvd0" 10.213.77.12/24, ...
Names resolve through /etc/netns/<namespace>/hosts, which `ip netns exec` bind-mounts over
/etc/hosts for everything started in that namespace (sshd and so every ssh session too).
Commands run "on" a host with hosts.command()/hosts.run() (default: the first host, which plays
the login node that launches the job). ssh there goes through a wrapper that adds our throw-away
client config, so neither ~/.ssh nor /etc/ssh is read or written.

Needs root, iproute2, util-linux's unshare and openssh (scripts/setup_multihost.sh installs them).
Only one harness may run at a time on a machine: start-up removes any leftovers by name prefix.
"""
import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time

PREFIX = "hvdmh-"               # namespaces, /etc/netns entries and temp dirs we own
SWITCH = PREFIX + "switch"
SUBNET = "10.213.77"            # private /24 unlikely to clash; hosts get .11, .12, ...
NIC = "hvd0"                    # same name in every host, so --network-interface/if_include work
SSHD = "/usr/sbin/sshd"


def _sh(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def unusable_reason():
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, bridge, sshd)"
    for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"'{tool}' missing: run scripts/setup_multihost.sh"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} missing: run scripts/setup_multihost.sh"
    probe = PREFIX + "probe"
    made = _sh("ip", "netns", "add", probe, check=False)
    _sh("ip", "netns", "del", probe, check=False)
    if made.returncode != 0:
        return f"'ip netns add' does not work here: {made.stderr.strip()}"
    return None


def _our_namespaces():
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _running(pid):
    """False once pid is gone or a zombie (dead; its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill_pids(pids):
    """SIGTERM, then SIGKILL whatever is still running 3 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 3
        while time.time() < deadline and any(map(_running, pids)):
            time.sleep(0.05)
        pids = [p for p in pids if _running(p)]


def cleanup():
    """Remove everything a harness (this one or a crashed earlier one) made. Idempotent."""
    for ns in _our_namespaces():
        # Every process in one of our namespaces is ours (sshd, ssh sessions, ranks): end them by
        # pid, then deleting the namespace takes its veths (and the bridge) with it.
        pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
        _kill_pids([int(p) for p in pids])
        _sh("ip", "netns", "del", ns, check=False)
    for path in glob.glob(f"/etc/netns/{PREFIX}*") + glob.glob(
            os.path.join(tempfile.gettempdir(), PREFIX + "*")):
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir("/etc/netns")          # only if empty, i.e. nobody else uses it


class Hosts:
    def __init__(self, n, tmp):
        self.names = [f"host{chr(ord('A') + i)}" for i in range(n)]
        self.addresses = {name: f"{SUBNET}.{11 + i}" for i, name in enumerate(self.names)}
        self.nic = NIC
        self.tmp = tmp
        self.ssh_config = os.path.join(tmp, "ssh_config")
        self.sshd_pids = []
        self._procs = []
        self._made_run_sshd = False
        # Launchers find `ssh` on PATH: ours comes first (horovodrun and mpirun both call "ssh").
        # Temp files (Open MPI session dirs too, also its remote daemons') go to our temp dir, so
        # even a killed job leaves nothing behind.
        self.env = dict(os.environ, PATH=f"{tmp}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
                        TMPDIR=tmp, OMPI_MCA_orte_tmpdir_base=tmp)

    def namespace(self, host):
        return PREFIX + host

    def command(self, argv, host=None):
        """argv wrapped to run on `host`: in its network namespace, with its hostname."""
        host = host or self.names[0]
        return ["ip", "netns", "exec", self.namespace(host), "unshare", "--uts",
                "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv]

    def run(self, argv, host=None, timeout=240, **kwargs):
        kwargs.setdefault("env", self.env)
        return subprocess.run(self.command(argv, host), timeout=timeout,
                              capture_output=True, text=True, **kwargs)


def _write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _make_ssh_files(hosts):
    tmp = hosts.tmp
    for key in ("host_key", "client_key"):
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", PREFIX + key,
            "-f", os.path.join(tmp, key))
    shutil.copy(f"{tmp}/client_key.pub", f"{tmp}/authorized_keys")
    # Root may log in with the throw-away key only. StrictModes would reject keys under /tmp.
    _write(f"{tmp}/sshd_config", f"""\
HostKey {tmp}/host_key
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
AllowUsers root
""")
    _write(hosts.ssh_config, f"""\
Host *
    User root
    IdentityFile {tmp}/client_key
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    BatchMode yes
    ConnectTimeout 10
    LogLevel ERROR
""")
    os.makedirs(f"{tmp}/bin")
    _write(f"{tmp}/bin/ssh", f'#!/bin/sh\nexec /usr/bin/ssh -F {hosts.ssh_config} "$@"\n', 0o755)


def _make_network(hosts):
    ip = lambda ns, *a: _sh("ip", "-n", ns, *a)
    _sh("ip", "netns", "add", SWITCH)
    ip(SWITCH, "link", "add", "br0", "type", "bridge")
    ip(SWITCH, "link", "set", "br0", "up")
    hosts_file = "127.0.0.1 localhost\n" + "".join(
        f"{addr} {name}\n" for name, addr in hosts.addresses.items())
    for name, addr in hosts.addresses.items():
        ns = hosts.namespace(name)
        _sh("ip", "netns", "add", ns)
        ip(SWITCH, "link", "add", name, "type", "veth", "peer", "name", NIC, "netns", ns)
        ip(SWITCH, "link", "set", name, "master", "br0", "up")
        ip(ns, "addr", "add", f"{addr}/24", "dev", NIC)
        ip(ns, "link", "set", NIC, "up")
        ip(ns, "link", "set", "lo", "up")
        os.makedirs(f"/etc/netns/{ns}")
        _write(f"/etc/netns/{ns}/hosts", hosts_file)


def _start_sshd(hosts):
    if not os.path.isdir("/run/sshd"):           # sshd's privilege-separation directory
        os.makedirs("/run/sshd")
        hosts._made_run_sshd = True
    for name in hosts.names:
        # ip netns exec, unshare and sh all exec, so the pid is sshd's own.
        proc = subprocess.Popen(hosts.command(
            [SSHD, "-D", "-f", f"{hosts.tmp}/sshd_config", "-E", f"{hosts.tmp}/sshd-{name}.log"],
            name), stdin=subprocess.DEVNULL)
        hosts.sshd_pids.append(proc.pid)
        hosts._procs.append(proc)
    # Ready when the first host reaches every host by name through ssh, as a launcher will.
    deadline = time.time() + 20
    for name in hosts.names:
        while hosts.run(["ssh", name, "true"], timeout=20).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError(f"ssh to {name} fails; see {hosts.tmp}/sshd-{name}.log")
            time.sleep(0.1)


@contextlib.contextmanager
def virtual_hosts(n=2):
    """Yield Hosts for n fresh virtual hosts; tear everything down on exit, whatever happens."""
    reason = unusable_reason()
    if reason:
        raise RuntimeError(reason)
    cleanup()
    hosts = Hosts(n, tempfile.mkdtemp(prefix=PREFIX))
    try:
        _make_ssh_files(hosts)
        _make_network(hosts)
        _start_sshd(hosts)
        yield hosts
    finally:
        cleanup()                         # ends sshd and whatever still runs on the hosts
        for proc in hosts._procs:         # reap our sshd children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if hosts._made_run_sshd:         # leave a system sshd's directory alone
            with contextlib.suppress(OSError):
                os.rmdir("/run/sshd")
