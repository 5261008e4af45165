"""What the examples share: the demo's data, model and training step, and output lines that stay whole under
horovodrun and mpirun."""
import sys

import torch
import torch.nn.functional as F
from torch import nn


def say(*lines: str, stream=None) -> None:
    """Write whole lines in ONE write. Launchers tag what each process writes with its rank, chunk
    by chunk; print() writes a line and its newline separately when output is unbuffered
    (PYTHONUNBUFFERED=1, python -u), so the tag of the next chunk would land mid-line."""
    stream = stream or sys.stdout
    stream.write("".join(f"{line}\n" for line in lines))
    stream.flush()


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = torch.randn(n, 1, 16, 16, generator=g) * 0.8
    offsets = torch.randint(3, 13, (n,), generator=g)
    for i, (label, k) in enumerate(zip(labels.tolist(), offsets.tolist())):
        if label == 0:
            images[i, 0, k, :] += 2.0
        elif label == 1:
            images[i, 0, :, k] += 2.0
        else:
            diagonal = torch.eye(16) if label == 2 else torch.eye(16).flip(1)
            images[i, 0] += 2.0 * diagonal.roll(k - 8, dims=1)
    return images, labels


def make_model():
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(1, 16), block(16, 32), block(32, 32), nn.Flatten(),
                         nn.Linear(32 * 2 * 2, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))


def train_step(model, optimizer, images, labels):
    """One SGD step of the demo's classification task; returns the loss, detached."""
    loss = F.cross_entropy(model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()
