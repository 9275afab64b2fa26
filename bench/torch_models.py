"""PyTorch networks of the CPSC-DFKD benchmark, written from docs (spec section 2), NCHW.

Only what the benchmarked settings need: the conditional generator ("GeneratorD" with categorical
conditional BatchNorm), LeNet-5 (+BN, half), CIFAR ResNet-18/34, option-A ResNet-20..110, WRN-d-k
and the feature adapter. Every classifier's `forward(x, features=False)` returns logits, or
`(logits, feature)` with the pooled, un-normalised feature. Weights are random: the benchmark times
the computation, it does not compare values with the JAX side.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class CategoricalConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters, then per-class scale gamma[y] and shift beta[y]."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-3,
                 momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        out = self.bn(x)
        return self.gamma(y)[:, :, None, None] * out + self.beta(y)[:, :, None, None]


class GeneratorD(nn.Module):
    """z, y -> image: Linear to (2ngf, s, s), CBN, [up x2, conv, CBN, LReLU] x n, conv c, tanh, CBN."""

    def __init__(self, num_classes: int, img_size: int = 32, channels: int = 3, nz: int = 256,
                 ngf: int = 64, num_upsamples: int = 2):
        super().__init__()
        self.init_size = img_size // 2 ** num_upsamples
        self.ngf = ngf
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size ** 2)
        self.bn0 = CategoricalConditionalBatchNorm(2 * ngf, num_classes)
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        width_in = 2 * ngf
        for i in range(1, num_upsamples + 1):
            width = ngf if i == num_upsamples else 2 * ngf
            self.convs.append(nn.Conv2d(width_in, width, 3, 1, 1))
            self.bns.append(CategoricalConditionalBatchNorm(width, num_classes))
            width_in = width
        self.conv_out = nn.Conv2d(ngf, channels, 3, 1, 1)
        self.bn_out = CategoricalConditionalBatchNorm(channels, num_classes)

    def forward(self, z, y):
        h = self.l1(z).view(z.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        h = self.bn0(h, y)
        for conv, bn in zip(self.convs, self.bns):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = F.leaky_relu(bn(conv(h), y), 0.2)
        h = torch.tanh(self.conv_out(h))
        return self.bn_out(h, y)   # the released code normalises after the tanh


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, width_divisor: int = 1, use_bn: bool = False,
                 channels: int = 1):
        super().__init__()
        w1, w2, w3, w4 = (c // width_divisor for c in (6, 16, 120, 84))
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(channels, w1, 5), nn.Conv2d(w1, w2, 5),
                                              nn.Conv2d(w2, w3, 5))
        bn = (lambda c: nn.BatchNorm2d(c)) if use_bn else (lambda c: nn.Identity())
        self.bn1, self.bn2, self.bn3 = bn(w1), bn(w2), bn(w3)
        self.fc1 = nn.Linear(w3, w4)
        self.fc2 = nn.Linear(w4, num_classes)

    def forward(self, x, features: bool = False):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        feature = x.flatten(1)
        logits = self.fc2(F.relu(self.fc1(feature)))
        return (logits, feature) if features else logits


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, option_a: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.option_a = False
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option_a:   # subsample by 2, zero-pad planes/4 channels each side
                self.option_a, self.pad = True, planes // 4
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.option_a:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    def __init__(self, num_classes, stage_sizes, widths, strides, option_a=False, channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for blocks, width, stride in zip(stage_sizes, widths, strides):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, width, stride if i == 0 else 1, option_a))
                in_planes = width
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x, features: bool = False):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        feature = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.linear(feature)
        return (logits, feature) if features else logits


class WideBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = in_planes == planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, planes, 1, stride,
                                                              bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))


class WideResNet(nn.Module):
    def __init__(self, num_classes, depth, widen_factor, channels=3):
        super().__init__()
        n, k = (depth - 4) // 6, widen_factor
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        blocks, in_planes = [], 16
        for planes, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x, features: bool = False):
        x = F.relu(self.bn1(self.blocks(self.conv1(x))))
        feature = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = self.fc(feature)
        return (logits, feature) if features else logits


class FeatureAdapter(nn.Module):
    """Linear(d_s, d_s)-ReLU-Linear(d_s, d_t) on the normalised student feature (contrast only)."""

    def __init__(self, d_s: int, d_t: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_s, d_s), nn.Linear(d_s, d_t)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _resnet_a(depth):
    n = (depth - 2) // 6
    return lambda k, c: CifarResNet(k, (n, n, n), (16, 32, 64), (1, 2, 2), True, c)


_MODELS = {
    "lenet5": lambda k, c: LeNet5(k, 1, False, c),
    "lenet5_half": lambda k, c: LeNet5(k, 2, False, c),
    "lenet5_bn": lambda k, c: LeNet5(k, 1, True, c),
    "lenet5_half_bn": lambda k, c: LeNet5(k, 2, True, c),
    "resnet18": lambda k, c: CifarResNet(k, (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2),
                                         False, c),
    "resnet34": lambda k, c: CifarResNet(k, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2),
                                         False, c),
    **{f"resnet{d}": _resnet_a(d) for d in (20, 32, 44, 56, 110)},
    **{f"wrn_{d}_{w}": (lambda d, w: lambda k, c: WideResNet(k, d, w, c))(d, w)
       for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
}


def available_models():
    return sorted(_MODELS)


def get_model(name: str, num_classes: int, channels: int = 3) -> nn.Module:
    if name not in _MODELS:
        raise ValueError(f"no PyTorch benchmark model {name!r}; available: "
                         f"{', '.join(available_models())}")
    return _MODELS[name](num_classes, channels)


def feature_dim(model: nn.Module, image_size: int, channels: int) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, f = model(torch.zeros(1, channels, image_size, image_size), features=True)
    model.train(was_training)
    return f.shape[1]
