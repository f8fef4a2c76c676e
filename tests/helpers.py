"""Fixture builders shared by several test modules (tiny, CPU, deterministic)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from click.testing import CliRunner, Result

from robustclip.data import synthetic
from robustclip.models import Normalize

def cli(*args: str) -> Result:
    """``robustclip ARGS...`` in this process (stdout and stderr apart)."""
    from robustclip.cli import main  # imported late: some tests check what the CLI imports

    return CliRunner().invoke(main, list(args))


def refused(result: Result, *parts: str) -> str:
    """The single stderr line of a refused command: exit 2, one ``error: ...`` line that
    contains each of ``parts``; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


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


#: aten ops that read device memory on the host (a host synchronisation on a GPU):
#: scalar reads (.item(), bool(), float(), int() all dispatch _local_scalar_dense), the
#: error checks of linalg (eigh, svd, cholesky, inv ... read an info tensor), and the ops
#: whose output size depends on the values
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero",
                      "aten::_linalg_check_errors", "aten::nonzero", "aten::masked_select",
                      "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim",
                      "aten::equal", "aten::allclose"})
#: Python calls that copy to the host; on a CPU tensor they dispatch nothing, so they are patched
SYNC_CALLS = [(torch.Tensor, "cpu"), (torch.Tensor, "tolist"), (torch.Tensor, "numpy"),
              (torch.linalg, "eigh"), (torch.linalg, "eigvalsh"), (torch.linalg, "svd"),
              (torch.linalg, "svdvals")]


def host_syncs(fn, monkeypatch) -> list[str]:
    """What running ``fn()`` does that would wait for a GPU: the :data:`SYNC_OPS` it
    dispatches (seen by ``torch.profiler``, however deep in the call tree), and its calls
    of :data:`SYNC_CALLS` and of ``Tensor.to`` with a CPU device.  Works on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    calls: list[str] = []
    with monkeypatch.context() as patch:
        for owner, name in SYNC_CALLS:
            def recording(*args, _f=getattr(owner, name), _n=name, **kwargs):
                calls.append(_n)
                return _f(*args, **kwargs)
            patch.setattr(owner, name, recording)
        to = torch.Tensor.to

        def recording_to(self, *args, **kwargs):
            target = [a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))]
            if any(torch.device(t).type == "cpu" for t in target):
                calls.append("to(cpu)")
            return to(self, *args, **kwargs)

        patch.setattr(torch.Tensor, "to", recording_to)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return calls + [e.name for e in prof.events() if e.name in SYNC_OPS]
