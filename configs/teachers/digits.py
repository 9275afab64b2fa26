"""Teacher of the embedded default (scikit-learn digits, 8x8): exactly `configs/digits.py`'s
`teacher.training`, as a stand-alone teacher config.

    python scripts/train_teacher.py --config configs/teachers/digits.py --workdir workdirs/digits
"""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "digits.py")
    spec = importlib.util.spec_from_file_location("_cpsc_digits_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().teacher.training
