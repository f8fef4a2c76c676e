"""Models by name, and the spectral methods applied to their layers.

Every model takes images in [0, 1] of shape (N, C, H, W) and returns logits (N, classes);
input normalisation is its first layer (:class:`Normalize`), so attack budgets are in
pixel units.  Conv + BatchNorm pairs are :class:`ConvBN` composites (children ``conv``,
``bn``) so that a method can treat the pair as one operator; only ``simpleconv`` keeps
the tutorial's flat layout (``conv1``, ``bn1``, ``fc1``).

:func:`build_model` builds a model and applies a method (:data:`METHODS`) to its layers:
every wrapper's ``.name`` is the layer's qualified path in the unwrapped model
(``conv1``, ``layer1.0.conv1.conv``), the tag used in logs and metrics.  The methods that
do not clip (``none``, and ``miyato``, whose normalisation is torch's) get tracking-only
wrappers (``clip=None``: PowerQR on the layer as it trains, no change to the weights or
the forward pass), so that every run logs ``sigma/<layer>`` and runs overlay.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from robustclip.activations import GroupSort
from robustclip.clip import SpectralClip
from robustclip.data import DatasetInfo, dataset_info
from robustclip.errors import RobustclipError, first_line


class Normalize(nn.Module):
    """(x - mean) / std per channel; x: (N, C, ...) in [0, 1]; mean, std: C values."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class ConvBN(nn.Sequential):
    """Conv2d followed by its BatchNorm2d: one implicitly linear operator (in eval mode)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 bias: bool = False) -> None:
        super().__init__(OrderedDict(
            conv=nn.Conv2d(cin, cout, kernel_size, stride, padding=kernel_size // 2, bias=bias),
            bn=nn.BatchNorm2d(cout),
        ))


# ---------------------------------------------------------------------------- MNIST

class SimpleConv(nn.Module):
    """The tutorial's ConvModel: conv (3x3, pad 1) -> BN -> ReLU -> dense."""

    def __init__(self, info: DatasetInfo, channels: int = 64, kernel_size: int = 3,
                 composite: bool = False) -> None:
        super().__init__()
        c, h, w = info.shape
        self.normalize = Normalize(info.mean, info.std)
        if composite:  # ConvModel_v2: the pair is one operator
            self.conv1 = ConvBN(c, channels, kernel_size, bias=True)
            self.bn1 = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(c, channels, kernel_size, padding=kernel_size // 2)
            self.bn1 = nn.BatchNorm2d(channels)
        self.fc1 = nn.Linear(channels * h * w, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc1(F.relu(self.bn1(self.conv1(self.normalize(x)))).flatten(1))


class MnistCNN(nn.Module):
    """Three ConvBN + ReLU blocks (stride 1, 2, 2), 2x2 average pool, dense."""

    def __init__(self, info: DatasetInfo, width: int = 32) -> None:
        super().__init__()
        c, h, w = info.shape
        self.normalize = Normalize(info.mean, info.std)
        self.block1 = ConvBN(c, width)
        self.block2 = ConvBN(width, 2 * width, stride=2)
        self.block3 = ConvBN(2 * width, 2 * width, stride=2)
        h, w = (((n + 1) // 2 + 1) // 2 // 2 for n in (h, w))  # two stride-2 convs, pool 2
        self.fc = nn.Linear(2 * width * h * w, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        for block in (self.block1, self.block2, self.block3):
            x = F.relu(block(x))
        return self.fc(F.avg_pool2d(x, 2).flatten(1))


class SmallCNN(nn.Module):
    """The small ReLU network of Wong, Rice & Kolter 2020 ("Fast is better than free",
    after Wong & Kolter 2018) for MNIST: conv 16 (4x4, stride 2, pad 1), conv 32 (4x4,
    stride 2, pad 1), dense 100, dense classes, ReLU between, no BatchNorm.  The input is
    centred (dataset mean), not divided by the std, as in :class:`LipNet` (Wong et al.
    feed raw pixels; a bias absorbs the shift).  Input: (N, C, H, W), H and W multiples
    of 4."""

    def __init__(self, info: DatasetInfo, width: int = 16, hidden: int = 100) -> None:
        super().__init__()
        c, h, w = info.shape
        if h % 4 or w % 4:
            raise ValueError(f"the image sides must be multiples of 4, got {h}x{w}")
        self.normalize = Normalize(info.mean, (1.0,) * c)
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), hidden), nn.ReLU(),
            nn.Linear(hidden, info.num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


class LipNet(nn.Module):
    """A Lipschitz-friendly MNIST network: 4 convs (3x3, stride 1: width, width, 2 width,
    2 width channels), each pair followed by a 2x2 pixel unshuffle (space to depth: an
    exact isometry, where a strided conv's guaranteed bound is up to sqrt(2) loose), and
    3 dense layers (hidden, hidden, classes), MaxMin (GroupSort of 2) activations, no
    BatchNorm; ``batchnorm=True``: ConvBN convs, for ``fastclip-composite``.  The input is
    centred (dataset mean) but not divided by the dataset std: that scaling would multiply
    the network's Lipschitz bound (by 3.2 on MNIST) for nothing the first conv cannot
    learn.  MaxMin is 1-Lipschitz and keeps gradient norms, so the network's bound is the
    product of its layers' spectral norms; the weights start orthogonal (kernels as
    (out, in * 9) matrices), so that a deep MaxMin stack neither fades nor explodes.
    Input: (N, C, H, W), H and W multiples of 4."""

    def __init__(self, info: DatasetInfo, width: int = 16, hidden: int = 256,
                 batchnorm: bool = False) -> None:
        super().__init__()
        c, h, w = info.shape
        if width < 2 or width % 2 or hidden < 2 or hidden % 2 or h % 4 or w % 4:
            raise ValueError(f"width and hidden must be even and >= 2 (MaxMin pairs channels), "
                             f"the image sides multiples of 4; got {width}, {hidden}, {h}x{w}")
        self.normalize = Normalize(info.mean, (1.0,) * c)

        def conv(cin: int, cout: int) -> nn.Module:
            return ConvBN(cin, cout) if batchnorm else nn.Conv2d(cin, cout, 3, padding=1)
        self.features = nn.Sequential(
            conv(c, width), GroupSort(), conv(width, width), GroupSort(), nn.PixelUnshuffle(2),
            conv(4 * width, 2 * width), GroupSort(), conv(2 * width, 2 * width), GroupSort(),
            nn.PixelUnshuffle(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * width * (h // 4) * (w // 4), hidden), GroupSort(),
            nn.Linear(hidden, hidden), GroupSort(), nn.Linear(hidden, info.num_classes))
        for m in self.modules():  # orthogonal rows: signals and gradients keep their scale
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.normalize(x)))


# ---------------------------------------------------------------------------- CIFAR

class BasicBlock(nn.Module):
    """ResNet basic block: relu(conv2(relu(conv1(x))) + shortcut(x)), ConvBN convs."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = ConvBN(cin, cout, 3, stride)
        self.conv2 = ConvBN(cout, cout, 3)
        self.shortcut = ConvBN(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), as in kuangliu/pytorch-cifar."""

    def __init__(self, info: DatasetInfo, width: int = 64) -> None:
        super().__init__()
        self.normalize = Normalize(info.mean, info.std)
        self.conv1 = ConvBN(info.shape[0], width)
        stages, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**i
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(self.normalize(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Root(nn.Module):
    """DLA aggregation node: relu(ConvBN(concat(children)))."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, cout, 1)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return F.relu(self.conv(torch.cat(xs, 1)))


class Tree(nn.Module):
    """DLA tree of depth ``level``: left subtree, right subtree on its output, then a root."""

    def __init__(self, cin: int, cout: int, level: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.root = Root(2 * cout, cout)
        if level == 1:
            self.left_tree, self.right_tree = BasicBlock(cin, cout, stride), BasicBlock(cout, cout)
        else:
            self.left_tree = Tree(cin, cout, level - 1, stride)
            self.right_tree = Tree(cout, cout, level - 1)

    def forward(self, x: Tensor) -> Tensor:
        left = self.left_tree(x)
        return self.root([left, self.right_tree(left)])


class DLA(nn.Module):
    """Deep Layer Aggregation for 32x32 inputs, as in kuangliu/pytorch-cifar (dla.py)."""

    def __init__(self, info: DatasetInfo, width: int = 16) -> None:
        super().__init__()
        w = width
        self.normalize = Normalize(info.mean, info.std)
        self.base = ConvBN(info.shape[0], w)
        self.layer1 = ConvBN(w, w)
        self.layer2 = ConvBN(w, 2 * w)
        self.layer3 = Tree(2 * w, 4 * w, level=1)
        self.layer4 = Tree(4 * w, 8 * w, level=2, stride=2)
        self.layer5 = Tree(8 * w, 16 * w, level=2, stride=2)
        self.layer6 = Tree(16 * w, 32 * w, level=1, stride=2)
        self.linear = nn.Linear(32 * w, info.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        for stem in (self.base, self.layer1, self.layer2):
            x = F.relu(stem(x))
        x = self.layer6(self.layer5(self.layer4(self.layer3(x))))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "simpleconv": SimpleConv,
    "simpleconv-composite": lambda info, **kw: SimpleConv(info, composite=True, **kw),
    "mnist-cnn": MnistCNN,
    "smallcnn": SmallCNN,
    "lipnet": LipNet,
    "lipnet-composite": lambda info, **kw: LipNet(info, batchnorm=True, **kw),
    "resnet18": ResNet18,
    "dla": DLA,
}

# ---------------------------------------------------------------------------- methods

METHODS = ("none", "fastclip", "fastclip-composite", "miyato", "gouk")
#: Keyword arguments a method accepts (those of SpectralClip; miyato uses clip, iters_per_step).
METHOD_ARGS = tuple(p for p in inspect.signature(SpectralClip).parameters
                    if p not in ("module", "name", "writer", "input_shape", "clip_events"))


class _Scale(nn.Module):
    """Parametrization W -> c W (Miyato's normalised weight scaled to the clip value)."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, weight: Tensor) -> Tensor:
        return self.c * weight


def _targets(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of the layers a method wraps, innermost first."""
    layers = (nn.Conv2d, nn.Linear) + ((ConvBN,) if method == "fastclip-composite" else ())
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, layers)]
    if method == "fastclip-composite" and not any(isinstance(m, ConvBN) for _, m in found):
        raise RobustclipError("method 'fastclip-composite' needs conv+BN composites; this model "
                              "has none (use simpleconv-composite instead of simpleconv, lipnet-composite "
                              "instead of lipnet)")
    return found[::-1]  # pre-order reversed: a composite's conv is wrapped before it


#: Methods that do not clip with SpectralClip: their wrappers only track (clip=None).
TRACKING_ONLY = ("none", "miyato")


def apply_method(model: nn.Module, method: str, method_args: Mapping[str, Any] | None = None,
                 track: bool = True) -> nn.Module:
    """Wrap, in place, every conv and dense layer (and conv+BN composite) of ``model``.

    method: one of :data:`METHODS`; method_args: keywords of :class:`SpectralClip`
    (:data:`METHOD_ARGS`).  track: give the methods of :data:`TRACKING_ONLY` their
    tracking-only wrappers (False: the plain layers, as checkpoints from before those
    wrappers hold them).  Returns ``model``.
    """
    args = dict(method_args or {})
    if method not in METHODS:
        raise RobustclipError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    bad = sorted(set(args) - set(METHOD_ARGS))
    if bad:
        raise RobustclipError(f"unknown method argument(s) {', '.join(bad)}; valid: {', '.join(METHOD_ARGS)}")
    for name, layer in _targets(model, method):
        if method == "miyato":
            spectral_norm(layer, n_power_iterations=max(args.get("iters_per_step", 1), 1))
            if args.get("clip", 1.0) != 1.0:
                parametrize.register_parametrization(layer, "weight", _Scale(float(args["clip"])))
        if method in TRACKING_ONLY and not track:
            continue
        extra = {"rescale_every_step": True, "clip_events": False} if method == "gouk" else {}
        extra |= {"clip": None, "rescale_every_step": None} if method in TRACKING_ONLY else {}
        wrapper = SpectralClip(layer, **(args | extra), name=name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
    return model


def wrappers(model: nn.Module) -> list[SpectralClip]:
    """The SpectralClip wrappers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SpectralClip)]


def build_model(name: str, dataset: str, method: str = "none",
                method_args: Mapping[str, Any] | None = None, track: bool = True,
                **model_args: Any) -> nn.Module:
    """Model ``name`` for ``dataset`` (its shape, classes, mean/std), with ``method`` applied
    (``track``: see :func:`apply_method`).

    Raises :class:`RobustclipError` for an unknown model, dataset, method or argument.
    """
    if name not in MODELS:
        raise RobustclipError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    info = dataset_info(dataset)
    try:
        model = MODELS[name](info, **model_args)
    except (TypeError, ValueError, RuntimeError) as err:  # unknown name; a value torch refuses
        first = first_line(err)
        raise RobustclipError(f"model {name!r}: bad argument(s) {model_args}: {first}") from None
    return apply_method(model, method, method_args, track)
