"""Dataset readers: official on-disk layouts written small by the tests, TFDS under
tfds.testing.mock_data, and the project's real data in <repo>/../shared/data when present."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from cpsc_jax import data as D
from cpsc_jax.data import DataError
from cpsc_jax.data.files import resize_uint8

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def one_line(exc_info, *needles):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


# --- resizing ----------------------------------------------------------------------------------

def test_resize_matches_pil_reference_values():
    # Expected outputs computed with Pillow 13 Image.resize(..., BILINEAR) on these inputs.
    x = np.array([[175, 196, 25, 246, 67], [211, 151, 103, 92, 185], [142, 23, 72, 89, 110]],
                 np.uint8)
    up = np.array([[180, 125, 154, 112], [190, 129, 118, 143], [165, 98, 91, 141],
                   [112, 43, 82, 105]], np.uint8)
    y = np.array([[42, 218, 136, 167, 230, 68], [176, 127, 135, 172, 0, 75],
                  [55, 250, 6, 19, 188, 44], [191, 69, 56, 152, 183, 181],
                  [112, 251, 189, 192, 34, 56], [201, 206, 38, 4, 238, 137]], np.uint8)
    down = np.array([[127, 155, 157, 98], [140, 103, 95, 90], [149, 119, 139, 128],
                     [188, 135, 106, 127]], np.uint8)
    np.testing.assert_array_equal(resize_uint8(x[None, :, :, None], 4)[0, :, :, 0], up)
    np.testing.assert_array_equal(resize_uint8(y[None, :, :, None], 4)[0, :, :, 0], down)


def test_resize_properties():
    const = np.full((2, 28, 28, 3), 77, np.uint8)
    out = resize_uint8(const, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    assert np.all(out == 77)
    x = np.random.RandomState(0).randint(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    assert resize_uint8(x, 8) is x


def test_resize_equals_pillow_when_installed():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.RandomState(1)
    for h, w, s in ((28, 28, 32), (64, 64, 32), (30, 20, 32)):
        x = rng.randint(0, 256, (3, h, w, 3)).astype(np.uint8)
        ref = np.stack([np.asarray(Image.fromarray(im).resize((s, s), Image.BILINEAR)) for im in x])
        np.testing.assert_array_equal(resize_uint8(x, s), ref)


# --- MNIST IDX ---------------------------------------------------------------------------------

def write_idx(path, array, gz):
    array = np.asarray(array, np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def make_mnist(folder, n_train=6, n_test=4, gz=True):
    rng = np.random.RandomState(0)
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.randint(0, 10, n).astype(np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{sfx}"), x, gz)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{sfx}"), y, gz)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    ref = make_mnist(tmp_path / "mnist", gz=gz)
    for split in ("train", "test"):
        s = D.load_split({"name": "mnist", "dir": str(tmp_path / "mnist")}, split)
        x, y = ref[split]
        assert s.images.shape == (len(x), 32, 32, 1) and s.images.dtype == np.uint8
        np.testing.assert_array_equal(s.labels, y.astype(np.int32))
        np.testing.assert_array_equal(s.images, resize_uint8(x[..., None], 32))
        assert s.num_classes == 10


def test_mnist_errors(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_split({"name": "mnist", "dir": str(tmp_path / "nope")}, "train")
    one_line(e, tmp_path / "nope", "train-images-idx3-ubyte")
    make_mnist(tmp_path / "m")
    with open(tmp_path / "m" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(gzip.compress(b"\x00\x00\x08\x03garbage"))
    with pytest.raises(DataError) as e:
        D.load_split({"name": "mnist", "dir": str(tmp_path / "m")}, "test")
    one_line(e, "t10k-images-idx3-ubyte.gz")
    os.remove(tmp_path / "m" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError) as e:
        D.load_split({"name": "mnist", "dir": str(tmp_path / "m")}, "test")
    one_line(e, "t10k-labels-idx1-ubyte")


# --- CIFAR -------------------------------------------------------------------------------------

def write_batch(path, images_nhwc, labels, label_key=b"labels", filenames=False, extra=None):
    d = {b"data": images_nhwc.transpose(0, 3, 1, 2).reshape(len(images_nhwc), -1),
         label_key: [int(v) for v in labels], b"batch_label": b"testing"}
    if filenames:
        d[b"filenames"] = [b"x.png"] * len(labels)
    d.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(d, f)


def make_cifar10(root, n=4, test=True):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.RandomState(0)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + (["test_batch"] if test else [])
    for i, name in enumerate(names):
        x = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        y = (np.arange(n) + i) % 10
        write_batch(os.path.join(folder, name), x, y, filenames=(i == 0))
        batches[name] = (x, y)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, f)
    return folder, batches


def test_cifar10_standard_and_holdout(tmp_path):
    folder, b = make_cifar10(tmp_path)
    for d in (str(tmp_path), folder):  # the folder itself or its parent
        train = D.load_split({"name": "cifar10", "dir": d}, "train")
        assert train.images.shape == (20, 32, 32, 3)
        np.testing.assert_array_equal(train.images[:4], b["data_batch_1"][0])  # pixel layout
        test = D.load_split({"name": "cifar10", "dir": d}, "test")
        np.testing.assert_array_equal(test.labels, b["test_batch"][1])
    cfg = {"name": "cifar10", "dir": str(tmp_path), "protocol": "holdout"}
    train, test = D.load_split(cfg, "train"), D.load_split(cfg, "test")
    assert len(train) == 16 and len(test) == 4
    np.testing.assert_array_equal(test.images, b["data_batch_5"][0])
    np.testing.assert_array_equal(train.labels[-4:], b["data_batch_4"][1])
    assert test.name.startswith("cifar10-holdout") and D.protocol_label(cfg) == "cifar10-holdout"


def test_cifar10_without_test_batch_points_to_holdout(tmp_path):
    make_cifar10(tmp_path, test=False)
    with pytest.raises(DataError) as e:
        D.load_split({"name": "cifar10", "dir": str(tmp_path)}, "test")
    one_line(e, "test_batch", "holdout")
    with pytest.raises(DataError) as e:
        D.load_split({"name": "cifar10", "dir": str(tmp_path / "x")}, "train")
    one_line(e, tmp_path / "x", "cifar-10-batches-py")
    with pytest.raises(ValueError, match="cifar10 only"):
        D.load_split({"name": "mnist", "dir": str(tmp_path), "protocol": "holdout"}, "train")
    with pytest.raises(ValueError, match="protocol"):
        D.load_split({"name": "cifar10", "dir": str(tmp_path), "protocol": "nope"}, "train")


def test_cifar10_malformed_batch(tmp_path):
    folder, _ = make_cifar10(tmp_path)
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DataError) as e:
        D.load_split({"name": "cifar10", "dir": folder}, "train")
    one_line(e, "data_batch_3")


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.RandomState(0)
    for split, n in (("train", 6), ("test", 3)):
        x = rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        write_batch(folder / split, x, np.arange(n) * 17 % 100, label_key=b"fine_labels",
                    extra={b"coarse_labels": [0] * n})
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    s = D.load_split({"name": "cifar100", "dir": str(tmp_path)}, "train")
    assert s.num_classes == 100 and len(s) == 6
    np.testing.assert_array_equal(s.labels, np.arange(6) * 17 % 100)
    assert len(D.load_split({"name": "cifar100", "dir": str(folder)}, "test")) == 3


# --- npz, SVHN, Tiny-ImageNet ------------------------------------------------------------------

def test_npz_splits_and_layouts(tmp_path):
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    y = np.arange(5, dtype=np.int64)
    np.savez(tmp_path / "train.npz", data=x, labels=y)
    np.savez(tmp_path / "test.npz", data=x.transpose(0, 3, 1, 2), labels=y)  # NCHW
    cfg = {"name": "cifar10", "dir": str(tmp_path)}
    np.testing.assert_array_equal(D.load_split(cfg, "train").images, x)
    np.testing.assert_array_equal(D.load_split(cfg, "test").images, x)
    flat = D.load_npz(str(tmp_path / "train.npz"))
    np.savez(tmp_path / "flat.npz", data=x.transpose(0, 3, 1, 2).reshape(5, -1), labels=y)
    np.testing.assert_array_equal(D.load_npz(str(tmp_path / "flat.npz")).images, flat.images)
    np.savez(tmp_path / "bad.npz", images=x, labels=y)
    with pytest.raises(DataError) as e:
        D.load_npz(str(tmp_path / "bad.npz"))
    one_line(e, "bad.npz", "'data'")
    # grey 28x28 npz for mnist: resized to 32x32
    os.makedirs(tmp_path / "m")
    np.savez(tmp_path / "m" / "train.npz", data=x[..., 0][:, :28, :28], labels=y)
    s = D.load_split({"name": "mnist", "dir": str(tmp_path / "m")}, "train")
    assert s.images.shape == (5, 32, 32, 1)
    with pytest.raises(DataError) as e:  # 3 channels for a 1-channel dataset
        D.load_split({"name": "mnist", "dir": str(tmp_path)}, "train")
    one_line(e, "channels")


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (32, 32, 3, 4)).astype(np.uint8)
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10]])})
    s = D.load_split({"name": "svhn", "dir": str(tmp_path)}, "train")
    np.testing.assert_array_equal(s.labels, [0, 1, 9, 0])
    np.testing.assert_array_equal(s.images[1], x[..., 1])
    with pytest.raises(DataError) as e:
        D.load_split({"name": "svhn", "dir": str(tmp_path)}, "test")
    one_line(e, "test_32x32.mat")


def make_tiny_imagenet(root, wnids=("n02", "n01", "n03"), per_class=2, jpeg=False):
    base = root / "tiny-imagenet-200"
    rng = np.random.RandomState(0)
    images = {}

    def write(path, img):
        path.parent.mkdir(parents=True, exist_ok=True)
        if jpeg:
            from PIL import Image
            Image.fromarray(img).save(path, quality=100)
        else:
            np.save(open(path, "wb"), img)
        images[str(path)] = img

    for w in wnids:
        for i in range(per_class):
            write(base / "train" / w / "images" / f"{w}_{i}.JPEG",
                  rng.randint(0, 256, (64, 64, 3)).astype(np.uint8))
    lines = []
    for i, w in enumerate(wnids):
        write(base / "val" / "images" / f"val_{i}.JPEG", rng.randint(0, 256, (64, 64, 3)).astype(np.uint8))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return base, images


def test_tiny_imagenet_layout(tmp_path, monkeypatch):
    from cpsc_jax.data import tiny_imagenet
    base, images = make_tiny_imagenet(tmp_path)
    monkeypatch.setattr(tiny_imagenet, "decode_image", lambda p: np.load(open(p, "rb")))
    train = D.load_split({"name": "tiny_imagenet", "dir": str(tmp_path)}, "train")
    assert train.images.shape == (6, 64, 64, 3) and train.num_classes == 200
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])  # sorted wnids: n01 n02 n03
    test = D.load_split({"name": "tiny_imagenet", "dir": str(base)}, "test")
    np.testing.assert_array_equal(test.labels, [1, 0, 2])  # val_0 is n02 -> class 1
    np.testing.assert_array_equal(test.images[0], images[str(base / "val" / "images" / "val_0.JPEG")])
    os.remove(base / "val" / "images" / "val_2.JPEG")
    with pytest.raises(DataError) as e:
        D.load_split({"name": "tiny_imagenet", "dir": str(base)}, "test")
    one_line(e, "val_2.JPEG")
    with pytest.raises(DataError) as e:
        D.load_split({"name": "tiny_imagenet", "dir": ""}, "test")
    one_line(e, "data.dir", "tiny-imagenet-200")


def test_tiny_imagenet_jpeg_with_pillow(tmp_path):
    pytest.importorskip("PIL")
    make_tiny_imagenet(tmp_path, jpeg=True, per_class=1)
    s = D.load_split({"name": "tiny_imagenet", "dir": str(tmp_path)}, "train")
    assert s.images.shape == (3, 64, 64, 3) and s.images.dtype == np.uint8


# --- extra eval sets, loading by location ------------------------------------------------------

def test_extra_eval_and_eval_splits(tmp_path):
    make_cifar10(tmp_path, test=False)
    x = np.random.RandomState(0).randint(0, 256, (7, 32, 32, 3)).astype(np.uint8)
    np.savez(tmp_path / "first7.npz", data=x, labels=np.arange(7))
    cfg = {"name": "cifar10", "dir": str(tmp_path), "protocol": "holdout",
           "extra_eval": str(tmp_path / "first7.npz")}
    splits = D.eval_splits(cfg)
    assert set(splits) == {"test", "extra"}
    assert len(splits["extra"]) == 7 and splits["extra"].name == "extra:first7"
    assert splits["extra"].num_classes == 10
    assert D.load_extra_eval({"name": "cifar10", "dir": str(tmp_path)}) is None
    cfg["extra_eval"] = str(tmp_path / "missing.npz")
    with pytest.raises(DataError) as e:
        D.eval_splits(cfg)
    one_line(e, "missing.npz")


def test_load_path_detects_layouts(tmp_path):
    folder, b = make_cifar10(tmp_path / "c10")
    make_mnist(tmp_path / "mn")
    s = D.load_path(str(tmp_path / "c10"))
    np.testing.assert_array_equal(s.labels, b["test_batch"][1])
    s = D.load_path(str(tmp_path / "c10"), protocol="holdout")
    np.testing.assert_array_equal(s.labels, b["data_batch_5"][1])
    s = D.load_path(os.path.join(folder, "data_batch_2"), num_classes=10)
    np.testing.assert_array_equal(s.images, b["data_batch_2"][0])
    assert D.load_path(str(tmp_path / "mn")).images.shape == (4, 32, 32, 1)
    assert D.load_path(str(tmp_path / "mn"), image_size=16).images.shape == (4, 16, 16, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        D.load_path(str(tmp_path / "empty"))
    one_line(e, "empty", "cifar-10-batches-py")
    with pytest.raises(DataError) as e:
        D.load_path(str(tmp_path / "no_such_thing"))
    one_line(e, "no_such_thing", "NAME:SPLIT")


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="valid names"):
        D.load_split({"name": "imagenet", "dir": ""}, "train")
    with pytest.raises(ValueError, match="split"):
        D.load_split({"name": "digits"}, "val")
    s = D.load_split({"name": "digits"}, "test")  # the embedded default still works
    assert s.images.shape[1:] == (8, 8, 1)


# --- TFDS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,shape,k", [("mnist", (32, 32, 1), 10), ("cifar10", (32, 32, 3), 10),
                                          ("cifar100", (32, 32, 3), 100), ("svhn", (32, 32, 3), 10)])
def test_tfds_array_record_source_under_mock_data(name, shape, k):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        s = D.load_split({"name": name, "dir": ""}, "train")
    assert s.images.shape == (6,) + shape and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int32 and s.labels.min() >= 0 and s.labels.max() < k
    assert s.num_classes == k


def test_tfds_spec_under_mock_data_with_known_examples():
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.RandomState(0)
    examples = [{"image": rng.randint(0, 256, (28, 28, 1)).astype(np.uint8), "label": i % 10}
                for i in range(5)]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **kw: examples):
        s = D.load_path("mnist:test")
    np.testing.assert_array_equal(s.labels, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(s.images, resize_uint8(np.stack([e["image"] for e in examples]), 32))


def test_tfds_missing_dataset_never_downloads(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        D.load_split({"name": "cifar10", "dir": "", "tfds_dir": str(tmp_path)}, "test")
    one_line(e, "tfds build cifar10", "array_record", str(tmp_path))
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing was fetched
    with pytest.raises(DataError) as e:
        D.load_split({"name": "cifar10", "dir": "", "protocol": "holdout"}, "train")
    one_line(e, "holdout", "cifar-10-batches-py")


# --- the project's real data (skipped when ../shared/data is absent) ---------------------------

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


@needs_shared
def test_real_mnist():
    cfg = {"name": "mnist", "dir": str(SHARED / "mnist")}
    test = D.load_split(cfg, "test")
    assert test.images.shape == (10000, 32, 32, 1)
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10),
                                  [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    np.testing.assert_array_equal(test.labels[:8], [7, 2, 1, 0, 4, 1, 4, 9])
    mean = test.images.mean() / 255.0
    assert abs(mean - 0.1307) < 0.005, mean  # the literature's constant survives the resize
    train = D.load_split(cfg, "train")
    assert train.images.shape == (60000, 32, 32, 1)
    np.testing.assert_array_equal(train.labels[:5], [5, 0, 4, 1, 9])


@needs_shared
def test_real_cifar10_holdout_protocol():
    cfg = {"name": "cifar10", "dir": str(SHARED / "cifar10"), "protocol": "holdout",
           "extra_eval": str(SHARED / "cifar10" / "test_batch_first1017.npz")}
    train = D.load_split(cfg, "train")
    assert train.images.shape == (40000, 32, 32, 3)
    np.testing.assert_array_equal(train.labels[:10], [6, 9, 9, 4, 1, 1, 2, 7, 8, 3])
    np.testing.assert_array_equal(np.bincount(train.labels[:10000], minlength=10),
                                  [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981])
    splits = D.eval_splits(cfg)
    assert len(splits["test"]) == 10000 and len(splits["extra"]) == 1017
    assert splits["test"].labels.min() == 0 and splits["test"].labels.max() == 9
    np.testing.assert_array_equal(splits["extra"].labels[:10], [3, 8, 8, 0, 6, 6, 1, 6, 3, 1])
    with pytest.raises(DataError) as e:  # the official test batch is not there
        D.load_split({"name": "cifar10", "dir": str(SHARED / "cifar10")}, "test")
    one_line(e, "holdout")


def test_tfds_prepared_array_record_without_tensorflow(tmp_path):
    """A real (tiny) array_record MNIST prepared on disk, read back through tfds.data_source.

    Preparing normally needs TensorFlow (it encodes the PNGs); giving the builder PNG bytes made
    with Pillow avoids that, so this runs wherever Pillow is installed."""
    tfds = pytest.importorskip("tensorflow_datasets")
    Image = pytest.importorskip("PIL.Image")
    import io
    from tensorflow_datasets.core import registered
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    rng = np.random.RandomState(0)
    images = {"train": rng.randint(0, 256, (6, 28, 28)).astype(np.uint8),
              "test": rng.randint(0, 256, (4, 28, 28)).astype(np.uint8)}

    def png(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    with registered.skip_registration():
        class LocalMnist(tfds_mnist.MNIST):  # the registered builder's name, version, features
            name = "mnist"

            def _split_generators(self, dl_manager):
                return {s: ((i, {"image": png(x), "label": i}) for i, x in enumerate(images[s]))
                        for s in images}

    LocalMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    s = D.load_split({"name": "mnist", "dir": "", "tfds_dir": str(tmp_path)}, "test")
    assert s.images.shape == (4, 32, 32, 1) and s.name == "mnist/test"
    order = np.argsort(s.labels)  # TFDS shuffles records; each label is the example's index
    np.testing.assert_array_equal(s.labels[order], np.arange(4))
    np.testing.assert_array_equal(s.images[order], resize_uint8(images["test"][..., None], 32))
    s2 = D.load_path("mnist:train[:3]", tfds_dir=str(tmp_path))
    assert len(s2) == 3


def test_the_public_loader_takes_a_dataset_name():
    import cpsc_jax
    test = cpsc_jax.data.load_split("digits", "test")
    assert test.images.dtype == np.uint8 and test.images.shape[1:] == (8, 8, 1)
    assert len(test) == len(test.labels) == 359 and test.num_classes == 10
    same = cpsc_jax.load_split({"name": "digits"}, "test")
    np.testing.assert_array_equal(same.images, test.images)
    with pytest.raises(Exception, match="data.dir"):
        cpsc_jax.data.load_split("mnist", "test", dir="")   # no folder, no TFDS copy: says so


def test_digits_are_read_as_scikit_learn_loads_them():
    """The digits file is read without importing scikit-learn; the images and labels are
    exactly those of sklearn.datasets.load_digits."""
    from sklearn.datasets import load_digits
    from cpsc_jax.data import digits
    bunch = load_digits()
    images, labels = digits._digits_arrays()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)
