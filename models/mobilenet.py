"""MobileNetV2-style family (Sandler et al., 2018): inverted residuals with linear bottlenecks.

Activations are ReLU rather than ReLU6 so that Conv+ReLU fuses under int8 Q/DQ in every runtime.
"""
from __future__ import annotations

from torch import nn

from . import register


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            _conv_bn(cin, hidden, 1, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, 1, relu=False),
        )

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) per stage, scaled down from the paper's ImageNet table for 28x28 inputs
    STAGES = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))

    def __init__(self, in_channels: int, num_classes: int, width: float):
        super().__init__()
        scale = lambda c: max(8, int(round(c * width / 8)) * 8)  # noqa: E731  multiples of 8 suit int8 kernels
        cin = scale(16)
        layers = [_conv_bn(in_channels, cin, 3, 1)]
        for expand, channels, blocks, stride in self.STAGES:
            for i in range(blocks):
                layers.append(InvertedResidual(cin, scale(channels), stride if i == 0 else 1, expand))
                cin = scale(channels)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


for _name, _width in (("mobilenet_v2_050", 0.5), ("mobilenet_v2_100", 1.0)):
    register(_name, "mobilenet_v2", f"MobileNetV2-style, width x {_width}", width=_width)(
        lambda in_channels, num_classes, width: MobileNetV2(in_channels, num_classes, width))
