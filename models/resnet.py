"""ResNet family (He et al., 2016, "Deep Residual Learning"), sized for small images such as 28x28."""
from __future__ import annotations

from torch import nn

from . import register


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A 3x3 stem (no max-pool: 28x28 inputs are already small), then stages of BasicBlocks."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...], blocks: tuple[int, ...],
                 strides: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, cin = [], widths[0]
        for width, count, stride in zip(widths, blocks, strides):
            layers = []
            for i in range(count):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


def _resnet18(in_channels: int, num_classes: int, width: float) -> ResNet:
    widths = tuple(int(c * width) for c in (64, 128, 256, 512))
    return ResNet(in_channels, num_classes, widths, (2, 2, 2, 2), (1, 2, 2, 2))


register("resnet18", "resnet", "ResNet-18 (2-2-2-2 BasicBlocks, 64-512 channels), 11.2M parameters", width=1.0)(_resnet18)
register("resnet18_half", "resnet", "ResNet-18 layout at half width (32-256 channels), 2.8M parameters; "
         "the default teacher", width=0.5)(_resnet18)


def _slim_resnet(in_channels: int, num_classes: int, width: float) -> ResNet:
    widths = tuple(max(8, int(round(c * width / 8)) * 8) for c in (16, 32, 64))
    return ResNet(in_channels, num_classes, widths, (1, 1, 1), (1, 2, 2))


for _name, _width in (("resnet_slim_050", 0.5), ("resnet_slim_100", 1.0), ("resnet_slim_150", 1.5),
                      ("resnet_slim_200", 2.0)):
    register(_name, "resnet_slim", f"slim ResNet-8, channels 16-32-64 x {_width}", width=_width)(_slim_resnet)


def _fast_resnet(in_channels: int, num_classes: int, width: float = 1.0,
                 channels: tuple[int, int, int] = (48, 96, 192)) -> ResNet:
    # int8-friendly at batch 1 (measured with ONNX Runtime on an AVX-512 VNNI CPU, 1 thread): a stride-2 stem,
    # because a full-resolution conv with one input channel is the int8 kernels' worst case (about 3x slower than
    # fp32 there), then stages at 14x14, 7x7 and 4x4 with channel counts in multiples of 16, the granularity of
    # the u8s8 kernels. Wider runs the int8 kernels closer to their peak (benchmarks/results/student_designs.md).
    widths = tuple(max(16, int(round(c * width / 16)) * 16) for c in channels)
    model = ResNet(in_channels, num_classes, widths, (1, 1, 1), (1, 2, 2))
    model.stem[0] = nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False)
    return model


register("resnet_fast_100", "resnet_fast", "ResNet-8 with a stride-2 stem, channels 48-96-192 (int8-friendly)",
         width=1.0)(_fast_resnet)
# The default student. Its 4x4 stage holds most of a ResNet-8's weights (a 3x3 conv of 192 channels there is 332k of
# resnet_fast_100's 691k parameters), so narrowing the last stage to 128 and widening the 7x7 one to 112 makes the
# int8 artifact 21x smaller than the default teacher instead of 16x, with fewer MACs (21.0 M, from 22.8 M) and, in
# the default compress, no loss of accuracy (benchmarks/results/student_designs.md, `compress` rows).
register("resnet_fast_tapered", "resnet_fast", "ResNet-8 with a stride-2 stem, channels 48-112-128 (int8-friendly, "
         "the last stage narrowed for size); the default student", channels=(48, 112, 128))(_fast_resnet)
register("resnet_fast_133", "resnet_fast", "ResNet-8 with a stride-2 stem, channels 64-128-256 (int8-friendly)",
         width=4 / 3)(_fast_resnet)
