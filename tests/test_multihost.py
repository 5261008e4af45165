"""Multi-host runs on one machine: 2 virtual hosts (network namespaces + sshd, see multihost.py),
2 ranks each, launched from hostA with horovodrun --gloo, horovodrun --mpi and plain mpirun."""
import glob
import os
import re
import subprocess
import sys

import pytest

import multihost

# Cases of tests/dist_worker.py to run across hosts with every launcher, as one launch (each
# launch costs ~10 s of start-up): the numerical checks against the float64 reference, the
# errors, and a case that reports which statistics crossed hosts.
DIST_CASES = ["statistics_cross_hosts shapes_and_uneven_batches permutation_modes bad_inputs "
              "no_input_grad transport_choice others"]

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = os.path.join(HERE, "multihost_probe.py")
WORKER = os.path.join(HERE, "dist_worker.py")
HOSTS, SLOTS = 2, 2
TIMEOUT = 240           # per launch: a hang fails fast instead of eating the session
PYTHON = sys.executable  # the virtualenv's; same path on every virtual host (shared filesystem)
HOROVODRUN = os.path.join(os.path.dirname(PYTHON), "horovodrun")

pytestmark = pytest.mark.multihost


def launcher_argv(launcher, hosts):
    """Launch HOSTS x SLOTS ranks over the virtual hosts, all traffic on their NIC."""
    spec = ",".join(f"{name}:{SLOTS}" for name in hosts.names)
    np_ = str(HOSTS * SLOTS)
    if launcher in ("gloo", "mpi"):
        # --disable-cache: don't trust (or write) horovodrun's 60-minute ssh/NIC check cache.
        return [HOROVODRUN, "-np", np_, "-H", spec, f"--{launcher}", "--network-interface",
                hosts.nic, "--start-timeout", "120", "--disable-cache"]
    # Plain Open MPI: root needs --allow-run-as-root; pin out-of-band and data traffic to the
    # namespace NIC; no core binding, as all virtual hosts share this machine's cores.
    return ["mpirun", "--allow-run-as-root", "-np", np_, "-H", spec, "--bind-to", "none",
            "-mca", "oob_tcp_if_include", hosts.nic, "-mca", "btl_tcp_if_include", hosts.nic]


def require_harness():
    reason = multihost.unusable_reason()
    if reason:
        pytest.skip(f"multi-host harness unavailable: {reason}")


@pytest.fixture
def hosts():
    require_harness()
    with multihost.virtual_hosts(HOSTS) as hosts:
        yield hosts


def launch(hosts, launcher, *extra):
    argv = launcher_argv(launcher, hosts) + [PYTHON, PROBE, str(HOSTS), str(SLOTS), *extra]
    # 4 ranks on 2 shared cores: a rank waiting in MPI must yield its core to the one it waits
    # for (Open MPI spins otherwise; horovodrun --mpi passes this on too).
    proc = hosts.run(argv, timeout=TIMEOUT, cwd=os.path.dirname(HERE),
                     env=dict(hosts.env, OMPI_MCA_mpi_yield_when_idle="1"))
    report = f"$ {' '.join(argv)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    # One report per rank, from both hosts (plain mpirun may interleave the ranks' lines).
    reported_hosts = re.findall(r"probe ok: rank \d+/\d+ .*? host (\S+) ", proc.stdout)
    assert len(reported_hosts) == HOSTS * SLOTS, report
    for name in hosts.names:
        assert reported_hosts.count(name) == SLOTS, report
    return proc


def dist_cases():
    """DIST_CASES, or one visibly skipped placeholder saying why there is nothing to run."""
    why = ("DIST_CASES is empty" if not DIST_CASES else
           None if os.path.exists(WORKER) else "tests/dist_worker.py does not exist yet")
    return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=why))] if why else DIST_CASES


@pytest.mark.parametrize("launcher", ["gloo", "mpi", "mpirun"])
@pytest.mark.parametrize("case", dist_cases())
def test_dist_case_across_hosts(hosts, launcher, case):
    """The probe (every rank on its host, traffic across hosts) then the dist cases, in one
    launch per launcher."""
    proc = launch(hosts, launcher, WORKER, *case.split())
    assert "statistics crossed hosts: rank" in proc.stdout, proc.stdout[-4000:]


def _leftovers():
    """Our namespaces and /etc/netns entries (each namespace line reads "NAME (id: N)")."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines()]
    return [n for n in names if n.startswith(multihost.PREFIX)] + glob.glob(
        f"/etc/netns/{multihost.PREFIX}*")


def test_teardown_leaves_nothing_even_on_error():
    require_harness()
    with pytest.raises(KeyboardInterrupt):      # as if Ctrl-C hit in the middle of a test
        with multihost.virtual_hosts(HOSTS) as hosts:
            pids, tmp = list(hosts.sshd_pids), hosts.tmp
            assert len(_leftovers()) == 2 * HOSTS + 1   # switch + host namespaces, hosts files
            raise KeyboardInterrupt
    assert _leftovers() == []
    assert not os.path.exists(tmp)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"sshd {pid} still running"


def test_cleanup_removes_a_crashed_runs_leftovers():
    require_harness()
    ns = multihost.PREFIX + "hostA"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    stray = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "300"])
    try:
        multihost.cleanup()
        assert stray.wait(timeout=10) != 0          # killed, not finished
        assert _leftovers() == []
    finally:
        stray.kill()
        multihost.cleanup()
