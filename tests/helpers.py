"""Fixture builders shared by several test modules (tiny, CPU, deterministic)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustclip.data import synthetic
from robustclip.models import Normalize

#: synthetic images of the tiny classifiers
SHAPE = (1, 10, 10)


def random_bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm2d in a non-trivial state: running statistics and gamma far from 0/1."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_var.uniform_(0.1, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(1, 3)
    return bn


def inflate(layer: nn.Module, factor: float) -> nn.Module:
    """Multiply every ``*weight`` parameter of ``layer`` by ``factor``, in place."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("weight"):
                p.mul_(factor)
    return layer


def tiny_classifier(seed: int, dataset: str = "mnist", epochs: int = 6) -> nn.Module:
    """normalize -> conv 1->6 -> BN -> ReLU -> dense, trained with Adam on 600 synthetic
    1x10x10 samples (the first 600 of ``synthetic(700, SHAPE, 10, seed=0)``); eval mode,
    with the ``robustclip_meta`` of a checkpoint of ``dataset``."""
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize((0.2,), (0.3,)), nn.Conv2d(1, 6, 3, padding=1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(600, 10))
    x, y = (t[:600] for t in synthetic(700, SHAPE, 10, seed=0).tensors)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(epochs):
        for xb, yb in zip(x.split(100), y.split(100)):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.robustclip_meta = {"model": {"name": "fixture", "args": {}},
                             "method": {"name": "none", "args": {}}, "dataset": dataset}
    return model.eval()


class Offset(nn.Module):
    """model(x) + a constant: margins, softmax, predictions and Lipschitz constant unchanged."""

    def __init__(self, model: nn.Module, offset: float) -> None:
        super().__init__()
        self.model, self.offset = model, offset

    def forward(self, x):
        return self.model(x) + self.offset
