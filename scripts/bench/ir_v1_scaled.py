"""facenet-pytorch's Inception-ResNet-v1 at any width multiplier, channel for channel as
`IrConfig::facenet_v1(..).with_width(w)` builds it (so `baseline.py --width` times PyTorch on
our demo configuration). Dev tool; our own PyTorch code, not facenet's.
"""
import math

import torch
from torch import nn


def ch(n, w):
    """`ch` of src/layers.rs: round half away from zero, at least 1."""
    return max(1, int(math.floor(n * w + 0.5)))


class CBA(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, pad=0):
        super().__init__(nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout, eps=1e-3),
                         nn.ReLU())


def chain(cin, steps):
    layers = []
    for cout, k, pad in steps:
        layers.append(CBA(cin, cout, k, 1, pad))
        cin = cout
    return nn.Sequential(*layers)


class Res(nn.Module):
    """Block35 / Block17 / Block8: branch0 1x1 || chains, 1x1 biased up-projection, x + s * up."""

    def __init__(self, c, b0, chains, scale, act=True):
        super().__init__()
        self.b0 = CBA(c, b0, 1)
        self.chains = nn.ModuleList(chains)
        width = b0 + sum(ch_[-1][0].out_channels for ch_ in chains)
        self.up = nn.Conv2d(width, c, 1)
        self.scale, self.act = scale, act

    def forward(self, x):
        y = self.up(torch.cat([self.b0(x)] + [c(x) for c in self.chains], 1))
        y = x + self.scale * y
        return torch.relu(y) if self.act else y


class Reduction(nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches] + [self.pool(x)], 1)


def ir_v1(width, num_classes):
    c = lambda n: ch(n, width)
    stem = nn.Sequential(CBA(3, c(32), 3, 2), CBA(c(32), c(32), 3), CBA(c(32), c(64), 3, 1, 1), nn.MaxPool2d(3, 2),
                         CBA(c(64), c(80), 1), CBA(c(80), c(192), 3), CBA(c(192), c(256), 3, 2))
    a = c(256)
    block_a = lambda: Res(a, c(32), [chain(a, [(c(32), 1, 0), (c(32), 3, 1)]),
                                     chain(a, [(c(32), 1, 0), (c(32), 3, 1), (c(32), 3, 1)])], 0.17)
    # Reduction-A (k, l, m, n) = (192, 192, 256, 384)
    red_a = Reduction([nn.Sequential(CBA(a, c(384), 3, 2)),
                       nn.Sequential(CBA(a, c(192), 1), CBA(c(192), c(192), 3, 1, 1), CBA(c(192), c(256), 3, 2))])
    b = c(384) + c(256) + a
    block_b = lambda: Res(b, c(128), [chain(b, [(c(128), 1, 0), (c(128), (1, 7), (0, 3)), (c(128), (7, 1), (3, 0))])],
                          0.10)
    red_b = Reduction([nn.Sequential(CBA(b, c(256), 1), CBA(c(256), c(384), 3, 2)),
                       nn.Sequential(CBA(b, c(256), 1), CBA(c(256), c(256), 3, 2)),
                       nn.Sequential(CBA(b, c(256), 1), CBA(c(256), c(256), 3, 1, 1), CBA(c(256), c(256), 3, 2))])
    cc = c(384) + c(256) + c(256) + b
    block_c = lambda scale, act=True: Res(cc, c(192), [chain(cc, [(c(192), 1, 0), (c(192), (1, 3), (0, 1)),
                                                                  (c(192), (3, 1), (1, 0))])], scale, act)
    trunk = nn.Sequential(stem, *[block_a() for _ in range(5)], red_a, *[block_b() for _ in range(10)], red_b,
                          *[block_c(0.20) for _ in range(5)], block_c(1.0, False))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cc, c(512), bias=False),
                         nn.BatchNorm1d(c(512), eps=1e-3), nn.Linear(c(512), num_classes))
    return nn.Sequential(trunk, head)


if __name__ == "__main__":
    m = ir_v1(0.25, 10)
    print(sum(p.numel() for p in m.parameters()), "parameters at width 0.25")
