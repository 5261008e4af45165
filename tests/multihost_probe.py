"""Run under any launcher across hosts: checks Horovod sees the expected host layout.

    python tests/multihost_probe.py HOSTS SLOTS [WORKER.py ARGS...]

Asserts size == HOSTS*SLOTS, cross_size == HOSTS, local_size == SLOTS, and that the ranks'
hostnames (gathered with hvd.allgather, so data from every host must arrive) form HOSTS distinct
hosts of SLOTS ranks each. Prints one line per rank.

With a WORKER, it first runs that script as __main__ in this process (sys.argv = [WORKER, ARGS]),
so the worker calls hvd.init() its own way (e.g. with process sets, which only init can take);
the checks then run on that same world (the probe's hvd.init() is a no-op), proving the worker's
ranks spanned the hosts. A failing worker (exception or non-zero exit) fails the run.
"""
import os
import runpy
import socket
import sys

import torch
import horovod.torch as hvd

NAME_BYTES = 64


def run_worker(argv):
    saved = sys.argv, sys.path[0]
    sys.argv, sys.path[0] = argv, os.path.dirname(os.path.abspath(argv[0]))
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    sys.argv, sys.path[0] = saved


def main():
    n_hosts, slots = int(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        run_worker(sys.argv[3:])
    hvd.init()
    me = socket.gethostname()
    # Gloo launches tell each rank its host; MPI ones don't (then only the hostname counts).
    assert os.environ.get("HOROVOD_HOSTNAME", me) == me, (os.environ["HOROVOD_HOSTNAME"], me)
    assert hvd.size() == n_hosts * slots, hvd.size()
    assert hvd.cross_size() == n_hosts, hvd.cross_size()
    assert hvd.local_size() == slots, hvd.local_size()
    assert 0 <= hvd.local_rank() < slots, hvd.local_rank()

    name = torch.zeros(NAME_BYTES, dtype=torch.uint8)
    name[:len(me)] = torch.tensor(list(me.encode()), dtype=torch.uint8)
    row = torch.cat([torch.tensor([hvd.rank(), hvd.local_rank()], dtype=torch.uint8), name])
    rows = hvd.allgather(row.unsqueeze(0), name="multihost_probe")
    ranks_on = {}
    for r in rows:
        host = bytes(r[2:].tolist()).rstrip(b"\0").decode()
        ranks_on.setdefault(host, []).append((int(r[0]), int(r[1])))
    assert sorted(rank for ranks in ranks_on.values() for rank, _ in ranks) == list(range(hvd.size()))
    assert len(ranks_on) == n_hosts, ranks_on
    for host, ranks in ranks_on.items():
        assert sorted(local for _, local in ranks) == list(range(slots)), (host, ranks)
    print(f"probe ok: rank {hvd.rank()}/{hvd.size()} local {hvd.local_rank()}/{hvd.local_size()} "
          f"cross {hvd.cross_rank()}/{hvd.cross_size()} host {me} "
          f"hosts {sorted(ranks_on)}", flush=True)


if __name__ == "__main__":
    main()
