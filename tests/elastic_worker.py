"""Elastic Horovod training with ShuffleBatchNorm layers, checked at every step; run by
tests/test_elastic.py under horovodrun with a host-discovery script whose output changes on a
schedule (tests/elastic_discovery.py), on Gloo, the way Horovod's own elastic tests run
(test/integration/data/elastic_torch_main.py):

    horovodrun -np 2 --min-np 2 --max-np 3 --network-interface lo \
        --host-discovery-script DISCOVER python tests/elastic_worker.py

The training function runs under ``hvd.elastic.run`` with a ``hvd.elastic.TorchState`` holding
the model, the optimizer and the step counter, committed after every step. The model (float64)
has four ShuffleBatchNorm layers: bn0 "derangement" (at 2 ranks it can only be the swap), bn1
and bn2 "random" (their permutations change from step to step at any size), bn3 borrowing the
pooled statistics of all the other ranks (borrow_from="others", whose pool changes with the
world); bn2 has track_running_stats=False. At every step every rank checks, for each of them:

* its output, input gradient and local weight and bias gradients, and the gradients the
  DistributedOptimizer averaged, against the float64 reference of tests/reference.py computed
  from all ranks' inputs and upstream gradients;
* that all ranks used the same permutation, the one the seed and the step give at this size,
  and that the layer's step (num_batches_tracked for bn0 and bn1) is the training step on every
  rank: a worker that just joined got it with the synced state;
* that all ranks hold the same model and optimizer state (a joined worker was synced: each
  process starts from its own random initialisation).

Environment:
    SHUFFLEBN_ELASTIC_LOG       directory for the JSON-lines records (one file per process) and
                                the progress file (committed steps, written by rank 0) that the
                                discovery script reads
    SHUFFLEBN_ELASTIC_SCHEDULE  the discovery schedule (JSON file, see elastic_discovery.py): at
                                each step where the hosts change, rank 0 waits for the driver's
                                notification before committing, as Horovod's tests do, so that the
                                world changes at exactly that step
    SHUFFLEBN_ELASTIC_STEPS     training steps (default 12)
    SHUFFLEBN_ELASTIC_EXIT      JSON {"host": H, "slot": S, "step": K, "where": W, "mode": M}:
                                the worker started on host H (a name the discovery prints) in
                                slot S exits with code 1 at training step K; W is "step" (before
                                the forward), "forward" (after the first layer's exchange, so the
                                others wait for it in the second layer's forward exchange) or
                                "backward" (when the second layer's output gradient is ready: the
                                others wait in its backward exchange); M is "raise" (an uncaught
                                exception) or "kill" (os._exit(1), no clean-up: like a crash)
    SHUFFLEBN_ELASTIC_MODE      "train" (default) or "process_set": check that a layer on a
                                process set other than the global one raises a clear error
    SHUFFLEBN_ELASTIC_UNTRACKED how the third layer (track_running_stats=False: its step is
                                not a state_dict tensor, so the elastic sync does not carry it)
                                gets its step: "kept" (default), kept in the TorchState and set
                                back at the start of every run of the training function, the
                                recipe of docs/elastic.md; "bare": nothing done (a restore still
                                brings it back, from the state dict's metadata; a joining worker
                                starts at step 0, and the layer raises)
"""
import json
import os
import time
import traceback
import zlib

import torch
import torch.nn.functional as F
from torch import nn

import horovod.torch as hvd
from horovod.common.elastic import ObjectState
from horovod.common.exceptions import HorovodInternalError
from reference import reference  # the float64 autograd reference of the other distributed tests
from hvd_shufflebn import ShuffleBatchNorm, ShuffleBatchNormError
from hvd_shufflebn.permutation import permutation_for

LOG_DIR = os.environ["SHUFFLEBN_ELASTIC_LOG"]
PROGRESS = os.path.join(LOG_DIR, "progress")
STEPS = int(os.environ.get("SHUFFLEBN_ELASTIC_STEPS", "12"))
HOST = os.environ.get("HOROVOD_HOSTNAME", "localhost")
SLOT = int(os.environ.get("HOROVOD_LOCAL_RANK", "0"))  # the slot this process was started in
TOLERANCE = 1e-9  # everything runs in float64
UNTRACKED = os.environ.get("SHUFFLEBN_ELASTIC_UNTRACKED", "kept")
# The layers under test: (attribute, constructor arguments).
LAYERS = (("bn0", dict(permutation="derangement", seed=3)),
          ("bn1", dict(permutation="random", seed=11)),
          ("bn2", dict(permutation="random", seed=17, track_running_stats=False)),
          ("bn3", dict(borrow_from="others")))


def pooled_tolerance(xs, eps):
    """The pooled layer (borrow_from="others") takes group t's pool from sums over all groups
    minus t's own share (S - S_t, then E[x^2] - E[x]^2) in float64, whose rounding is about
    eps64 * sum(x^2) / M_-t over ALL groups, against the v_-t + eps it normalises with: large when
    a pool is nearly constant while other values are large (a shuffled layer before it can do
    both). 1000x that, or TOLERANCE."""
    flat = [x.transpose(0, 1).flatten(1) for x in xs]  # (C, values) per rank
    total_square = sum(f.square().sum(1) for f in flat)
    worst = 0.0
    for t in range(len(xs)):
        pool = torch.cat([f for r, f in enumerate(flat) if r != t], dim=1)
        var = pool.var(1, unbiased=False)
        worst = max(worst, float((total_square / pool.shape[1] / (var + eps)).max()))
    return max(TOLERANCE, 1000 * torch.finfo(torch.float64).eps * worst)


def change_steps():
    path = os.environ.get("SHUFFLEBN_ELASTIC_SCHEDULE")
    if not path:
        return set()
    with open(path) as f:
        return {from_step for from_step, _ in json.load(f)[1:]}


class Log:
    """JSON lines, one file per process (processes come and go, ranks change)."""

    def __init__(self):
        os.makedirs(LOG_DIR, exist_ok=True)
        self.path = os.path.join(LOG_DIR, f"worker-{HOST}-{SLOT}-{os.getpid()}.jsonl")

    def __call__(self, event, **fields):
        record = dict(event=event, host=HOST, slot=SLOT, pid=os.getpid(), time=time.time(),
                      **fields)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


log = Log()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0 = ShuffleBatchNorm(3, momentum=0.2, name="bn0", **LAYERS[0][1])
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = ShuffleBatchNorm(4, name="bn1", **LAYERS[1][1])
        self.bn2 = ShuffleBatchNorm(4, name="bn2", **LAYERS[2][1])
        self.bn3 = ShuffleBatchNorm(4, name="bn3", **LAYERS[3][1])
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(self.bn0(x))
        h = self.bn3(self.bn2(F.relu(self.bn1(h))))
        return self.fc(h.mean(dim=(2, 3)))


class Probe:
    """What one layer saw in the last step: input and output (their gradients retained), the
    affine parameters it used, and its LOCAL weight and bias gradients, caught by tensor hooks
    before Horovod's DistributedOptimizer averages .grad in place."""

    def __init__(self, layer):
        self.layer = layer
        layer.register_forward_hook(self._forward)
        layer.weight.register_hook(lambda g: setattr(self, "dw", g.detach().clone()))
        layer.bias.register_hook(lambda g: setattr(self, "db", g.detach().clone()))

    def _forward(self, module, inputs, output):
        self.x, self.y = inputs[0], output
        if not self.x.is_leaf:
            self.x.retain_grad()
        output.retain_grad()
        self.w, self.b = module.weight.detach().clone(), module.bias.detach().clone()


def batch(step, rank):
    """This rank's data at this step (uneven batch sizes across ranks)."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    n = 3 + rank % 2
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 0.5
    return x.requires_grad_(), torch.randint(0, 3, (n,), generator=g)


def state_vector(model, optimizer):
    """The model's state_dict and the optimizer's momentum buffers, flattened (float64 holds
    num_batches_tracked exactly)."""
    parts = [t.detach().double().flatten() for t in model.state_dict().values()]
    for p in model.parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        parts.append(torch.zeros(p.numel(), dtype=torch.float64) if buf is None
                     else buf.double().flatten())
    return torch.cat(parts)


def gather(rows):
    """Every rank's tensors, concatenated along dim 0 in rank order.

    Gathered with hvd.allgather on plain tensors under names of our own ("elastic_check.*"):
    independent of the layer's code path (the layer moves statistics with alltoall and sums
    with allreduce, under names "shufflebn.*", through its transport), so a mistake in the
    layer's routing cannot hide in the reference. Unlike files or a separate MPI, it is
    elastic-aware: a peer that dies mid-gather raises HorovodInternalError, which
    hvd.elastic.run recovers from. All are submitted before any is awaited: one negotiation."""
    handles = {key: hvd.allgather_async(value.contiguous(), name=f"elastic_check.{key}")
               for key, value in rows.items()}
    return {key: hvd.synchronize(handle) for key, handle in handles.items()}


def max_error(actual, expected):
    return float((actual.double() - expected.double()).abs().max())


def train_step(state, model, optimizer, probes):
    step, rank, size = state.step, hvd.rank(), hvd.size()
    layers = [probe.layer for probe in probes]
    bn_steps = [layer.step for layer in layers]  # before the forward: the permutations' step
    before = state_vector(model, optimizer)
    x, target = batch(step, rank)
    optimizer.zero_grad()
    exit_now(step, "step")
    hook = probes[1].layer.register_forward_pre_hook(lambda *_: exit_now(step, "forward"))
    try:
        out = model(x)
    finally:
        hook.remove()
    probes[1].y.register_hook(lambda grad: exit_now(step, "backward"))
    loss = F.cross_entropy(out, target)
    loss.backward()
    optimizer.step()  # waits for the averaged gradients: .grad now holds them

    perms = [[] if layer.last_permutation is None else list(layer.last_permutation)
             for layer in layers]  # bn3 pools: no permutation
    meta = torch.tensor([rank, step, state.rendezvous, x.shape[0], *bn_steps, *sum(perms, [])],
                        dtype=torch.float64)
    rows = {"meta": meta.unsqueeze(0), "state": before.unsqueeze(0)}
    for i, probe in enumerate(probes):
        n = probe.x.shape[0]
        rows[f"l{i}.rows"] = torch.cat([t.detach().reshape(n, -1).double() for t in
                                        (probe.x, probe.y.grad, probe.y, probe.x.grad)], dim=1)
        rows[f"l{i}.par"] = torch.cat([probe.w, probe.b, probe.dw, probe.db,
                                       probe.layer.weight.grad, probe.layer.bias.grad]
                                      ).double().unsqueeze(0)
    everyone = gather(rows)

    problems = []
    meta_all = everyone["meta"]
    if meta_all[:, 0].tolist() != list(range(size)):
        problems.append(f"ranks {meta_all[:, 0].tolist()}")
    for column, what in ((1, "training step"), (2, "rendezvous count")):
        if len(set(meta_all[:, column].tolist())) != 1:
            problems.append(f"ranks disagree on the {what}: {meta_all[:, column].tolist()}")
    bn_all = meta_all[:, 4:4 + len(layers)]
    if not bool((bn_all == step).all()):
        problems.append(f"layer steps (num_batches_tracked) by rank {bn_all.tolist()}, "
                        f"training step {step}")
    perm_all = meta_all[:, 4 + len(layers):]
    if not bool((perm_all == perm_all[0]).all()):
        problems.append(f"ranks disagree on the permutations: {perm_all.tolist()}")
    for (attr, kwargs), perm in zip(LAYERS, perms):
        expected = (list(permutation_for(kwargs["permutation"], kwargs["seed"], step, size))
                    if "permutation" in kwargs else [])
        if perm != expected:
            problems.append(f"{attr} used {perm}, the seed and step {step} give {expected}")
    states = everyone["state"]
    if not bool((states == states[0]).all()):
        problems.append("ranks hold different model or optimizer states before the step")

    counts = [int(n) for n in meta_all[:, 3].tolist()]  # batch sizes (uneven)
    errors, tolerances = {}, {}
    for i, probe in enumerate(probes):
        c = probe.layer.num_features
        per_rank = torch.split(everyone[f"l{i}.rows"], counts)
        xs, dys, ys, dxs = zip(*[torch.split(r, r.shape[1] // 4, dim=1) for r in per_rank])
        shape = tuple(probe.x.shape[1:])
        xs = [t.reshape(-1, *shape) for t in xs]
        dys = [t.reshape(-1, *shape) for t in dys]
        par = everyone[f"l{i}.par"]
        ws, bs = par[:, :c], par[:, c:2 * c]
        ref_y, ref_dx, ref_dw, ref_db = reference(xs, dys, list(ws), list(bs),
                                                  perms[i] or "others", probe.layer.eps)
        name = LAYERS[i][0]
        tolerances[name] = (pooled_tolerance(xs, probe.layer.eps)
                            if "borrow_from" in LAYERS[i][1] else TOLERANCE)
        errors[f"{name}.output"] = max_error(probe.y.detach(), ref_y[rank])
        errors[f"{name}.input_grad"] = max_error(probe.x.grad, ref_dx[rank])
        errors[f"{name}.weight_grad"] = max_error(probe.dw, ref_dw[rank])
        errors[f"{name}.bias_grad"] = max_error(probe.db, ref_db[rank])
        # What DistributedOptimizer averaged: the mean over ranks of the local gradients.
        errors[f"{name}.averaged_weight_grad"] = max_error(
            probe.layer.weight.grad, torch.stack(ref_dw).mean(0))
        errors[f"{name}.averaged_bias_grad"] = max_error(
            probe.layer.bias.grad, torch.stack(ref_db).mean(0))
    worst = max(errors.values())
    if not all(error <= tolerances[key.split(".")[0]] for key, error in errors.items()):
        problems.append(f"reference errors {errors}, tolerances {tolerances}")
    log("step", rank=rank, size=size, step=step, rendezvous=state.rendezvous, bn_steps=bn_steps,
        perms=perms, errors=errors, max_error=worst, tolerances=tolerances,
        loss=float(loss.detach()), problems=problems)
    if problems:
        raise AssertionError(f"rank {rank} of {size}, step {step}: " + "; ".join(problems))


EXIT = json.loads(os.environ.get("SHUFFLEBN_ELASTIC_EXIT") or "null")


def exit_now(step, where):
    """Exit with code 1 if this process is the one scheduled to fail here."""
    if EXIT is None or (EXIT["host"], EXIT["slot"], EXIT["step"], EXIT["where"]) != (
            HOST, SLOT, step, where):
        return
    log("exit", rank=hvd.rank(), size=hvd.size(), step=step, where=where, mode=EXIT["mode"])
    if EXIT["mode"] == "kill":
        os._exit(1)
    raise RuntimeError(f"injected failure: {HOST}[{SLOT}] (rank {hvd.rank()}) exits at step "
                       f"{step} ({where})")


def wait_for_host_update(state):
    """Rank 0, at a step where the discovery output changes (the progress file it just wrote
    makes it change): wait for the driver's notification, so that the commit that follows raises
    HostsUpdatedInterrupt on every rank at exactly this step (as Horovod's tests do). The
    timestamp reset makes the update count even if it comes within the second of the last one."""
    state._last_updated_timestamp = 0
    deadline = time.monotonic() + 60
    while state._host_messages.empty():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no host update from the driver at step {state.step}")
        time.sleep(0.02)


def write_progress(step):
    with open(PROGRESS + ".tmp", "w") as f:
        f.write(str(step))
    os.replace(PROGRESS + ".tmp", PROGRESS)


def train_main():
    # Each process starts from its own random weights: only the elastic sync makes them agree.
    torch.manual_seed(zlib.crc32(f"{HOST}:{SLOT}".encode()))  # reproducible, not the same
    model = Net().double()
    with torch.no_grad():
        for layer in (model.bn0, model.bn1, model.bn2, model.bn3):
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    probes = [Probe(getattr(model, attr)) for attr, _ in LAYERS]
    base_lr = 0.02
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=base_lr * hvd.size(), momentum=0.9),
        named_parameters=model.named_parameters())
    changes = change_steps()
    log("start", rank=hvd.rank(), size=hvd.size(), bn_steps=[p.layer.step for p in probes])

    @hvd.elastic.run
    def train(state):
        state.rendezvous += 1
        if UNTRACKED == "kept":  # the step travels in the state, synced from rank 0
            model.bn2.step = state.bn2_step
        log("train", rank=hvd.rank(), size=hvd.size(), step=state.step,
            rendezvous=state.rendezvous, bn_steps=[p.layer.step for p in probes])
        while state.step < STEPS:
            try:
                train_step(state, model, optimizer, probes)
            except (HorovodInternalError, ShuffleBatchNormError) as error:
                # HorovodInternalError: a peer died, hvd.elastic.run recovers.
                frames = traceback.extract_tb(error.__traceback__)
                log("horovod_internal_error" if isinstance(error, HorovodInternalError)
                    else "shufflebn_error", rank=hvd.rank(), size=hvd.size(),
                    step=state.step, message=str(error)[:500],
                    frames=[f"{os.path.basename(os.path.dirname(f.filename))}/"
                            f"{os.path.basename(f.filename)}:{f.name}" for f in frames])
                raise
            state.step += 1
            state.bn2_step = model.bn2.step
            if hvd.rank() == 0:
                write_progress(state.step)
                if state.step in changes:
                    wait_for_host_update(state)
            state.commit()
        log("done", rank=hvd.rank(), size=hvd.size(), step=state.step,
            rendezvous=state.rendezvous)

    def on_reset():
        for group in optimizer.param_groups:
            group["lr"] = base_lr * hvd.size()

    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0, rendezvous=0,
                                   bn2_step=0)
    state.register_reset_callbacks([on_reset])
    train(state)


def process_set_main():
    """A layer on a process set other than the global one, under elastic Horovod: every rank
    must raise ShuffleBatchNormError with a clear message (not hang or mis-route), and the layer
    must be left as it was. A layer on the global set works in the same run. The set is
    registered when Horovod allows it (HOROVOD_DYNAMIC_PROCESS_SETS=1), as a user's would be."""
    @hvd.elastic.run
    def check(state):
        x = torch.randn(4, 2, 3, dtype=torch.float64) + hvd.rank()
        ShuffleBatchNorm(2, name="global").double()(x).sum().backward()
        try:  # what Horovod itself does with a process set under elastic
            process_set = hvd.add_process_set([0])
            horovod_said = f"registered as id {process_set.process_set_id}"
        except Exception as error:
            process_set = hvd.ProcessSet([0])
            horovod_said = f"{type(error).__name__}: {error}"
        layer = ShuffleBatchNorm(2, name="subset", process_set=process_set).double()
        try:
            layer(x)
            raised = None
        except ShuffleBatchNormError as error:
            raised = str(error)
        log("process_set", rank=hvd.rank(), size=hvd.size(), horovod_said=horovod_said,
            raised=raised, step=layer.step, running_mean=layer.running_mean.tolist())
        # No rank leaves (and shuts Horovod down) while another still registers the set.
        hvd.barrier()

    check(ObjectState(hvd.broadcast_object, hvd.rank))


def main():
    torch.set_num_threads(1)
    hvd.init()
    mode = os.environ.get("SHUFFLEBN_ELASTIC_MODE", "train")
    {"train": train_main, "process_set": process_set_main}[mode]()


if __name__ == "__main__":
    main()
