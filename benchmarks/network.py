"""Sample shuffling vs ShuffleBatchNorm over a real, shaped network: 2 virtual hosts x 2 ranks.

Builds two hosts from network namespaces (tests/multihost.py: a bridge, a veth per host, sshd),
limits each host's outgoing bandwidth with a token bucket (`tc qdisc ... tbf`; both directions
are shaped, since each host shapes what it sends), and launches benchmarks/net_worker.py with
mpirun, 2 ranks per host (shared memory inside a host, TCP between them), once per rate.
Writes benchmarks/results/network.json; report.py and cost_model.py read it.

    .venv/bin/python benchmarks/network.py                  # about 2-3 minutes on 2 cores
    .venv/bin/python benchmarks/network.py --smoke --out /tmp/n.json   # one point, seconds
Needs root and scripts/setup_multihost.sh (sshd, iproute2).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
import multihost  # noqa: E402

PYTHON = sys.executable
RATES = [None, 25, 10, 1]  # Gbit/s per direction; None: the veth unshaped (CPU-bound copies)
HOSTS, SLOTS = 2, 2


def shape(hosts, rate_gbit):
    """Limit every host's egress on its NIC to ``rate_gbit`` (None: remove the limit)."""
    for name in hosts.names:
        ns = hosts.namespace(name)
        multihost._sh("tc", "-n", ns, "qdisc", "del", "dev", hosts.nic, "root", check=False)
        if rate_gbit is None:
            continue
        # The bucket holds about a millisecond of traffic (at least 1 MiB): large enough for the
        # kernel's timer granularity at 25 Gbit/s, small enough that bursts do not hide the rate.
        burst = max(1 << 20, int(rate_gbit * 1e9 / 8 / 1000))
        multihost._sh("tc", "-n", ns, "qdisc", "add", "dev", hosts.nic, "root", "tbf",
                      "rate", f"{rate_gbit}gbit", "burst", str(burst), "latency", "200ms")


def mpirun(hosts, worker_args, out):
    spec = ",".join(f"{name}:{SLOTS}" for name in hosts.names)
    return ["mpirun", "--allow-run-as-root", "-np", str(HOSTS * SLOTS), "-H", spec,
            "--bind-to", "none", "-mca", "oob_tcp_if_include", hosts.nic,
            "-mca", "btl_tcp_if_include", hosts.nic, "-x", "PYTHONPATH",
            # 4 ranks (and Horovod's 4 threads) on 2 cores: a rank waiting in MPI must yield
            # its core, or the rank it waits for cannot run (ping-pongs took 20 ms without).
            "-mca", "mpi_yield_when_idle", "1",
            PYTHON, str(HERE / "net_worker.py"), *worker_args, "--out", out]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="one rate, one image size, 2 rounds")
    p.add_argument("--out", default=str(HERE / "results" / "network.json"))
    p.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    args = p.parse_args()
    reason = multihost.unusable_reason()
    if reason:
        sys.exit(f"network benchmark needs the multi-host harness: {reason}")
    rates = [10] if args.smoke else RATES
    worker_args = (["--images", "32", "--rounds", "2", "--ping-rounds", "2"] if args.smoke
                   else [])
    result = {"hosts": HOSTS, "slots": SLOTS, "settings": [], "smoke": args.smoke,
              "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    started = time.time()
    with multihost.virtual_hosts(HOSTS) as hosts, tempfile.TemporaryDirectory() as tmp:
        hosts.env["PYTHONPATH"] = str(ROOT)
        for rate in tqdm(rates, desc="link rates", unit="rate"):
            shape(hosts, rate)
            out = os.path.join(tmp, f"rate-{rate}.json")
            command = mpirun(hosts, worker_args, out)
            proc = hosts.run(command, timeout=args.timeout, cwd=str(ROOT))
            tqdm.write(f"[{rate or 'unshaped'} Gbit/s] exit {proc.returncode}\n{proc.stdout[-2000:]}")
            if proc.returncode != 0:
                sys.exit(f"net_worker failed at {rate} Gbit/s:\n{proc.stderr[-4000:]}")
            setting = json.loads(Path(out).read_text())
            setting["rate_gbit"] = rate
            result["settings"].append(setting)
    result["seconds"] = round(time.time() - started, 1)
    result["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
