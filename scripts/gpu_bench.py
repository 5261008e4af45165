"""The GPU check and benchmark, for any machine with one CUDA GPU (no Horovod needed; about 3
minutes on a current GPU):

    python scripts/gpu_bench.py [--steps 20] [--batch 64]
    python scripts/gpu_bench.py --rehearse-on-cpu   # seconds: the same code on CPU, tiny sizes

The rehearsal runs every step that does not need CUDA on the CPU (the tests do it), so that the
script's first run on a GPU machine, where device time is short, is not its first run at all.

1. scripts/cuda_check.py's checks (correctness on CUDA against the float64 reference);
2. no device sync in a steady-state training step: a small network with ShuffleBatchNorm
   (groups_per_rank=2, one process) trains and runs a key-encoder forward under
   ``torch.cuda.set_sync_debug_mode("error")``, which turns any synchronising call into an error;
3. a ResNet-50-style network (benchmarks/models.py: torchvision's block structure, 53 BN layers)
   at 224 px, batch 64, bfloat16 autocast and channels_last: training step and no-grad
   key-encoder forward with ShuffleBatchNorm (groups_per_rank=2, transport="local") against
   BatchNorm2d, interleaved, medians and their ratio.

One line per result (PASS / FAIL / SKIP, or a timing); exits non-zero on a FAIL.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "benchmarks")]
import cuda_check  # noqa: E402
from hvd_shufflebn import convert_shuffle_batchnorm  # noqa: E402
from models import Bottleneck, ResNet  # noqa: E402


def check_no_sync(device, borrow_from):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8))
    model = convert_shuffle_batchnorm(model, groups_per_rank=2, transport="local",
                                      borrow_from=borrow_from).to(device)
    key = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 3, 8, 8, device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()
        with torch.no_grad():
            key(x)
    for _ in range(3):  # warm: plans, transports, the step read once
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
        ok, detail = True, "5 steps (forward, backward, key forward) without a device sync"
    except RuntimeError as error:
        ok, detail = False, str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return cuda_check.report("no device sync in a steady-state step (groups, one process, "
                             f"borrow_from={borrow_from!r})", ok, detail)


def time_resnet50(device, steps, batch, size=224):
    torch.manual_seed(0)
    plain = ResNet(Bottleneck, [3, 4, 6, 3]).to(device).to(memory_format=torch.channels_last)
    models = {"bn": plain}
    for mode in ("permutation", "others"):
        models[mode] = convert_shuffle_batchnorm(copy.deepcopy(plain), groups_per_rank=2,
                                                 transport="local", borrow_from=mode)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}

    def train(name):
        model, optimizer = models[name], optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        optimizer.step()

    def key_forward(name):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            models[name](x)
    for what, fn in (("training step", train), ("key-encoder forward", key_forward)):
        times = {name: [] for name in models}
        for name in times:  # warm: cuDNN autotuning, allocator
            for _ in range(3):
                fn(name)
        synchronize()
        for i in range(steps):
            for name in (list(models) if i % 2 == 0 else list(reversed(models))):
                start = time.perf_counter()
                fn(name)
                synchronize()
                times[name].append(time.perf_counter() - start)
        for mode in ("permutation", "others"):
            ratios = [s / b for s, b in zip(times[mode], times["bn"])]
            print(f"TIME ResNet-50-style, {size} px, batch {batch}, {device.type}, bf16 autocast, "
                  f"channels_last, {what}: BatchNorm2d {statistics.median(times['bn']) * 1e3:.1f} ms, "
                  f"ShuffleBatchNorm (groups_per_rank=2, borrow_from={mode!r}) "
                  f"{statistics.median(times[mode]) * 1e3:.1f} ms, ratio "
                  f"{statistics.median(ratios):.3f}x (median of {steps} paired steps)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rehearse-on-cpu", action="store_true",
                   help="run what needs no CUDA on the CPU, at tiny sizes (seconds)")
    args = p.parse_args()
    if args.rehearse_on_cpu:
        device = torch.device("cpu")
        ok = cuda_check.check_groups_one_process(device)
        print("SKIP no device sync in a steady-state step: sync debug mode needs CUDA")
        time_resnet50(device, steps=2, batch=4, size=32)
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print("SKIP all: no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    device = torch.device("cuda")
    ok = cuda_check.main() == 0
    for mode in ("permutation", "others"):
        ok &= check_no_sync(device, mode)
    time_resnet50(device, args.steps, args.batch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
