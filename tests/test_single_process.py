"""Tests that need no other rank: conversion, checkpoints, argument checks, permutations."""
import warnings

import pytest
import torch
from torch import nn

from hvd_shufflebn import (ShuffleBatchNorm, ShuffleBatchNormError, convert_shuffle_batchnorm,
                           revert_shuffle_batchnorm)
from hvd_shufflebn import permutation as perms
from launch import ROOT, run


def small_model():
    return nn.Sequential(nn.Conv1d(2, 4, 1), nn.BatchNorm1d(4), nn.Conv2d(4, 4, 1),
                         nn.BatchNorm2d(4, affine=False), nn.Conv3d(4, 4, 1),
                         nn.BatchNorm3d(4, momentum=None, track_running_stats=False),
                         nn.SyncBatchNorm(4, eps=1e-3), nn.Sequential(nn.BatchNorm2d(4)))


def trained(model):
    """Give every parameter and buffer a value that differs from its default."""
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand_like(t) + 0.5)
        for b in model.buffers():
            if not b.is_floating_point():
                b.fill_(7)
    return model


def test_convert_keeps_everything_and_reverts():
    model = trained(small_model())
    model[1].weight.requires_grad_(False)
    model.double()
    classes = [type(m) for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    model.eval()

    converted = convert_shuffle_batchnorm(model, permutation="shift", seed=3)
    shuffles = [m for m in converted.modules() if isinstance(m, ShuffleBatchNorm)]
    assert len(shuffles) == 5
    assert converted[1].weight is weight and not converted[1].weight.requires_grad
    assert all(m.permutation == "shift" and m.seed == 3 and not m.training for m in shuffles)
    assert converted[3].weight is None and converted[5].running_mean is None
    assert converted[6].eps == 1e-3 and converted[5].momentum is None
    assert all(m.running_mean.dtype == torch.float64 for m in shuffles if m.running_mean is not None)
    assert list(converted.state_dict()) == list(before)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert len({m.name for m in shuffles}) == 5 and converted[7][0].name.endswith(".7.0")

    reverted = revert_shuffle_batchnorm(converted)
    assert [type(m) for m in reverted.modules()] == classes
    assert reverted[1].weight is weight
    for key, value in reverted.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_checkpoints_load_both_ways():
    plain = trained(small_model())
    shuffled = convert_shuffle_batchnorm(small_model())
    shuffled.load_state_dict(plain.state_dict())
    fresh = small_model()
    fresh.load_state_dict(shuffled.state_dict())
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key]), key


def test_convert_a_bare_layer_and_the_classmethod_spelling():
    layer = ShuffleBatchNorm.convert_shuffle_batchnorm(nn.BatchNorm2d(3))
    assert isinstance(layer, ShuffleBatchNorm) and layer._batchnorm_class is nn.BatchNorm2d
    assert type(revert_shuffle_batchnorm(layer)) is nn.BatchNorm2d


def test_lazy_batchnorm_is_refused_until_initialised():
    with pytest.raises(ValueError, match="lazy"):
        convert_shuffle_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


def test_revert_of_a_layer_built_directly_follows_its_inputs():
    with pytest.raises(ValueError, match="has not seen an input"):
        revert_shuffle_batchnorm(ShuffleBatchNorm(3))
    for shape, cls in (((2, 3), nn.BatchNorm1d), ((2, 3, 4), nn.BatchNorm1d),
                       ((2, 3, 4, 4), nn.BatchNorm2d), ((2, 3, 2, 2, 2), nn.BatchNorm3d)):
        layer = ShuffleBatchNorm(3).eval()
        layer(torch.randn(shape))  # eval mode: local, no Horovod needed
        assert type(revert_shuffle_batchnorm(layer)) is cls


def test_eval_mode_matches_torch_without_horovod():
    plain = trained(nn.BatchNorm2d(3)).eval()
    shuffle = convert_shuffle_batchnorm(trained(nn.BatchNorm2d(3))).eval()
    shuffle.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(shuffle(x), plain(x))
    with pytest.raises(ValueError, match="expected 3 channels"):
        shuffle(torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("bad", ["rotate", [0, 0, 1], [1, 2], 3, [0.5, 1]])
def test_invalid_permutation_arguments(bad):
    with pytest.raises(ValueError, match="permutation"):
        ShuffleBatchNorm(3, permutation=bad)


def test_training_before_hvd_init_is_a_clear_error(monkeypatch):
    import horovod.torch as hvd
    assert not hvd.is_initialized()
    with pytest.raises(ShuffleBatchNormError, match=r"call hvd.init\(\)"):
        ShuffleBatchNorm(3, transport="horovod")(torch.randn(4, 3))
    # "auto" in a process that a launcher started as one of several: no silent fallback.
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ShuffleBatchNormError, match="neither Horovod nor torch.distributed"):
        ShuffleBatchNorm(3)(torch.randn(4, 3))


@pytest.mark.parametrize("size", [2, 3, 5, 8])
def test_seeded_permutations_are_deterministic_derangements(size):
    seen = set()
    for step in range(30):
        p = perms.permutation_for("derangement", 11, step, size)
        assert p == perms.permutation_for("derangement", 11, step, size)
        assert sorted(p) == list(range(size)) and all(p[r] != r for r in range(size))
        assert perms.inverse(p)[p[0]] == 0
        seen.add(p)
    expected_distinct = {2: 1, 3: 2}.get(size, 10)
    assert len(seen) >= expected_distinct
    assert perms.permutation_for("random", 11, 0, size) != perms.permutation_for("random", 12, 0,
                                                                                 size) or size < 4


def test_callable_permutation_is_validated_each_step():
    spec = perms.check_spec(lambda step, size: [0] * size if step == 1 else list(range(size)))
    assert perms.permutation_for(spec, 0, 0, 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="not a permutation"):
        perms.permutation_for(spec, 0, 1, 3)
    with pytest.raises(ValueError, match="not a permutation"):
        perms.permutation_for((1, 0), 0, 0, 3)


@pytest.mark.mpi
def test_single_rank_is_plain_batchnorm_with_one_warning():
    done = run("mpirun", 1, ROOT / "tests" / "single_rank_worker.py")
    assert done.returncode == 0 and "PASS single rank" in done.stdout


def test_step_is_saved_without_new_state_dict_keys(tmp_path):
    """The permutation step travels with the state: num_batches_tracked when tracking, the state
    dict's metadata otherwise; both still load strictly into plain BatchNorm and back."""
    tracked, untracked = ShuffleBatchNorm(3), ShuffleBatchNorm(3, track_running_stats=False)
    tracked.num_batches_tracked.fill_(12)
    assert tracked.step == 12
    tracked.step = 13
    assert int(tracked.num_batches_tracked) == 13
    # The step follows the buffer however it changes: the layer's own forwards, in place (a
    # broadcast, load_state_dict), by replacement.
    with warnings.catch_warnings():  # one process, one group: plain batch norm (warns), step + 1
        warnings.simplefilter("ignore")
        tracked.train()(torch.randn(4, 3))
    assert tracked.step == 14
    tracked.num_batches_tracked.fill_(40)
    assert tracked.step == 40
    tracked.num_batches_tracked = torch.tensor(7)
    assert tracked.step == 7
    tracked.step = 13
    untracked.step = 21
    for layer, plain in ((tracked, nn.BatchNorm1d(3)),
                         (untracked, nn.BatchNorm1d(3, track_running_stats=False))):
        path = tmp_path / "state.pt"
        torch.save(layer.state_dict(), path)
        fresh = ShuffleBatchNorm(3, track_running_stats=layer.track_running_stats)
        fresh.load_state_dict(torch.load(path), strict=True)
        assert fresh.step == layer.step
        plain.load_state_dict(torch.load(path), strict=True)  # no new keys
        assert list(plain.state_dict()) == list(layer.state_dict())
        fresh.load_state_dict(plain.state_dict(), strict=True)
    assert untracked.step == 21


def test_timeout_from_argument_or_environment(monkeypatch):
    from hvd_shufflebn.waits import DEFAULT_TIMEOUT, TIMEOUT_ENV
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert ShuffleBatchNorm(2).timeout == DEFAULT_TIMEOUT
    monkeypatch.setenv(TIMEOUT_ENV, "42.5")
    assert ShuffleBatchNorm(2).timeout == 42.5
    assert ShuffleBatchNorm(2, timeout=3).timeout == 3.0
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=TIMEOUT_ENV):
            ShuffleBatchNorm(2)
    monkeypatch.delenv(TIMEOUT_ENV)
    with pytest.raises(ValueError, match="timeout"):
        ShuffleBatchNorm(2, timeout=0)


@pytest.mark.parametrize("k,spec,shape", [(2, "derangement", (7, 3)), (3, "random", (8, 3, 5)),
                                          (4, "shift", (9, 3, 2, 2))])
def test_groups_in_one_process_match_the_reference(k, spec, shape):
    """One process, no launcher: the batch in k groups that lend to each other (one-GPU MoCo)."""
    from reference import reference_groups, reference_running
    torch.manual_seed(k)
    layer = ShuffleBatchNorm(3, groups_per_rank=k, permutation=spec, seed=2, momentum=0.5,
                             dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    perms_seen = set()
    for step in range(4):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        dy = torch.randn(shape, dtype=torch.float64)
        before = (layer.running_mean.clone(), layer.running_var.clone())
        layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        y.backward(dy)
        perm = layer.last_permutation
        perms_seen.add(perm)
        assert len(perm) == k and layer.step == step + 1
        ys, dxs, dws, dbs = reference_groups([x.detach()], [dy], [layer.weight.detach()],
                                             [layer.bias.detach()], perm, layer.eps, k)
        for actual, expected in ((y, ys[0]), (x.grad, dxs[0]), (layer.weight.grad, dws[0]),
                                 (layer.bias.grad, dbs[0])):
            torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)
        mean, var = reference_running([x.detach()], *before, 0.5)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-9, atol=1e-9)
    if spec == "derangement":
        assert all(p[g] != g for p in perms_seen for g in range(k))
    with pytest.raises(ShuffleBatchNormError, match="more than 1 value per channel in each"):
        layer(torch.randn(k - 1, 3, *shape[2:], dtype=torch.float64))


@pytest.mark.parametrize("borrow_from", ["permutation", "others"])
def test_a_gradient_taken_with_create_graph_is_the_same_and_not_differentiable(borrow_from):
    """Under create_graph=True (gradient penalties) the backward gives the same gradient, and
    differentiating that gradient again is refused rather than silently wrong."""
    torch.manual_seed(0)
    layer = ShuffleBatchNorm(3, groups_per_rank=2, borrow_from=borrow_from,
                             dtype=torch.float64)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)  # part of a graph
    layer.step = 0
    plain, = torch.autograd.grad(layer(x), x, dy)
    layer.step = 0
    graphed, = torch.autograd.grad(layer(x), x, dy, create_graph=True)
    torch.testing.assert_close(graphed, plain, rtol=0, atol=0)
    assert graphed.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        graphed.sum().backward()


def test_works_without_horovod_or_mpi4py():
    """import and one-process use need only torch; a Horovod transport says what to install."""
    code = """
import sys
sys.modules["horovod"] = None  # as if not installed: importing it raises ImportError
sys.modules["mpi4py"] = None
import torch
import hvd_shufflebn
from hvd_shufflebn import ShuffleBatchNorm, ShuffleBatchNormError
layer = ShuffleBatchNorm(4, groups_per_rank=2)
layer(torch.randn(6, 4, requires_grad=True)).sum().backward()
assert layer.last_permutation == (1, 0)
try:
    ShuffleBatchNorm(4, transport="horovod")(torch.randn(6, 4))
except ShuffleBatchNormError as error:
    assert "pip install horovod" in str(error), error
    print("PASS without horovod")
"""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "PASS without horovod" in done.stdout, done.stderr


def test_what_auto_chose_is_visible(caplog, monkeypatch):
    import logging
    from hvd_shufflebn import batchnorm
    monkeypatch.setattr(batchnorm, "_announced", set())
    layers = [ShuffleBatchNorm(3, groups_per_rank=2, name=f"visible{i}") for i in range(2)]
    assert layers[0].resolved_transport is None and "resolved" not in repr(layers[0])
    with caplog.at_level(logging.INFO, logger="hvd_shufflebn"):
        for layer in layers:
            layer(torch.randn(4, 3))
    assert layers[0].resolved_transport == "local"
    assert "one process" in layers[0].transport_reason
    assert "transport='auto' (resolved: 'local')" in repr(layers[0])
    lines = [r.getMessage() for r in caplog.records if "run over 'local'" in r.getMessage()]
    assert len(lines) == 1, lines  # once per transport and process, at the first forward
    assert "layer(s) with transport='auto'" in lines[0] and "one process" in lines[0]


def test_the_one_group_warning_points_at_the_callers_line(monkeypatch):
    from hvd_shufflebn import batchnorm
    monkeypatch.setattr(batchnorm, "_warned_single_rank", set())
    layer = ShuffleBatchNorm(3, transport="local")
    with pytest.warns(UserWarning, match="single rank") as caught:
        layer(torch.randn(4, 3))
    assert caught[0].filename == __file__, caught[0].filename


def test_deepcopy_keeps_a_dedicated_process_group():
    """MoCo's encoder_k = deepcopy(encoder_q): a group with the same ranks as the world stays the
    group it was, not whichever group has those ranks; pickling still goes by ranks."""
    code = """
import copy, os, pickle, sys, tempfile
import torch, torch.distributed as dist
from hvd_shufflebn import ShuffleBatchNorm
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
dedicated = dist.new_group([0])
assert dedicated is not dist.group.WORLD
layer = ShuffleBatchNorm(3, process_group=dedicated)
twin = copy.deepcopy(torch.nn.Sequential(layer))[0]
assert twin.process_group is dedicated, twin.process_group
assert pickle.loads(pickle.dumps(layer)).process_group is not None
print("PASS deepcopy keeps the group", flush=True)
os._exit(0)  # no destroy_process_group: it can abort a Gloo worker at exit
"""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "PASS deepcopy" in done.stdout, done.stdout + done.stderr
