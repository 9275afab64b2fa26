"""PyTorch <-> cpsc-jax conversion: parity of every classifier with an independent PyTorch build.

The PyTorch networks below are written from the method's facts (docs/method.md §2), with
PyTorch's own key layout; nothing is copied from the reference projects. Weights *and* BatchNorm running
statistics are randomised, the PyTorch net runs in eval mode, and the converted Flax net must
reproduce its logits and features to 1e-4 (fp32; see assert_close).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cpsc_jax.infra.checkpoint import load_model  # noqa: E402
from cpsc_jax.data import registry  # noqa: E402
from cpsc_jax.teachers.convert import (ConversionError, convert_teacher,  # noqa: E402
                              export_student, flax_to_torch, load_torch_state_dict,
                              torch_to_flax)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Independent PyTorch reference networks (NCHW), each returning (logits, feature)
# ---------------------------------------------------------------------------------------------

class TorchBasicBlock(tnn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU. Shortcut on a shape change: a 1x1
    conv + BN ("shortcut.0"/"shortcut.1"), or, option A, x[:, :, ::2, ::2] zero-padded with
    planes // 4 channels on each side (no parameters)."""

    def __init__(self, cin, planes, stride, option_a):
        super().__init__()
        self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.pad = None
        self.shortcut = tnn.Sequential()
        if stride != 1 or cin != planes:
            if option_a:
                self.pad = planes // 4
            else:
                self.shortcut = tnn.Sequential(tnn.Conv2d(cin, planes, 1, stride, bias=False),
                                               tnn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad is not None:
            sc = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class TorchCifarResNet(tnn.Module):
    def __init__(self, blocks, widths, strides, option_a, num_classes):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(widths[0])
        cin = widths[0]
        for s, (n, w, st) in enumerate(zip(blocks, widths, strides), start=1):
            layers = []
            for i in range(n):
                layers.append(TorchBasicBlock(cin, w, st if i == 0 else 1, option_a))
                cin = w
            setattr(self, f"layer{s}", tnn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.linear = tnn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        feature = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(feature), feature


class TorchWideBlock(tnn.Module):
    """Pre-activation: a = ReLU(BN1(x)); out = conv2(ReLU(BN2(conv1(a)))); shortcut x if the
    widths match, else convShortcut(a)."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(cin)
        self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.equal = cin == planes
        if not self.equal:
            self.convShortcut = tnn.Conv2d(cin, planes, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))


class TorchWideGroup(tnn.Module):
    def __init__(self, n, cin, planes, stride):
        super().__init__()
        self.layer = tnn.Sequential(*[TorchWideBlock(cin if i == 0 else planes, planes,
                                                     stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TorchWRN(tnn.Module):
    def __init__(self, depth, k, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = TorchWideGroup(n, 16, 16 * k, 1)
        self.block2 = TorchWideGroup(n, 16 * k, 32 * k, 2)
        self.block3 = TorchWideGroup(n, 32 * k, 64 * k, 2)
        self.bn1 = tnn.BatchNorm2d(64 * k)
        self.fc = tnn.Linear(64 * k, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        feature = F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1)
        return self.fc(feature), feature


class TorchVGG11BN(tnn.Module):
    """block{b} = Sequential(conv, BN, ReLU[, conv, BN, ReLU]); 2x2 max-pool after blocks 0-2
    (and 3 for 64x64 inputs); adaptive average pool; classifier."""

    def __init__(self, num_classes):
        super().__init__()
        cin = 3
        for b, widths in enumerate(((64,), (128,), (256, 256), (512, 512), (512, 512))):
            layers = []
            for w in widths:
                layers += [tnn.Conv2d(cin, w, 3, 1, 1, bias=True), tnn.BatchNorm2d(w),
                           tnn.ReLU()]
                cin = w
            setattr(self, f"block{b}", tnn.Sequential(*layers))
        self.classifier = tnn.Linear(512, num_classes)

    def forward(self, x):
        large = x.shape[-1] == 64
        for b in range(5):
            x = getattr(self, f"block{b}")(x)
            if b < 3 or (b == 3 and large):
                x = F.max_pool2d(x, 2)
        feature = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(feature), feature


class TorchLeNet5(tnn.Module):
    """conv5x5 -> 6, ReLU, pool; conv5x5 -> 16, ReLU, pool; conv5x5 -> 120, ReLU; fc 84, ReLU;
    fc K. Half: every width halved. BN variant: BN after each conv."""

    def __init__(self, num_classes, divisor, use_bn):
        super().__init__()
        w1, w2, w3, w4 = (c // divisor for c in (6, 16, 120, 84))
        self.use_bn = use_bn
        self.conv1 = tnn.Conv2d(1, w1, 5)
        self.conv2 = tnn.Conv2d(w1, w2, 5)
        self.conv3 = tnn.Conv2d(w2, w3, 5)
        if use_bn:
            self.bn1, self.bn2, self.bn3 = (tnn.BatchNorm2d(w) for w in (w1, w2, w3))
        self.fc1 = tnn.Linear(w3, w4)
        self.fc2 = tnn.Linear(w4, num_classes)

    def forward(self, x):
        for i in (1, 2, 3):
            x = getattr(self, f"conv{i}")(x)
            if self.use_bn:
                x = getattr(self, f"bn{i}")(x)
            x = F.relu(x)
            if i < 3:
                x = F.max_pool2d(x, 2)
        feature = x.flatten(1)
        return self.fc2(F.relu(self.fc1(feature))), feature


def torch_model(arch, num_classes):
    if arch in ("resnet18", "resnet34"):
        blocks = (2, 2, 2, 2) if arch == "resnet18" else (3, 4, 6, 3)
        return TorchCifarResNet(blocks, (64, 128, 256, 512), (1, 2, 2, 2), False, num_classes)
    if arch in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110"):
        n = (int(arch[6:]) - 2) // 6
        return TorchCifarResNet((n, n, n), (16, 32, 64), (1, 2, 2), True, num_classes)
    if arch.startswith("wrn_"):
        _, depth, k = arch.split("_")
        return TorchWRN(int(depth), int(k), num_classes)
    if arch == "vgg11_bn":
        return TorchVGG11BN(num_classes)
    if arch.startswith("lenet5"):
        return TorchLeNet5(num_classes, 2 if "half" in arch else 1, arch.endswith("_bn"))
    raise KeyError(arch)


def randomised(model, seed):
    """Random weights and BN statistics (positive running_var), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (tnn.Conv2d, tnn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, tnn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.6 + 0.6)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 10000, (1,), generator=g)))
    return model.eval()


def torch_forward(model, x_nhwc):
    with torch.no_grad():
        logits, feature = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
    return logits.numpy(), feature.numpy()


def flax_forward(spec, variables, x_nhwc):
    logits, feature = spec.build().apply(variables, x_nhwc, train=False, features=True)
    return np.asarray(logits), np.asarray(feature)


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    # 1e-4 absolute; 1e-5 of the largest output where outputs exceed 10 (deep option-A ResNets
    # with random BN statistics grow to ~200: their fp32 round-off is larger in absolute terms).
    scale = max(1.0, float(np.max(np.abs(expected))) / 10)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= TOL * scale, f"{what}: max |diff| {err:.3g} (tolerance {TOL * scale:.3g})"


def save_variant(state_dict, path, variant):
    """The ways published checkpoints wrap a state_dict."""
    if variant == "raw":
        obj = state_dict
    elif variant == "cmi":  # CMI/Fast: {'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}
        obj = {"epoch": 200, "arch": "x", "state_dict": state_dict,
               "best_acc1": np.float64(93.1), "optimizer": {"state": {}, "param_groups": []}}
    elif variant == "module":  # DataParallel, option-A release style
        obj = {"state_dict": {f"module.{k}": v for k, v in state_dict.items()},
               "best_prec1": 91.7}
    elif variant == "model_state_dict":
        obj = {"model_state_dict": state_dict, "epoch": 3}
    else:
        raise KeyError(variant)
    torch.save(obj, path)
    return path


# arch -> (num_classes, checkpoint wrapping, batch sizes, dataset)
CASES = {
    "resnet18": (100, "cmi", (3,), "cifar100"),
    "resnet34": (10, "raw", (3,), "cifar10"),
    "wrn_16_1": (10, "model_state_dict", (3, 5), "cifar10"),
    "wrn_16_2": (100, "module", (5,), "cifar100"),
    "wrn_40_1": (10, "cmi", (5,), "svhn"),
    "wrn_40_2": (10, "raw", (3,), "cifar10"),
    "vgg11_bn": (200, "cmi", (3,), "tiny_imagenet"),  # 64x64: the extra pool after block 3
    "resnet8": (10, "raw", (3,), "cifar10"),
    "resnet14": (100, "module", (5,), "cifar100"),
    "resnet20": (10, "module", (3, 5), "cifar10"),
    "resnet32": (10, "module", (5,), "cifar10"),
    "resnet44": (10, "raw", (3,), "cifar10"),
    "resnet56": (100, "model_state_dict", (5,), "cifar100"),
    "resnet110": (10, "module", (3,), "cifar10"),
    "lenet5": (10, "raw", (3, 5), "mnist"),
    "lenet5_half": (10, "module", (5,), None),  # 1-channel nets default to MNIST
    "lenet5_bn": (10, "cmi", (3, 5), "mnist"),
    "lenet5_half_bn": (10, "model_state_dict", (3,), None),
}


def test_every_registered_classifier_is_covered():
    from cpsc_jax.models import available_models
    assert set(CASES) == {a for a in available_models() if not a.startswith("small_cnn")}


@pytest.mark.parametrize("arch", list(CASES))
def test_parity_and_export_round_trip(arch, tmp_path):
    num_classes, variant, batches, dataset = CASES[arch]
    seed = sum(map(ord, arch))
    tmodel = randomised(torch_model(arch, num_classes), seed)
    state = tmodel.state_dict()
    src = save_variant(state, tmp_path / f"{arch}.pth", variant)

    out = tmp_path / "converted"
    convert_teacher(str(src), str(out), arch, num_classes, dataset=dataset)
    spec, variables = load_model(str(out))
    d = registry.get(dataset or "mnist")
    assert (spec.arch, spec.num_classes) == (arch, num_classes)
    assert (spec.image_size, spec.channels) == (d.image_size, d.channels)
    assert spec.mean == pytest.approx(d.mean) and spec.std == pytest.approx(d.std)

    rng = np.random.default_rng(seed)
    for b in batches:
        x = rng.standard_normal((b, spec.image_size, spec.image_size, spec.channels),
                                dtype=np.float32)
        t_logits, t_feature = torch_forward(tmodel, x)
        f_logits, f_feature = flax_forward(spec, variables, x)
        assert_close(f_logits, t_logits, f"{arch} logits (batch {b})")
        assert_close(f_feature, t_feature, f"{arch} feature (batch {b})")

    # Export back: same keys, identical tensors; loads strictly into the PyTorch net.
    pt = tmp_path / "exported.pt"
    export_student(str(out), str(pt))
    exported = torch.load(str(pt), map_location="cpu", weights_only=True)
    assert set(exported) == set(state)
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            assert int(exported[k]) == 0
        else:
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    fresh = torch_model(arch, num_classes)
    fresh.load_state_dict(exported, strict=True)
    meta = json.loads((tmp_path / "exported.json").read_text())
    assert meta["arch"] == arch and meta["mean"] == pytest.approx(list(d.mean))


def test_flax_to_torch_inverts_torch_to_flax():
    state = randomised(torch_model("wrn_16_2", 10), 1).state_dict()
    variables = torch_to_flax(state, "wrn_16_2", 10)
    assert variables["params"]["block2"]["layer_0"]["convShortcut"]["kernel"].shape == (1, 1, 32, 64)
    assert variables["batch_stats"]["block1"]["layer_0"]["bn1"]["var"].shape == (16,)
    back = flax_to_torch(variables)
    expected = {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(back[k], v)


# ---------------------------------------------------------------------------------------------
# Scripts (subprocess)
# ---------------------------------------------------------------------------------------------

def run_script(name, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", name), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_scripts_convert_and_export(tmp_path):
    tmodel = randomised(torch_model("resnet20", 10), 7)
    state = tmodel.state_dict()
    src = save_variant(state, tmp_path / "resnet20.th", "module")
    out = tmp_path / "teacher"
    r = run_script("convert_teacher.py", "--arch", "resnet20", "--num-classes", 10,
                   "--input", src, "--output", out, "--mean", "0.5,0.5,0.5", "--std", "0.25")
    assert r.returncode == 0, r.stderr
    spec, variables = load_model(str(out))
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.25, 0.25, 0.25)
    x = np.random.default_rng(0).standard_normal((5, 32, 32, 3), dtype=np.float32)
    t_logits, t_feature = torch_forward(tmodel, x)
    f_logits, f_feature = flax_forward(spec, variables, x)
    assert_close(f_logits, t_logits, "resnet20 logits via script")
    assert_close(f_feature, t_feature, "resnet20 feature via script")

    pt = tmp_path / "student.pt"
    r = run_script("export_student.py", "--checkpoint", out, "--output", pt)
    assert r.returncode == 0, r.stderr
    exported = torch.load(str(pt), map_location="cpu", weights_only=True)
    assert set(exported) == set(state)
    for k, v in state.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(exported[k], v), k
    assert json.loads((tmp_path / "student.json").read_text())["std"] == [0.25] * 3


@pytest.mark.slow
def test_script_errors_are_short_and_nonzero(tmp_path):
    state = randomised(torch_model("resnet20", 100), 3).state_dict()
    src = save_variant(state, tmp_path / "r20.pt", "cmi")
    r = run_script("convert_teacher.py", "--arch", "resnet20", "--num-classes", 10,
                   "--input", src, "--output", tmp_path / "o", "--dataset", "cifar10")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "100 classes" in lines[0] and "--num-classes 10" in lines[0]
    assert not (tmp_path / "o" / "model.json").exists()

    with pytest.raises(ConversionError) as e:  # unknown arch: the valid names are listed
        convert_teacher(str(src), str(tmp_path / "o"), "resnet21", 10, dataset="cifar10")
    assert "resnet20" in str(e.value) and "wrn_40_2" in str(e.value)

    r = run_script("export_student.py", "--checkpoint", tmp_path / "nothing", "--output",
                   tmp_path / "x.pt")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "model.json" in r.stderr


# ---------------------------------------------------------------------------------------------
# Library errors
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def r20_state():
    return {k: v.numpy() for k, v in randomised(torch_model("resnet20", 10), 5).state_dict().items()
            if not k.endswith("num_batches_tracked")}


def test_key_and_shape_mismatches_are_listed(r20_state):
    state = dict(r20_state)
    del state["layer3.2.bn2.running_var"]
    state["layer4.0.conv1.weight"] = np.zeros((1,), np.float32)
    state["layer2.1.conv2.weight"] = np.zeros((32, 32, 5, 5), np.float32)
    with pytest.raises(ConversionError) as e:
        torch_to_flax(state, "resnet20", 10)
    msg = str(e.value)
    assert "missing 1: layer3.2.bn2.running_var [64]" in msg
    assert "unexpected 1: layer4.0.conv1.weight [1]" in msg
    assert ("shape mismatch 1: layer2.1.conv2.weight is [32, 32, 5, 5], expected [32, 32, 3, 3]"
            in msg)
    assert len(msg.splitlines()) <= 5


def test_wrong_arch_names_the_matching_one(r20_state):
    state32 = {k: v.numpy() for k, v in torch_model("resnet32", 10).state_dict().items()
               if not k.endswith("num_batches_tracked")}
    with pytest.raises(ConversionError) as e:
        torch_to_flax(state32, "resnet20", 10)
    msg = str(e.value)
    assert "unexpected 60: layer1.3.conv1.weight [16, 16, 3, 3]" in msg and "(55 more)" in msg
    assert "the keys match --arch resnet32" in msg
    with pytest.raises(ConversionError, match="missing"):
        torch_to_flax(r20_state, "resnet32", 10)


def test_wrong_num_classes_is_one_line(r20_state):
    with pytest.raises(ConversionError) as e:
        torch_to_flax(r20_state, "resnet20", 100)
    assert str(e.value) == ("checkpoint has 10 classes (linear.weight is [10, 64]) but "
                            "--num-classes 100 was given")
    lenet = {k: v.numpy() for k, v in torch_model("lenet5", 10).state_dict().items()}
    with pytest.raises(ConversionError) as e:
        torch_to_flax(lenet, "lenet5", 7)
    assert str(e.value) == ("checkpoint has 10 classes (fc2.weight is [10, 84]) but "
                            "--num-classes 7 was given")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], listed)
    nested = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "best_acc1": 90.0}, nested)
    pickled = tmp_path / "module.pt"
    torch.save(torch_model("lenet5", 10), pickled)  # a whole nn.Module: pickled code
    cases = {text: "is not a PyTorch checkpoint", listed: "holds a list, not a state_dict",
             nested: "'epoch', 'best_acc1'", pickled: "model.state_dict()",
             tmp_path / "absent.pt": "no such file"}
    for path, needle in cases.items():
        with pytest.raises(ConversionError) as e:
            load_torch_state_dict(str(path))
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_state_dict_unwrapping(tmp_path, r20_state):
    tensors = {k: torch.from_numpy(v) for k, v in r20_state.items()}
    tensors["bn1.num_batches_tracked"] = torch.tensor(5)
    for variant in ("raw", "cmi", "module", "model_state_dict"):
        got = load_torch_state_dict(str(save_variant(tensors, tmp_path / f"{variant}.pt", variant)))
        assert set(got) == set(r20_state)
        np.testing.assert_array_equal(got["linear.weight"], r20_state["linear.weight"])
    half = {k: v.half() for k, v in tensors.items() if v.is_floating_point()}
    got = load_torch_state_dict(str(save_variant(half, tmp_path / "half.pt", "raw")))
    assert got["conv1.weight"].dtype == np.float32


def test_normalisation_is_required_for_rgb(tmp_path, r20_state):
    src = tmp_path / "r20.pt"
    torch.save({k: torch.from_numpy(v) for k, v in r20_state.items()}, src)
    with pytest.raises(ConversionError, match="--dataset"):
        convert_teacher(str(src), str(tmp_path / "o"), "resnet20", 10)
    with pytest.raises(ConversionError, match="3-channel"):
        convert_teacher(str(src), str(tmp_path / "o"), "resnet20", 10, mean="0.5,0.5",
                        std="0.2,0.2")
    bad = dict(r20_state)
    bad["bn1.running_var"] = -np.abs(bad["bn1.running_var"]) - 1
    with pytest.raises(ConversionError, match="negative"):
        torch_to_flax(bad, "resnet20", 10)
