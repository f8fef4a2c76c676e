"""GroupSort activations (Anil et al. 2019): sort each group of channels.

GroupSort is a permutation of its input on each of its linear pieces, so it is
1-Lipschitz in L2 (and gradient-norm preserving); robustclip.bounds bounds it by 1.
With groups of 2 it is MaxMin: (max(a, b), min(a, b)) for each channel pair.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from robustclip.errors import RobustclipError


class GroupSort(nn.Module):
    """Sort each group of ``group_size`` consecutive channels (dim 1) in descending order.

    x: (N, C, ...) with C a multiple of group_size; output: the same shape.  group_size 2
    (the default) is MaxMin.
    """

    def __init__(self, group_size: int = 2) -> None:
        super().__init__()
        if not isinstance(group_size, int) or group_size < 1:
            raise RobustclipError(f"GroupSort: group_size must be an integer >= 1, got {group_size!r}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        n, c, *rest = x.shape
        g = self.group_size
        if c % g:
            raise RobustclipError(f"GroupSort: {c} channels do not split into groups of {g}")
        groups = x.reshape(n, c // g, g, *rest)
        if g == 2:  # MaxMin: two elementwise ops, cheaper than a sort
            a, b = groups.unbind(2)
            return torch.stack((torch.maximum(a, b), torch.minimum(a, b)), 2).reshape(x.shape)
        return groups.sort(dim=2, descending=True).values.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"
