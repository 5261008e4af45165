"""convert_shuffle_batchnorm beyond plain batch norms: timm's BatchNormAct2d, batch norm
subclasses it does not know, the include filter, SyncBatchNorm's process_group."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hvd_shufflebn import ShuffleBatchNorm, convert_shuffle_batchnorm, revert_shuffle_batchnorm

# One process, groups of their own: every group is normalised with its own statistics.
IDENTITY = dict(permutation=[0, 1], groups_per_rank=2, transport="local")


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d, cut down to its structure: timm itself cannot be
    imported beside this torch. Batch norm, then ``self.drop``, then ``self.act``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        act_kwargs = dict(act_kwargs or {})
        if act_layer is not None and apply_act:
            if inplace:
                act_kwargs["inplace"] = inplace
            self.act = act_layer(**act_kwargs)
        else:
            self.act = nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if track else None,
                         self.running_var if track else None, self.weight, self.bias, use_batch,
                         factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class CenterOnly(nn.BatchNorm1d):
    """A user's subclass with a forward of its own."""

    def forward(self, x):
        return x - x.mean(0)


def test_batchnorm_act_matches_the_original_in_train_mode():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct2d(4)).double()
    with torch.no_grad():
        original[1].weight.uniform_(0.5, 1.5)
        original[1].bias.uniform_(-0.5, 0.5)
    converted = convert_shuffle_batchnorm(copy.deepcopy(original), **IDENTITY)
    assert isinstance(converted[1], ShuffleBatchNorm)
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    grad_out = torch.randn(6, 4, 5, 5, dtype=torch.float64)

    # With the identity permutation each half of the batch is normalised on its own: the original
    # run on each half separately.
    x_ref = x.clone().requires_grad_()
    expected = torch.cat([original(half) for half in x_ref.chunk(2)])
    (expected * grad_out).sum().backward()
    x_new = x.clone().requires_grad_()
    output = converted(x_new)
    (output * grad_out).sum().backward()

    assert converted[1].last_permutation == (0, 1)
    assert output.min() >= 0  # the ReLU
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(x_new.grad, x_ref.grad)
    for (name, p), q in zip(converted.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    converted.eval()  # eval: the running statistics, then the act too
    original.eval()
    original[1].load_state_dict(converted[1].state_dict())
    torch.testing.assert_close(converted(x), original(x))


def test_batchnorm_act_keeps_its_children_and_reverts():
    original = BatchNormAct2d(4, act_layer=nn.PReLU, inplace=False, drop_layer=nn.Dropout)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), original)
    act, drop, weight = original.act, original.drop, original.act.weight
    keys = list(model.state_dict())
    assert "1.act.weight" in keys

    converted = convert_shuffle_batchnorm(model, **IDENTITY)
    assert isinstance(converted[1], ShuffleBatchNorm)
    assert converted[1].act is act and converted[1].drop is drop and act.weight is weight
    assert list(converted.state_dict()) == keys
    assert any(p is weight for p in converted.parameters())

    reverted = revert_shuffle_batchnorm(converted)
    assert type(reverted[1]) is BatchNormAct2d
    assert reverted[1].act is act and reverted[1].drop is drop
    assert list(reverted.state_dict()) == keys


def test_an_unknown_subclass_is_refused_by_name():
    with pytest.raises(ValueError, match=r"CenterOnly at 1\.0.*convert_subclasses=True"):
        convert_shuffle_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.Sequential(CenterOnly(3))))
    # A BatchNormAct2d that is not timm's shape is not taken for it.
    odd = BatchNormAct2d(3)
    odd.extra = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="BatchNormAct2d at the root"):
        convert_shuffle_batchnorm(odd)


def test_convert_subclasses_converts_them_as_plain_batch_norms():
    model = convert_shuffle_batchnorm(nn.Sequential(CenterOnly(3), nn.BatchNorm1d(3)),
                                      convert_subclasses=True)
    assert [type(m) for m in model] == [ShuffleBatchNorm, ShuffleBatchNorm]
    assert [type(m) for m in revert_shuffle_batchnorm(model)] == [CenterOnly, nn.BatchNorm1d]


def test_include_converts_only_the_layers_it_selects():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3), CenterOnly(3)))
    seen = []

    def include(path, layer):
        seen.append((path, type(layer)))
        return path == "1.0"
    converted = convert_shuffle_batchnorm(model, include=include)
    assert seen == [("0", nn.BatchNorm2d), ("1.0", nn.BatchNorm2d), ("1.1", CenterOnly)]
    assert [type(m) for m in (converted[0], *converted[1])] == \
        [nn.BatchNorm2d, ShuffleBatchNorm, CenterOnly]
    assert converted[1][0].name.endswith(".1.0")


def test_syncbatchnorm_keeps_its_process_group():
    group, mine = object(), object()  # stored until a training forward, never used here
    model = nn.Sequential(nn.SyncBatchNorm(3, process_group=group), nn.BatchNorm2d(3))
    converted = convert_shuffle_batchnorm(model)
    assert converted[0].process_group is group and converted[1].process_group is None
    reverted = revert_shuffle_batchnorm(converted)
    assert type(reverted[0]) is nn.SyncBatchNorm and reverted[0].process_group is group

    given = convert_shuffle_batchnorm(nn.SyncBatchNorm(3, process_group=group),
                                      process_group=mine)
    assert given.process_group is mine


def test_names_do_not_depend_on_what_else_was_built():
    """Collective names come from module paths: a rank that builds an extra converted model (an
    EMA teacher, a probe on rank 0 only) before the real one names it the same as the others."""
    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4),
                             nn.Sequential(nn.BatchNorm2d(4)))
    names = [m.name for m in convert_shuffle_batchnorm(model()).modules()
             if isinstance(m, ShuffleBatchNorm)]
    convert_shuffle_batchnorm(model())  # the extra model on this rank only
    again = [m.name for m in convert_shuffle_batchnorm(model()).modules()
             if isinstance(m, ShuffleBatchNorm)]
    assert again == names == ["shufflebn.1", "shufflebn.2.0"]
