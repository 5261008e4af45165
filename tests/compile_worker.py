"""torch.compile of a model with ShuffleBatchNorm layers gives the outputs and gradients of eager
mode, step after step (run by test_distributed.py: mpirun -np 2 python tests/compile_worker.py)."""
import copy
import os
import sys
import time

import torch

import horovod.torch as hvd
from hvd_shufflebn import convert_shuffle_batchnorm


def alternating(step, size):
    return list(range(size)) if step % 2 == 0 else [(r + 1) % size for r in range(size)]


def main():
    torch.set_num_threads(1)
    hvd.init()
    rank = hvd.rank()
    torch.manual_seed(0)
    eager = convert_shuffle_batchnorm(torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 1), torch.nn.BatchNorm2d(3)),
        permutation=alternating, transport=os.environ.get("SHUFFLEBN_TEST_TRANSPORT", "auto"))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=os.environ.get("SHUFFLEBN_COMPILE_BACKEND",
                                                                     "inductor"))
    started = time.time()
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(3, 2, 6, 6, generator=g)
        dy = torch.randn(3, 3, 4, 4, generator=g)
        results = []
        # Compiled first at step 0: the layer is first reached while torch.compile traces.
        runs = [(eager, eager), (compiled_model, compiled)]
        for model, run in (runs[::-1] if step == 0 else runs):
            xi = x.clone().requires_grad_()
            y = run(xi)
            y.backward(dy)
            results.append((y.detach(), xi.grad, [p.grad for p in model.parameters()],
                            [b.clone() for b in model.buffers()]))
            model.zero_grad()
        (y0, dx0, g0, b0), (y1, dx1, g1, b1) = results[::-1] if step == 0 else results
        for what, a, b in [("output", y1, y0), ("input gradient", dx1, dx0)] + \
                [("parameter gradient", a, b) for a, b in zip(g1, g0)] + \
                [("buffer", a, b) for a, b in zip(b1, b0)]:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"rank {rank} step {step} {what}: {m}")
    steps = [m.step for m in compiled_model.modules() if hasattr(m, "last_permutation")]
    assert steps == [3, 3], steps
    if rank == 0:
        print(f"PASS torch.compile matches eager for 3 steps ({time.time() - started:.1f} s)",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
