"""ResNet-18/50-style networks (torchvision is not installable here), sized for CPU benchmarks.

Same block structure and channel widths as torchvision's resnet18/resnet50 (so the same number and
widths of BatchNorm layers: 20 and 53), with the ImageNet stem (7x7 stride-2 conv + max-pool) so
that 32x32 inputs keep a step on one CPU thread in the tenths of a second.
"""
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu_()


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, cin, width, stride):
        nn.Module.__init__(self)
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = _shortcut(cin, cout, stride)


def _shortcut(cin, cout, stride):
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    def __init__(self, block, depths, width=64, out_dim=128):
        super().__init__()
        layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
                  nn.MaxPool2d(3, 2, 1)]
        cin = width
        for i, depth in enumerate(depths):
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                layers.append(block(cin, width * 2 ** i, stride))
                cin = width * 2 ** i * block.expansion
        self.features = nn.Sequential(*layers)
        # MoCo's encoder ends in a projection to the embedding (128-d in the paper).
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, out_dim))

    def forward(self, x):
        return self.head(self.features(x))


class Thin(nn.Module):
    """Many narrow BatchNorm layers on small feature maps: little compute per layer to hide an
    exchange behind, the worst case for any per-layer communication."""

    def __init__(self, depth=16, width=16, out_dim=128):
        super().__init__()
        layers = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_dim))

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {
    "resnet18": lambda: ResNet(BasicBlock, [2, 2, 2, 2]),
    "resnet50": lambda: ResNet(Bottleneck, [3, 4, 6, 3]),
    "thin": Thin,  # 16 BN layers of 16 channels at 16x16 (32x32 inputs)
    "tiny": lambda: ResNet(BasicBlock, [1, 1, 1, 1], width=8),  # for --smoke
}
