"""PyTorch definitions of every registered architecture (NCHW), in the converter's key layout.

A student exported by `cpsc_jax.teachers.convert.export_student` loads into `get_model(arch, K)` with
`load_state_dict(strict=True)`; a teacher with these keys converts with `convert_teacher`.
Every classifier's `forward(x, features=False)` returns logits, or `(logits, feature)` with the
pooled, un-normalised feature, like the Flax networks.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)   # eps 1e-5, momentum 0.1: the Flax BatchNorm's defaults


# ------------------------------------------------------------------------------ CIFAR ResNets

class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, option_a: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.pad = None
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option_a:   # subsample by 2, zero-pad planes/4 channels on each side
                self.pad = planes // 4
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              _bn(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is not None:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """Keys conv1, bn1, layer{k}.{i}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1}, linear."""

    def __init__(self, num_classes, stage_sizes, widths, strides, option_a=False, channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = _bn(widths[0])
        in_planes = widths[0]
        self.num_stages = len(stage_sizes)
        for k, (blocks, width, stride) in enumerate(zip(stage_sizes, widths, strides), start=1):
            stage = []
            for i in range(blocks):
                stage.append(BasicBlock(in_planes, width, stride if i == 0 else 1, option_a))
                in_planes = width
            setattr(self, f"layer{k}", nn.Sequential(*stage))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x, features: bool = False):
        x = F.relu(self.bn1(self.conv1(x)))
        for k in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{k}")(x)
        feature = x.mean((2, 3))
        logits = self.linear(feature)
        return (logits, feature) if features else logits


# ------------------------------------------------------------------------------ wide ResNets

class WideBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.bn1 = _bn(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = in_planes == planes
        if not self.equal:
            self.convShortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))   # projection of a, not x


class WideGroup(nn.Module):
    def __init__(self, n, in_planes, planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes,
                                               stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """Keys conv1, block{g}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc."""

    def __init__(self, num_classes, depth, widen_factor, channels=3):
        super().__init__()
        n, k = (depth - 4) // 6, widen_factor
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        self.block1 = WideGroup(n, 16, 16 * k, 1)
        self.block2 = WideGroup(n, 16 * k, 32 * k, 2)
        self.block3 = WideGroup(n, 32 * k, 64 * k, 2)
        self.bn1 = _bn(64 * k)
        self.fc = nn.Linear(64 * k, num_classes)

    def forward(self, x, features: bool = False):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        feature = F.relu(self.bn1(x)).mean((2, 3))
        logits = self.fc(feature)
        return (logits, feature) if features else logits


# ------------------------------------------------------------------------------ VGG-11-BN

class VGG(nn.Module):
    """Keys block{b}.{3j} (conv, with bias), block{b}.{3j+1} (BN), classifier."""

    BLOCKS = ((64,), (128,), (256, 256), (512, 512), (512, 512))

    def __init__(self, num_classes, channels=3):
        super().__init__()
        in_c = channels
        for b, widths in enumerate(self.BLOCKS):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(in_c, w, 3, 1, 1), _bn(w), nn.ReLU()]
                in_c = w
            setattr(self, f"block{b}", nn.Sequential(*layers))
        self.classifier = nn.Linear(in_c, num_classes)

    def forward(self, x, features: bool = False):
        large = x.shape[-1] == 64
        for b in range(len(self.BLOCKS)):
            x = getattr(self, f"block{b}")(x)
            if b < 3 or (b == 3 and large):
                x = F.max_pool2d(x, 2)
        feature = x.mean((2, 3))
        logits = self.classifier(feature)
        return (logits, feature) if features else logits


# ------------------------------------------------------------------------------ small nets

class LeNet5(nn.Module):
    """Keys conv1..3 (with bias), bn1..3 (BN variants), fc1, fc2; the feature is conv3's output."""

    def __init__(self, num_classes=10, width_divisor=1, use_bn=False, channels=1):
        super().__init__()
        w1, w2, w3, w4 = (c // width_divisor for c in (6, 16, 120, 84))
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(channels, w1, 5), nn.Conv2d(w1, w2, 5),
                                              nn.Conv2d(w2, w3, 5))
        self.use_bn = use_bn
        if use_bn:
            self.bn1, self.bn2, self.bn3 = _bn(w1), _bn(w2), _bn(w3)
        self.fc1 = nn.Linear(w3, w4)
        self.fc2 = nn.Linear(w4, num_classes)

    def forward(self, x, features: bool = False):
        bn = (lambda i, h: getattr(self, f"bn{i}")(h)) if self.use_bn else (lambda i, h: h)
        x = F.max_pool2d(F.relu(bn(1, self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(bn(2, self.conv2(x))), 2)
        x = F.relu(bn(3, self.conv3(x)))
        feature = x.flatten(1)
        logits = self.fc2(F.relu(self.fc1(feature)))
        return (logits, feature) if features else logits


class SmallCNN(nn.Module):
    """Keys conv1..3 (no bias; strides 1, 2, 2), bn1..3, linear."""

    def __init__(self, num_classes, widths=(32, 64, 128), channels=1):
        super().__init__()
        in_c = channels
        for i, w in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(in_c, w, 3, 1 if i == 1 else 2, 1, bias=False))
            setattr(self, f"bn{i}", _bn(w))
            in_c = w
        self.depth = len(widths)
        self.linear = nn.Linear(in_c, num_classes)

    def forward(self, x, features: bool = False):
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        feature = x.mean((2, 3))
        logits = self.linear(feature)
        return (logits, feature) if features else logits


# ------------------------------------------------------------------------------ CPSC parts

class ConditionalBatchNorm(nn.Module):
    """BatchNorm without affine parameters (eps 1e-3), then gamma[y], beta[y] per class.
    Keys bn.running_mean/var, gamma.weight, beta.weight ([K, C], as the Flax CBN's params)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=1e-3, momentum=0.1, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x, y):
        return self.gamma(y)[:, :, None, None] * self.bn(x) + self.beta(y)[:, :, None, None]


class ConditionalGenerator(nn.Module):
    """z, y -> image: l1 to (2 ngf, s, s), bn0; [up x2, conv{i}, bn{i}, LReLU 0.2] for
    i = 1..n; conv{n+1} to c channels, tanh, bn{n+1} (after the tanh, as released)."""

    def __init__(self, num_classes: int, img_size: int = 32, channels: int = 3, nz: int = 256,
                 ngf: int = 64, num_upsamples: int = 2):
        super().__init__()
        self.init_size = img_size // 2 ** num_upsamples
        self.ngf, self.n = ngf, num_upsamples
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size ** 2)
        self.bn0 = ConditionalBatchNorm(2 * ngf, num_classes)
        width_in = 2 * ngf
        for i in range(1, num_upsamples + 1):
            width = ngf if i == num_upsamples else 2 * ngf
            setattr(self, f"conv{i}", nn.Conv2d(width_in, width, 3, 1, 1))
            setattr(self, f"bn{i}", ConditionalBatchNorm(width, num_classes))
            width_in = width
        setattr(self, f"conv{num_upsamples + 1}", nn.Conv2d(ngf, channels, 3, 1, 1))
        setattr(self, f"bn{num_upsamples + 1}", ConditionalBatchNorm(channels, num_classes))

    def forward(self, z, y):
        # Flax reshapes the Dense output as NHWC; permute so both read the same units. The
        # permuted view has channels-last strides, which every later op would inherit: copy it
        # to the standard layout, so the network runs in the layout its weights were given
        # (NCHW as released; leaked channels-last made the benchmark's baseline faster on a
        # CPU, docs/RESULTS.md).
        h = self.l1(z).view(z.shape[0], self.init_size, self.init_size, 2 * self.ngf)
        h = self.bn0(h.permute(0, 3, 1, 2).contiguous(), y)
        for i in range(1, self.n + 1):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = F.leaky_relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h), y), 0.2)
        h = torch.tanh(getattr(self, f"conv{self.n + 1}")(h))
        return getattr(self, f"bn{self.n + 1}")(h, y)


class FeatureAdapter(nn.Module):
    """Linear(d_s, d_s)-ReLU-Linear(d_s, d_t): keys fc1, fc2."""

    def __init__(self, d_s: int, d_t: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_s, d_s), nn.Linear(d_s, d_t)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


# ------------------------------------------------------------------------------ registry

def _resnet_a(depth):
    n = (depth - 2) // 6
    return lambda k, c: CifarResNet(k, (n, n, n), (16, 32, 64), (1, 2, 2), True, c)


_MODELS: Dict[str, Callable[[int, int], nn.Module]] = {
    "lenet5": lambda k, c: LeNet5(k, 1, False, c),
    "lenet5_half": lambda k, c: LeNet5(k, 2, False, c),
    "lenet5_bn": lambda k, c: LeNet5(k, 1, True, c),
    "lenet5_half_bn": lambda k, c: LeNet5(k, 2, True, c),
    "resnet18": lambda k, c: CifarResNet(k, (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2),
                                         False, c),
    "resnet34": lambda k, c: CifarResNet(k, (3, 4, 6, 3), (64, 128, 256, 512), (1, 2, 2, 2),
                                         False, c),
    **{f"resnet{d}": _resnet_a(d) for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"wrn_{d}_{w}": (lambda d, w: lambda k, c: WideResNet(k, d, w, c))(d, w)
       for d, w in ((16, 1), (16, 2), (40, 1), (40, 2))},
    "vgg11_bn": lambda k, c: VGG(k, c),
    "small_cnn": lambda k, c: SmallCNN(k, (32, 64, 128), c),
    "small_cnn_half": lambda k, c: SmallCNN(k, (16, 32, 64), c),
}


def available_models():
    return sorted(_MODELS)


def get_model(name: str, num_classes: int, channels: int = None) -> nn.Module:
    """The PyTorch network of a registry name (channels: 1 for lenet*/small_cnn*, else 3)."""
    if name not in _MODELS:
        raise ValueError(f"no PyTorch definition of {name!r}; available: "
                         f"{', '.join(available_models())}")
    if channels is None:
        channels = 1 if name.startswith(("lenet", "small_cnn")) else 3
    return _MODELS[name](num_classes, channels)


def feature_dim(model: nn.Module, image_size: int, channels: int) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        p = next(model.parameters())
        _, f = model(torch.zeros(1, channels, image_size, image_size, dtype=p.dtype), features=True)
    model.train(was_training)
    return f.shape[1]
