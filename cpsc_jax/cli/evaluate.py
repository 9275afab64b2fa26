"""Accuracy of a model checkpoint (teacher or student) on a labelled set.

    cpsc-evaluate --checkpoint workdirs/mnist_teacher/teacher --data /path/to/mnist
    cpsc-evaluate --checkpoint DIR --data /path/to/test_batch_first1017.npz
    cpsc-evaluate --checkpoint DIR --data /path/to/cifar10 --protocol holdout
    cpsc-evaluate --checkpoint DIR --data cifar10:test        # TFDS (prepared)

--data: a dataset folder in its official layout (detected; --dataset to name it), a single
file (.npz with data/labels, a CIFAR pickle batch such as data_batch_5, an SVHN .mat), or a
TFDS spec NAME:SPLIT. Images are normalised with the checkpoint's own mean/std; images of another
size are refused unless --resize (PIL bilinear: 28x28 MNIST .npz for a 32x32 LeNet). Prints the
accuracy and the per-class accuracy; the last line is one JSON object (accuracy, num_examples,
per_class_accuracy, ...).
"""
import argparse
import json
import sys

from cpsc_jax.data import available_datasets
from cpsc_jax.errors import UserError
from cpsc_jax.training.evaluation import evaluate_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory (model.json)")
    p.add_argument("--data", required=True,
                   help="dataset folder, .npz / CIFAR batch / .mat file, a dataset name "
                        "(digits; others from their prepared TFDS copy) or TFDS NAME:SPLIT")
    p.add_argument("--split", default="test", choices=("train", "test"),
                   help="split of a dataset folder (default test)")
    p.add_argument("--dataset", choices=available_datasets(),
                   help="the folder's dataset, when its layout is not detected")
    p.add_argument("--protocol", default="standard", choices=("standard", "holdout"),
                   help="holdout: a cifar10 folder's test split is data_batch_5")
    p.add_argument("--tfds-dir", default="", help="TFDS data directory for NAME:SPLIT")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--resize", action="store_true",
                   help="resize images of another size to the checkpoint's (bilinear); without "
                        "it such data is refused")
    args = p.parse_args(argv)
    try:
        report = evaluate_checkpoint(args.checkpoint, args.data, split=args.split,
                                     dataset=args.dataset, protocol=args.protocol,
                                     tfds_dir=args.tfds_dir, batch_size=args.batch_size,
                                     resize=args.resize)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    resized = (f" (resized from {report['resized_from'][0]}x{report['resized_from'][1]})"
               if report["resized_from"] else "")
    print(f"{report['arch']} on {report['set']}: {report['num_examples']} images{resized}")
    for k, (acc, n) in enumerate(zip(report["per_class_accuracy"], report["per_class_count"])):
        print(f"  class {k:3d}: {'-' if acc is None else f'{acc:6.2f}%'} of {n}")
    print(f"accuracy {report['accuracy']:.2f}%")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
