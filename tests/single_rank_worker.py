"""One rank (mpirun -np 1): ShuffleBatchNorm must be exactly torch.nn.BatchNorm, with one warning."""
import warnings

import torch

import horovod.torch as hvd
from hvd_shufflebn import ShuffleBatchNorm

hvd.init()
assert hvd.size() == 1
torch.manual_seed(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for momentum in (0.1, None):
        plain = torch.nn.BatchNorm2d(3, momentum=momentum)
        shuffle = ShuffleBatchNorm(3, momentum=momentum)
        for step in range(3):
            x = torch.randn(4, 3, 5, 5, requires_grad=True)
            x2 = x.detach().clone().requires_grad_()
            y, y2 = plain(x), shuffle(x2)
            dy = torch.randn_like(y)
            y.backward(dy)
            y2.backward(dy)
            torch.testing.assert_close(y2, y)
            torch.testing.assert_close(x2.grad, x.grad)
            torch.testing.assert_close(shuffle.weight.grad, plain.weight.grad)
            torch.testing.assert_close(shuffle.bias.grad, plain.bias.grad)
            for key, value in plain.state_dict().items():
                torch.testing.assert_close(shuffle.state_dict()[key], value)
        assert shuffle.last_permutation == (0,)
relevant = [w for w in caught if "single rank" in str(w.message)]
assert len(relevant) == 1, [str(w.message) for w in caught]
print("PASS single rank")
