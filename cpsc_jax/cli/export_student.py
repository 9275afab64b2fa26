"""Export a cpsc-jax model checkpoint (e.g. a distilled student) as a PyTorch state_dict.

    cpsc-export-student --checkpoint W/student --output student.pt

Writes torch tensors under the PyTorch key names and layouts of the reference networks
(`num_batches_tracked` added as 0, so `model.load_state_dict(sd, strict=True)` works), and a side
JSON (default: OUTPUT with .json) with the architecture and the input mean/std the network expects.
"""
import argparse
import os
import sys

from cpsc_jax.teachers.convert import export_student
from cpsc_jax.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory (model.json)")
    p.add_argument("--output", required=True, help="PyTorch file to write, e.g. student.pt")
    p.add_argument("--meta-json", default="auto",
                   help="side JSON with arch/mean/std (default: OUTPUT with .json; 'none' to skip)")
    p.add_argument("--no-num-batches-tracked", action="store_true",
                   help="leave out BatchNorm num_batches_tracked entries")
    args = p.parse_args(argv)
    meta = None if args.meta_json.lower() == "none" else args.meta_json
    try:
        spec, arrays = export_student(args.checkpoint, args.output, meta_json=meta,
                                      num_batches_tracked=not args.no_num_batches_tracked)
    except (UserError, OSError, ImportError) as e:
        print(f"export_student: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(args.output)}: {spec.arch}, {spec.num_classes} classes, "
          f"{len(arrays)} tensors, mean {list(spec.mean)}, std {list(spec.std)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
