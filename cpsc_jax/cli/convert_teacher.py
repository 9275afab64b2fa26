r"""Convert a PyTorch teacher (.pt/.pth/.th state_dict) into a cpsc-jax model checkpoint.

    cpsc-convert-teacher --arch resnet34 --num-classes 100 \
        --input cifar100_resnet34.pth --output teachers/cifar100_resnet34 --dataset cifar100

The output directory is what `--config.teacher.checkpoint=DIR` takes. The checkpoint may be a raw
state_dict or a dict holding one under 'state_dict' / 'model_state_dict' (CMI/Fast style);
`module.` prefixes are stripped. It is read with torch.load(weights_only=True): no pickled code
runs. A PyTorch checkpoint does not record its input normalisation: give --dataset or
--mean/--std (LeNet teachers default to MNIST).
"""
import argparse
import os
import sys

from cpsc_jax.teachers.convert import DATASETS, convert_teacher
from cpsc_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", required=True, help="registered model name, e.g. resnet34, wrn_40_2")
    p.add_argument("--num-classes", required=True, type=int)
    p.add_argument("--input", required=True, help="PyTorch checkpoint (.pt/.pth/.th)")
    p.add_argument("--output", required=True, help="directory to write the model checkpoint to")
    p.add_argument("--dataset", choices=sorted(DATASETS),
                   help="sets mean/std (and image size: 64 for tiny_imagenet) to its constants")
    p.add_argument("--mean", help="comma-separated per-channel mean (overrides --dataset)")
    p.add_argument("--std", help="comma-separated per-channel std (overrides --dataset)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default 32)")
    p.add_argument("--channels", type=int, help="input channels (default 1 for lenet*, else 3)")
    args = p.parse_args(argv)
    try:
        spec, variables = convert_teacher(args.input, args.output, args.arch, args.num_classes,
                                          mean=args.mean, std=args.std,
                                          image_size=args.image_size, channels=args.channels,
                                          dataset=args.dataset)
    except (UserError, OSError, ImportError) as e:
        print(f"convert_teacher: error: {e}", file=sys.stderr)
        return 1
    n = sum(int(a.size) for c in variables.values() for a in _leaves(c))
    print(f"wrote {os.path.abspath(args.output)}: {spec.arch}, {spec.num_classes} classes, "
          f"{n:,} values, input {spec.image_size}x{spec.image_size}x{spec.channels}, "
          f"mean {list(spec.mean)}, std {list(spec.std)}")
    return 0


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


if __name__ == "__main__":
    sys.exit(main())
