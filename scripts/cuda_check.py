"""The CUDA checks, for any machine with a GPU (Horovod only for the third):

    python scripts/cuda_check.py

1. groups on one process: ShuffleBatchNorm(groups_per_rank=k), both borrow_from modes, on CUDA
   tensors (float32, float16, channels_last) against the float64 reference computed on the CPU;
2. the torch.distributed transport with CUDA tensors on 2 processes: the default multi-backend
   group ("cpu:gloo,cuda:nccl": rows stay on each input's GPU, and no layer syncs the device:
   its check waits for the step's one read) when there are 2 GPUs or more, Gloo (rows staged
   through the host) otherwise;
3. (3 GPUs or more, Horovod built with NCCL) the Horovod transport with CUDA tensors on 3 ranks
   under a permutation where rank 0 lends to itself and sends no rows while ranks 1 and 2 swap:
   every rank must submit its all-to-all on its GPU, the empty one included (Horovod refuses
   "Mismatched ALLTOALL CPU/GPU device selection" otherwise).

It prints one line per check (PASS, FAIL or SKIP with the reason) and exits non-zero on a FAIL.
"""
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from hvd_shufflebn import ShuffleBatchNorm  # noqa: E402
from reference import reference_groups, reference_running  # noqa: E402


def report(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def check_groups_one_process(device):
    ok = True
    for k, dtype, channels_last, mode in ((2, torch.float32, False, "permutation"),
                                          (4, torch.float32, True, "permutation"),
                                          (3, torch.float16, False, "permutation"),
                                          (3, torch.float32, True, "others"),
                                          (2, torch.float16, False, "others")):
        torch.manual_seed(k)
        layer = ShuffleBatchNorm(8, groups_per_rank=k, momentum=0.5, borrow_from=mode).to(device)
        x = torch.randn(4 * k + 1, 8, 6, 6, device=device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x = x.to(dtype).requires_grad_()
        dy = torch.randn_like(x)
        before = (layer.running_mean.clone(), layer.running_var.clone())
        y = layer(x)
        y.backward(dy)
        ys, dxs, dws, dbs = reference_groups([x.detach().cpu().double()], [dy.cpu().double()],
                                             [layer.weight.detach().cpu()],
                                             [layer.bias.detach().cpu()],
                                             layer.last_permutation or "others", layer.eps, k)
        tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
        errors = [float((a.detach().cpu().double() - b).abs().max())
                  for a, b in ((y, ys[0]), (x.grad, dxs[0]), (layer.weight.grad, dws[0]),
                               (layer.bias.grad, dbs[0]))]
        mean, _ = reference_running([x.detach().cpu()], *[t.cpu() for t in before], 0.5)
        errors.append(float((layer.running_mean.cpu().double() - mean).abs().max()))
        good = all(e <= tol["atol"] + tol["rtol"] for e in errors)
        if channels_last:
            good &= y.is_contiguous(memory_format=torch.channels_last)
        ok &= report(f"groups on one process, k={k}, {dtype}, channels_last={channels_last}, "
                     f"borrow_from={mode!r}",
                     good, f"max errors {', '.join(f'{e:.1e}' for e in errors)}")
    return ok


def distributed_worker(rank, size, backend, path):
    import torch.distributed as dist
    dist.init_process_group(backend, init_method=f"file://{path}", rank=rank, world_size=size)
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    layer = ShuffleBatchNorm(8, groups_per_rank=2).to(device)
    torch.manual_seed(rank)
    x = torch.randn(6, 8, 4, 4, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    layer(x).backward(dy)
    y = layer(x)  # step 2: the output of a fresh forward, checked below
    where = layer._transport.rows_device(device)
    y.backward(dy)
    everyone = [None] * size
    dist.all_gather_object(everyone, (x.detach().cpu(), dy.cpu(), y.detach().cpu(),
                                      layer.weight.detach().cpu(), layer.bias.detach().cpu()))
    ys, _, _, _ = reference_groups([e[0].double() for e in everyone],
                                   [e[1].double() for e in everyone],
                                   [e[3] for e in everyone], [e[4] for e in everyone],
                                   layer.last_permutation, layer.eps, 2)
    error = max(float((e[2].double() - ys[r]).abs().max()) for r, e in enumerate(everyone))
    # Under NCCL (alone or in the default "cpu:gloo,cuda:nccl" group) the rows stay on the input's
    # own GPU; under Gloo they go through the host.
    right_device = where == (device if "nccl" in backend else torch.device("cpu"))
    synced = no_sync_in_layers(layer, x, dy) if "nccl" in backend else None
    if rank == 0:
        report(f"torch.distributed transport, {backend}, CUDA tensors, {size} processes",
               error < 1e-3 and right_device,
               f"max output error {error:.1e}, rows on {where}")
        if synced is not None:
            report("NCCL: no device sync in the layer's forward or backward, one for the step's "
                   "check", synced is True, "" if synced is True else synced)
        if error >= 1e-3 or not right_device or synced not in (None, True):
            sys.exit(1)


def no_sync_in_layers(layer, x, dy):
    """Under NCCL the forward leaves its agreement check for the step (hvd_shufflebn/deferred.py):
    the forward and the backward exchange run under sync debug mode "error"; only the step's one
    read of the headers (here called explicitly, in between) may synchronise."""
    transport = layer._transport
    if not transport.defers_checks(x.device):
        return "the transport does not defer its checks on CUDA"
    try:
        for _ in range(2):
            torch.cuda.set_sync_debug_mode("error")
            y = layer(x)
            torch.cuda.set_sync_debug_mode("default")
            transport.check_pending()  # the step's one read
            torch.cuda.set_sync_debug_mode("error")
            y.backward(dy)
    except RuntimeError as error:
        return f"synchronised: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True


def horovod_worker():
    """Run by horovodrun -np 3: rank 0 keeps its own statistics, ranks 1 and 2 swap."""
    import horovod.torch as hvd
    hvd.init()
    device = torch.device("cuda", hvd.local_rank())
    torch.cuda.set_device(device)
    layer = ShuffleBatchNorm(8, permutation=[0, 2, 1], transport="horovod").to(device)
    torch.manual_seed(hvd.rank())
    x = torch.randn(6, 8, 4, 4, device=device, requires_grad=True)
    layer(x).backward(torch.randn_like(x))  # raised before the fix, forward and backward
    if hvd.rank() == 0:
        report("Horovod transport (NCCL), CUDA tensors, a rank with no rows to send", True)


def check_horovod_nccl():
    try:
        import horovod.torch as hvd
    except ImportError:
        print("SKIP Horovod transport with CUDA tensors: Horovod is not installed")
        return True
    if not hvd.nccl_built() or torch.cuda.device_count() < 3:
        print("SKIP Horovod transport with CUDA tensors: needs Horovod built with NCCL and 3 GPUs")
        return True
    import subprocess
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    done = subprocess.run([horovodrun, "-np", "3", sys.executable, os.path.abspath(__file__),
                           "--horovod-worker"], timeout=300)
    return done.returncode == 0 or report("Horovod transport (NCCL), CUDA tensors", False,
                                           f"exit {done.returncode}")


def main():
    if "--horovod-worker" in sys.argv:
        horovod_worker()
        return 0
    if not torch.cuda.is_available():
        print("SKIP all: no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s), "
          f"torch {torch.__version__}", flush=True)
    ok = check_groups_one_process(torch.device("cuda"))
    # The default group of torch.distributed on a GPU machine: Gloo for CPU, NCCL for CUDA.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.device_count() >= 2 else "gloo"
    if backend == "gloo":
        print("note: one GPU, so NCCL (one device per process) cannot run here; Gloo instead")
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.spawn(distributed_worker, args=(2, backend,
                                                                        os.path.join(tmp, "rdzv")),
                                              nprocs=2, join=False)
        try:
            while not context.join(timeout=300):
                pass
        except Exception as error:  # noqa: BLE001
            ok = report("torch.distributed transport with CUDA tensors", False, repr(error))
    ok &= check_horovod_nccl()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
