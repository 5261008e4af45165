"""Lightning with ShuffleBatchNormPlugin, 2 CPU processes (Lightning's own DDP launcher starts the
second): the BatchNorm is shuffled during fit, its output matches the float64 reference, running
statistics agree across ranks, and the plugin reverts the model afterwards.

    python tests/lightning_worker.py
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import reference  # noqa: E402

from hvd_shufflebn import ShuffleBatchNorm  # noqa: E402
from hvd_shufflebn.lightning import ShuffleBatchNormPlugin  # noqa: E402

try:
    import lightning.pytorch as pl
except ImportError:
    import pytorch_lightning as pl


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 1)
        self.checked = 0

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        x, = batch
        assert isinstance(self.bn, ShuffleBatchNorm), type(self.bn)
        h = self.conv(x)
        y = self.bn(h)
        # The layer's output against the reference, from all ranks' inputs gathered with
        # torch.distributed's own all_gather_object (not the layer's code path).
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (h.detach(), self.bn.weight.detach(),
                                          self.bn.bias.detach()))
        ys, _, _, _ = reference([e[0] for e in everyone], [torch.zeros_like(h)] * len(everyone),
                                [e[1] for e in everyone], [e[2] for e in everyone],
                                self.bn.last_permutation, self.bn.eps)
        torch.testing.assert_close(y, ys[dist.get_rank()].float(), rtol=1e-4, atol=1e-5)
        assert self.bn.last_permutation == (1, 0)
        self.checked += 1
        return self.head(torch.relu(y).mean((2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main():
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 2, 6, 6))
    model = Net()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3,
                         plugins=[ShuffleBatchNormPlugin(timeout=120)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    assert model.checked == 3, model.checked
    # Reverted at the end of fit: a plain BatchNorm2d again, with the state it tracked.
    assert type(model.bn) is torch.nn.BatchNorm2d, type(model.bn)
    running = [None] * dist.get_world_size()
    dist.all_gather_object(running, model.bn.running_mean)
    assert all(torch.equal(r, running[0]) for r in running), running
    assert int(model.bn.num_batches_tracked) == 3
    print(f"PASS lightning rank {dist.get_rank()}", flush=True)


if __name__ == "__main__":
    main()
