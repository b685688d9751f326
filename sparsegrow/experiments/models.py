"""The networks the experiments train: MLPs, a small CNN, WideResNets and CIFAR ResNets.

Each entry of `MODELS` is a builder `(input_shape, num_classes, **kwargs) -> nn.Module`, with
input_shape = (C, H, W). Use `build_model(name, ...)`, which also rejects keyword arguments the
builder does not take, with a ValueError naming the allowed ones.

Naming, so sparsity can be chosen by parameter name: every model ends in `classifier` (an
nn.Linear with bias), and the convolutional ones start with `stem`.

Initialisation: Kaiming-normal (fan_out, ReLU) for convolutions, as in the WideResNet and ResNet
papers; PyTorch's default for nn.Linear; BatchNorm weight 1, bias 0. A convolution followed by
BatchNorm has no bias.

References: LeNet-300-100 (LeCun et al. 1998); SET's 784-1000-1000-1000-10 MLP (Mocanu et al.
2018); WideResNet (Zagoruyko & Komodakis 2016, pre-activation basic blocks); CIFAR ResNet
(He et al. 2016, depth 6n+2).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsegrow.layers.sparse_conv import SparseConv2d
from sparsegrow.registry import Registry

Builder = Callable[..., nn.Module]
MODELS: Registry[Builder] = Registry("model")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> nn.Module:
    """Build a registered model; an unknown keyword argument is a ValueError naming the allowed ones."""
    builder = MODELS.get(name)
    allowed = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return builder(tuple(input_shape), num_classes, **kwargs)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_shape(input_shape: Sequence[int], model: str, min_side: int = 1) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(int(s) != s or s < 1 for s in input_shape):
        raise ValueError(f"input_shape={tuple(input_shape)} for {model}; allowed: (C, H, W) of positive ints")
    c, h, w = (int(s) for s in input_shape)
    if min(h, w) < min_side:
        raise ValueError(f"input_shape={tuple(input_shape)} for {model}; allowed: H and W >= {min_side}")
    return c, h, w


def _check_positive(value, what: str, model: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} for {model}; allowed: a positive int")
    return value


def _check_dropout(p, model: str) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout={p!r} for {model}; allowed: 0 <= dropout < 1")
    return float(p)


def _check_classes(num_classes, model: str) -> int:
    return _check_positive(num_classes, "num_classes", model)


def _init_conv_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, SparseConv2d):  # the same law at the active weights (storage=sparse)
            fan_out = m.out_channels * math.prod(m.kernel_size)
            nn.init.normal_(m.values, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# MLPs
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Flatten, then Linear-ReLU for each hidden width, then a linear classifier."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        widths = [in_features, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, C*H*W)
        for layer in self.hidden:
            x = F.relu(layer(_gemm_input(layer, x)))
        return self.classifier(_gemm_input(self.classifier, x))  # (B, num_classes)


def _gemm_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x as `layer` reads it fastest. A truly sparse layer returns its (B, N) output as the
    transpose of a contiguous (N, B), which the next sparse layer reads for free; a dense
    nn.Linear reads that layout through a slow path of MKL's GEMM when it is wide (10⁶ -> 10 at
    B = 128: 7.3 s forward against 1.1 s with the copy included, loaded machine;
    benchmarks/results/bench_readout_layout.md), so it gets a row-major copy (one pass over x).
    Other modules, and row-major x, are left as they are."""
    return x.contiguous() if isinstance(layer, nn.Linear) else x


@MODELS.register("mlp", "MLP on flattened input, hidden widths `hidden` (default 300,100), ReLU")
def mlp(input_shape, num_classes, hidden: Sequence[int] = (300, 100)) -> nn.Module:
    c, h, w = _check_shape(input_shape, "mlp")
    if isinstance(hidden, int) or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in hidden):
        raise ValueError(f"hidden={hidden!r} for mlp; allowed: a sequence of positive ints, e.g. [300, 100]")
    return MLP(c * h * w, tuple(hidden), _check_classes(num_classes, "mlp"))


@MODELS.register("lenet300100", "LeNet-300-100: MLP with hidden widths 300, 100")
def lenet300100(input_shape, num_classes) -> nn.Module:
    return mlp(input_shape, num_classes, hidden=(300, 100))


@MODELS.register("set_mlp", "SET's MLP (Mocanu et al. 2018): hidden widths 1000, 1000, 1000")
def set_mlp(input_shape, num_classes) -> nn.Module:
    return mlp(input_shape, num_classes, hidden=(1000, 1000, 1000))


# --------------------------------------------------------------------------------------------
# Small CNN
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """conv3x3-ReLU-maxpool twice (`stem`, `conv2`), then fc-ReLU and a linear classifier."""

    def __init__(self, input_shape: tuple[int, int, int], channels: tuple[int, int], hidden: int, num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.stem = nn.Conv2d(c, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc = nn.Linear(channels[1] * (h // 4) * (w // 4), hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 2)  # (B, c0, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c1, H/4, W/4)
        x = F.relu(self.fc(x.flatten(1)))  # (B, hidden)
        return self.classifier(x)


@MODELS.register("cnn", "small CNN: conv32-pool-conv64-pool-fc128-classifier (any H, W >= 4)")
def cnn(input_shape, num_classes, channels: Sequence[int] = (32, 64), hidden: int = 128) -> nn.Module:
    shape = _check_shape(input_shape, "cnn", min_side=4)
    if isinstance(channels, int) or len(channels) != 2:
        raise ValueError(f"channels={channels!r} for cnn; allowed: two positive ints, e.g. [32, 64]")
    channels = tuple(_check_positive(ch, "channels", "cnn") for ch in channels)
    return SmallCNN(shape, channels, _check_positive(hidden, "hidden", "cnn"), _check_classes(num_classes, "cnn"))


# --------------------------------------------------------------------------------------------
# WideResNet (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus the shortcut.

    When the shape changes, the 1x1 shortcut convolution reads the pre-activated input, as in the
    authors' code; otherwise the shortcut is the identity on the raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + shortcut


class WideResNet(nn.Module):
    """WRN-d-k: stem conv3x3 to 16 channels, three stages of n = (d-4)/6 blocks with 16k, 32k, 64k
    channels (strides 1, 2, 2), then BN-ReLU, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, depth: int, width: int, dropout: float, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [WideBasicBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                     stride if j == 0 else 1, dropout) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(widths[3])
        self.classifier = nn.Linear(widths[3], num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (B, 64k, H/4, W/4)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 64k)
        return self.classifier(x)


@MODELS.register("wrn", "WideResNet-depth-width (default WRN-28-5), pre-activation blocks, for 32x32 inputs")
def wrn(input_shape, num_classes, depth: int = 28, width: int = 5, dropout: float = 0.0) -> nn.Module:
    c, _, _ = _check_shape(input_shape, "wrn", min_side=4)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth={depth!r} for wrn; allowed: 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...)")
    width = _check_positive(width, "width", "wrn")
    return WideResNet(c, depth, width, _check_dropout(dropout, "wrn"), _check_classes(num_classes, "wrn"))


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Post-activation block: conv3x3(stride)-BN-ReLU-conv3x3-BN, add the shortcut, ReLU.

    A shape change uses a 1x1 convolution + BN projection shortcut (the paper's option B; its
    CIFAR networks used zero-padding, option A, which has no parameters to make sparse).
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        return F.relu(o + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-(6n+2): stem conv3x3-BN-ReLU to `width` channels, three stages of n blocks with
    width, 2*width, 4*width channels (strides 1, 2, 2), global average pooling, linear classifier."""

    def __init__(self, in_channels: int, depth: int, width: int, num_classes: int):
        super().__init__()
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, in_planes = [], width
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], num_classes)
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))  # (B, width, H, W)
        x = self.stages(x)  # (B, 4*width, H/4, W/4)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 4*width)
        return self.classifier(x)


@MODELS.register("resnet", "CIFAR ResNet-depth (default ResNet-20, width 16), basic blocks, depth 6n+2")
def resnet(input_shape, num_classes, depth: int = 20, width: int = 16) -> nn.Module:
    c, _, _ = _check_shape(input_shape, "resnet", min_side=4)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth={depth!r} for resnet; allowed: 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    width = _check_positive(width, "width", "resnet")
    return ResNet(c, depth, width, _check_classes(num_classes, "resnet"))
