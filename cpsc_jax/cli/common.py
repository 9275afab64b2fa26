"""What every command shares: configs by name or path, one-line errors, Ctrl-C, several hosts.

`--config NAME[:ARG]` takes a shipped config by name (`cifar10`, `teacher:mnist`, ...: the
package's `cpsc_jax.configs`, the repository's `configs/`) or a path (`configs/cifar10.py`,
`my_config.py:arg`); `--config.FIELD=VALUE` overrides any field. Errors that are the user's to
fix (`cpsc_jax.errors.UserError`, bad flags, missing files) print one line and exit 1; Ctrl-C
stops at the next iteration and says how to resume (exit 130); a second Ctrl-C stops at once.
"""
import os
import signal
import sys
import traceback
import warnings
from typing import Callable, List, Optional, Tuple

from absl import flags, logging

from cpsc_jax.errors import UserError

EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?", "--helpfull", "-helpfull")


def shipped_configs() -> dict:
    """{name: path} of the configs that ship with the package."""
    from cpsc_jax import configs
    folder = os.path.dirname(os.path.abspath(configs.__file__))
    return {f[:-3]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(".py") and not f.startswith("_")}


def resolve_config(value: str) -> str:
    """A `--config` value as ml_collections expects it: PATH[:ARG]."""
    path, sep, arg = value.partition(":")
    if os.path.isfile(path):
        return value
    shipped = shipped_configs()
    stem = os.path.basename(path)
    stem = stem[:-3] if stem.endswith(".py") else stem
    # "cifar10", or the README's "configs/cifar10.py" run from another directory.
    if os.path.dirname(path) in ("", "configs") and stem in shipped:
        return shipped[stem] + sep + arg
    raise UserError(f"--config {value}: no such file, and {path!r} is not a shipped config "
                    f"(shipped: {', '.join(shipped)})")


def _rewrite_config_arg(argv: List[str]) -> Tuple[List[str], str]:
    """argv with its `--config` value resolved (see `resolve_config`), and that value as given."""
    out, given, i = [], "", 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-config") and i + 1 < len(argv):
            given = argv[i + 1]
            out += [a, resolve_config(given)]
            i += 2
            continue
        if a.startswith(("--config=", "-config=")):
            flag, _, given = a.partition("=")
            a = f"{flag}={resolve_config(given)}"
        out.append(a)
        i += 1
    return out, given


def define_distributed_flags(flag_values) -> None:
    flags.DEFINE_string("coordinator_address", "", "Several processes (one per host): HOST:PORT "
                        "of process 0's coordinator.", flag_values=flag_values)
    flags.DEFINE_integer("num_processes", 0, "Several processes: how many in all.",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", -1, "Several processes: this one's index (0 .. N-1).",
                         flag_values=flag_values)
    flags.DEFINE_enum("distributed", "none", ["none", "auto"],
                      "auto: join a multi-process run with JAX's cluster detection (SLURM, Open "
                      "MPI, Cloud TPU pods) instead of the three flags above.",
                      flag_values=flag_values)


def start_distributed(F) -> None:
    from cpsc_jax.infra import runtime
    runtime.initialize_distributed(F.coordinator_address, F.num_processes, F.process_id,
                                   auto=F.distributed == "auto")


class _Interrupts:
    """SIGINT sets a flag the training loops poll (`cpsc_jax.infra.runtime.stop_requested`); a
    second one raises KeyboardInterrupt at once. Unlike Python's default handler nothing is
    raised inside a C callback, where an exception would be swallowed."""

    def __init__(self):
        from cpsc_jax.infra import runtime
        self._runtime = runtime

    def __call__(self, signum, frame):
        if self._runtime.stop_requested():
            raise KeyboardInterrupt
        self._runtime.request_stop(signum)
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        print(f"\n{name}: saving the current state and stopping after this step (Ctrl-C again "
              "to stop at once) ...", file=sys.stderr, flush=True)


# ml_collections loads config files with importlib's load_module(): its deprecation is a note
# to that library's authors, not to a user of these commands.
LIBRARY_WARNINGS = (r"the load_module\(\) method is deprecated",)


def quiet_library_warnings() -> None:
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)


def new_flags() -> flags.FlagValues:
    """A command's own flag set (commands can then run one after another in one process)."""
    return flags.FlagValues()


def define_config_flag(F, help_text: str = "Run config: a shipped name (digits, cifar10, "
                       "teacher:mnist, ...) or a path (configs/cifar10.py)") -> None:
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, help_text, flag_values=F, lock_config=True)


def config_with_preset(config_flag, preset: str):
    """The config of a parsed `--config FILE[:ARG]` flag rebuilt as `--config FILE:preset`
    with the same `--config.*` overrides (ablation rows that name a preset)."""
    import importlib.util
    from ml_collections import config_flags
    path = config_flags.get_config_filename(config_flag).partition(":")[0]
    spec = importlib.util.spec_from_file_location("cpsc_config_for_preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        config = module.get_config(preset)
    except TypeError as e:
        raise UserError(f"{path}: its get_config takes no preset argument, so a grid row "
                        f"cannot name preset {preset!r} ({e})")
    config.update_from_flattened_dict(config_flags.get_override_values(config_flag))
    return config


def main(define: Callable[[flags.FlagValues], None],
         run: Callable[[flags.FlagValues, List[str]], Optional[int]],
         argv: Optional[List[str]] = None,
         workdir_hint: Callable[[flags.FlagValues], str] = lambda F: "",
         required: tuple = ()) -> None:
    """Defines a command's flags on a fresh flag set (so commands can run one after another in
    one process), parses argv (one-line errors), then `sys.exit(run(F, remaining_argv))`."""
    argv = list(sys.argv if argv is None else argv)
    quiet_library_warnings()
    F = new_flags()
    define(F)
    if any(a in HELP_FLAGS for a in argv[1:]):
        sys.exit(print_help(F, sys.modules[run.__module__].__doc__ or "",
                            full=any(a in ("--helpfull", "-helpfull") for a in argv[1:])))
    saved_argv = sys.argv
    given = ""
    try:
        argv, given = _rewrite_config_arg(argv)
        sys.argv = argv   # ml_collections reads the --config.* overrides from sys.argv
        argv = F(argv)
    except UserError as e:
        _fail(e)
    except (AttributeError, KeyError) as e:
        # ml_collections: an override of a field the config does not have ("Did you mean ...").
        text = str(e.args[0] if e.args else e).strip("'\"")
        text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
        _fail(f"unknown config field {text}", prefix="bad flag: ")
    except (flags.Error, TypeError, ValueError, OSError) as e:
        # absl: bad flag values; ml_collections: values of the wrong type, unreadable files, and
        # a get_config that raised, which ml_collections and absl each wrap once more: the
        # exception that get_config raised (e.g. an unknown preset in `--config digits:PRESET`)
        # is at the end of the chain and says what was wrong.
        chain = _exception_chain(e)
        text = (f"--config {given}: {chain[-1]}" if len(chain) > 2 else str(e)).strip()
        _fail(" ".join(text.split()) or type(e).__name__, prefix="bad flag: ")
    finally:
        sys.argv = saved_argv
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    missing = [f"--{name}" for name in required if F[name].value in (None, "")]
    if missing:
        _fail(f"missing {', '.join(missing)} (see --help)")
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    previous = signal.signal(signal.SIGINT, _Interrupts())
    previous_term = signal.signal(signal.SIGTERM, _Interrupts())
    try:
        if "coordinator_address" in F:
            start_distributed(F)
        code = run(F, argv)
    except UserError as e:
        _fail(e)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        _fail(e)
    except KeyboardInterrupt:
        from cpsc_jax.infra import runtime
        where = workdir_hint(F)
        hint = (f"; re-run the same command to continue from what {where} holds (said above)"
                if where else "")
        print(f"interrupted{hint}", file=sys.stderr, flush=True)
        sys.exit(EXIT_TERMINATED if runtime.stop_signal() == signal.SIGTERM else EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    sys.exit(code or 0)


def _exception_chain(e: BaseException) -> List[BaseException]:
    """`e` and the exceptions it was raised from or while handling, outermost first."""
    chain = [e]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def print_help(F: flags.FlagValues, doc: str, full: bool = False) -> int:
    """The command's description and examples (its module docstring) and its flags, as absl's
    own `--help` writes them; `full` adds absl's and ml_collections' own flags."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "command"
    print(doc.strip() + "\n")
    print(f"usage: {name} [--flag=value ...] [--config.FIELD=VALUE ...]\n")
    print("flags:")
    print(F.get_help(include_special_flags=full))
    print("\nEvery field of the config can be overridden: --config.batch_size=64, "
          "--config.loss.alpha=0.1 (dotted names; see cpsc_jax/config/defaults.py).")
    if full:
        print("\nabsl flags:\n" + flags.FLAGS.get_help(include_special_flags=True))
    return 0


def _fail(error, prefix: str = "") -> None:
    if os.environ.get("CPSC_TRACEBACK"):
        traceback.print_exc()
    print(f"error: {prefix}{error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)
