"""Process start-up and the command line, shared by every entry point: train.py, eval.py,
predict.py and the `python -m segvit_jax.X` tools.

One command-line style (absl flags):
  - underscore names, the same name for the same thing in every tool: --config, --workdir,
    --checkpoint, --output, --step, --split, --num_vis, --compilation_cache; an older dash
    spelling (--num-vis, --save-scores, ...) stays as an alias of its flag;
  - `--help` / `-h` prints the tool's docstring and its own flags (those of its module and the
    shared ones below that it defines), one line each, and exits 0; `--helpfull` lists every
    library's flags too (absl, jax, grain, orbax);
  - a user's mistake (a missing file, a bad value, an unknown `--config.key`, a config file
    that does not load) prints one line, `error: ...`, on stderr and exits 1; `--verbosity=1`
    also logs its traceback, and so does the environment variable SEGVIT_JAX_TRACEBACK=1
    (also for a mistake found while the flags are parsed, before --verbosity is known).

`run(main)` does all of that, then starts the process: `jax.distributed.initialize` when the
tool defined the distributed flags and this is one process of several (before anything else
touches jax), jax's persistent compilation cache when it defined --compilation_cache, and the
library log filter (`quiet_library_logs`). Config files load through `config_utils`.
"""

from __future__ import annotations

import importlib.util
import gc
import itertools
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging

from segvit_jax import config_utils

FLAGS = flags.FLAGS

# ---------------------------------------------------------------------------------------------
# Several processes (hosts).


class DistributedFlags(NamedTuple):
  coordinator_address: flags.FlagHolder
  num_processes: flags.FlagHolder
  process_id: flags.FlagHolder


_DISTRIBUTED: DistributedFlags | None = None  # this process's, once defined


def define_distributed_flags() -> DistributedFlags:
  """--coordinator_address / --num_processes / --process_id (train.py, eval.py); `run` then
  initialises jax.distributed from them (`initialize_distributed`)."""
  global _DISTRIBUTED
  _DISTRIBUTED = DistributedFlags(
      flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0, for a multi-process run that "
          "jax does not detect by itself (with --num_processes and --process_id)."),
      flags.DEFINE_integer("num_processes", None, "Processes in the run."),
      flags.DEFINE_integer("process_id", None, "This process's index, 0-based."),
  )
  return _DISTRIBUTED


def distributed_args(flag_values: Mapping[str, Any], environ: Mapping[str, str]
                     ) -> dict[str, Any] | None:
  """Keyword arguments for `jax.distributed.initialize`, or None for a single process.

  `flag_values`: `coordinator_address`, `num_processes`, `process_id` (None when not given).
  In this order:
    1. Explicit: any of the three flags given -> all three are required, and passed on
       (bare multi-host GPU, or a launcher jax does not know).
    2. Automatic, `{}` (jax's cluster detection fills in everything) when `environ` says this
       is one process of several:
       - a multi-host TPU slice on GKE: `TPU_WORKER_HOSTNAMES` (or `TPU_PROCESS_ADDRESSES`)
         lists more than one host;
       - a TPU multislice: `MEGASCALE_COORDINATOR_ADDRESS` is set;
       - SLURM: `SLURM_NTASKS` > 1 and `SLURM_PROCID` set (an `srun` task; a bare `salloc`
         shell has no SLURM_PROCID). jax reads the coordinator from SLURM_STEP_NODELIST.
    3. Otherwise None: one process. A Cloud TPU VM pod slice started with
       `gcloud ... ssh --worker=all` needs no call (the TPU runtime forms the slice from the
       VM metadata); pass the flags there to force one.
  """
  explicit = {k: flag_values.get(k) for k in DistributedFlags._fields}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given:
    missing = sorted(set(explicit) - set(given))
    if missing:
      raise ValueError(f"--{', --'.join(sorted(given))} given without --{', --'.join(missing)}: "
                       "a multi-process run needs all of --coordinator_address, "
                       "--num_processes and --process_id")
    if not 0 <= explicit["process_id"] < explicit["num_processes"]:
      raise ValueError(f"--process_id={explicit['process_id']} is not in "
                       f"[0, --num_processes={explicit['num_processes']})")
    return explicit
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return {}
  if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}
  try:
    slurm_tasks = int(environ.get("SLURM_NTASKS", "1"))
  except ValueError:
    slurm_tasks = 1
  if slurm_tasks > 1 and "SLURM_PROCID" in environ:
    return {}
  return None


def initialize_distributed(flag_holders: DistributedFlags, environ: Mapping[str, str]) -> bool:
  """Calls `jax.distributed.initialize` when `distributed_args` says this is one process of
  several (before anything else touches jax); exits with the reason on inconsistent flags.
  Then logs at INFO (or the --verbosity asked for) on process 0 and at WARNING on the others.
  Returns whether it initialised."""
  values = {name: holder.value for name, holder in zip(DistributedFlags._fields, flag_holders)}
  try:
    args = distributed_args(values, environ)
  except ValueError as e:
    sys.exit(f"error: {e}")
  if args is not None:
    jax.distributed.initialize(**args)
  logging.set_verbosity(max(logging.get_verbosity(), logging.INFO) if jax.process_index() == 0
                        else logging.WARNING)
  if args is None:
    return False
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


_BARRIER_IDS = itertools.count()


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
  """Blocks until every process gets here: a barrier of the coordination service, not a device
  collective. CPU collectives (gloo) fail when one process reaches its first collective 30 s
  after another, and compiling or process 0's set-up can take that much longer on one host.
  Returns at once in a single process, or without a distributed client (a TPU slice that the
  runtime set up without `jax.distributed.initialize`, where no such limit applies)."""
  if jax.process_count() == 1:
    return
  try:
    sync = ocp.multihost.get_barrier_sync_fn()
  except ValueError:  # no distributed client
    return
  sync(key=f"segvit_{name}_{next(_BARRIER_IDS)}", timeout_ms=timeout_s * 1000)


# ---------------------------------------------------------------------------------------------
# The persistent compilation cache.

DEFAULT_COMPILATION_CACHE = "~/.cache/segvit_jax/xla"
_CACHE: flags.FlagHolder | None = None  # this process's --compilation_cache, once defined


def default_compilation_cache() -> str:
  """$JAX_COMPILATION_CACHE_DIR if set, else DEFAULT_COMPILATION_CACHE."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE)


def define_compilation_cache_flag() -> flags.FlagHolder:
  """--compilation_cache (train.py, eval.py, predict.py); `run` then points jax's cache at it."""
  global _CACHE
  _CACHE = flags.DEFINE_string(
      "compilation_cache", default_compilation_cache(),
      "Directory of jax's persistent compilation cache: a rerun with the same shapes (a resumed "
      "training run, eval of each checkpoint) loads its programs instead of compiling them. "
      "'' turns it off; $JAX_COMPILATION_CACHE_DIR, when set, is the default.")
  return _CACHE


def enable_compilation_cache(path: str | None) -> None:
  """Points jax's persistent compilation cache at `path` (programs that took >= 1 s to
  compile are kept); None or '' leaves it off."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


# ---------------------------------------------------------------------------------------------
# Logs.

# jax tries every backend it knows when it starts; without libtpu (any CPU or GPU machine) the
# TPU attempt fails and jax logs it at INFO: "Unable to initialize backend 'tpu': ... Failed to
# open libtpu.so ...". Not a problem, so not shown. A TPU machine (libtpu installed) keeps the
# line: there it is the reason the TPU is not used. A backend asked for (JAX_PLATFORMS) that
# fails raises instead, and other backends' lines (a CUDA that does not start) are kept.
_JAX_BACKENDS_LOGGER = "jax._src.xla_bridge"
_NO_TPU_LINE = "Unable to initialize backend 'tpu'"


def libtpu_installed() -> bool:
  """Whether the TPU runtime (the `libtpu` package, what `jax[tpu]` installs) is present."""
  return importlib.util.find_spec("libtpu") is not None


class LibraryFilter(py_logging.Filter):
  """Drops the INFO (and DEBUG) records of `libraries` (files under a `/{library}/` folder:
  orbax logs through absl, whose records carry the caller's file), and jax's "Unable to
  initialize backend 'tpu'" line where no libtpu is installed. Warnings and errors pass."""

  def __init__(self, libraries: tuple[str, ...], hide_tpu_line: bool = True):
    super().__init__()
    self.libraries = libraries
    self.hide_tpu_line = hide_tpu_line

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    if (self.hide_tpu_line and record.name == _JAX_BACKENDS_LOGGER
        and str(record.msg).startswith(_NO_TPU_LINE)):
      return False
    path = (record.pathname or "").replace("\\", "/")
    return not any(f"/{lib}/" in path for lib in self.libraries)


def quiet_library_logs(libraries: tuple[str, ...] = ("orbax", "grain")) -> None:
  """Keeps warnings but drops the INFO chatter of `libraries` (orbax logs every save and
  restore) and, without libtpu, jax's failed TPU attempt (`LibraryFilter`). Once per process:
  a second call adds nothing. `start` calls it first, before anything initialises jax's
  backends."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, LibraryFilter) for f in handler.filters):
    handler.addFilter(LibraryFilter(libraries, hide_tpu_line=not libtpu_installed()))


# ---------------------------------------------------------------------------------------------
# Flag parsing.

def unknown_override(config: ml_collections.ConfigDict, argv: Sequence[str],
                     flag: str = "config") -> str | None:
  """A message for the first `--{flag}.a.b=v` in argv whose key path is not in `config`."""
  prefix = f"--{flag}."
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    key = arg[len(prefix):].split("=", 1)[0]
    node = config
    for i, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(key.split(".")[:i]) or "the top level"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f"unknown config key {key!r} in {arg!r}: {where} has no {part!r}"
                + (f"; known keys there: {', '.join(known)}" if known else ""))
      node = node[part]
  return None


# How ml_collections' config flag wraps a TypeError / ValueError of a config file: the
# message holds the whole traceback, whose last line is the error.
_CONFIG_FILE_ERROR = "Error whilst parsing config file"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser with one-line errors: an unknown `--config.key=value` override names
  the key and the keys there; any other flag error is absl's message."""
  try:
    remaining = FLAGS(argv)
    missing_config_file(argv)
    return remaining
  except (AttributeError, KeyError, flags.Error) as e:
    spec = config_spec(argv)
    message = None
    if spec:
      try:
        message = unknown_override(config_utils.load_config(spec), argv)
      except Exception:  # pylint: disable=broad-except  (absl's message says what is wrong)
        message = None
    text = str(e).strip()
    if _CONFIG_FILE_ERROR in text:  # ml_collections' wrapper of get_config's own error
      if traceback_wanted():
        print(text, file=sys.stderr)  # the traceback is in the message
      sys.exit(f"error: cannot load config file {spec}: {text.splitlines()[-1].strip()}")
    show_traceback()
    sys.exit(f"error: {message or text}")
  except Exception as e:  # pylint: disable=broad-except  (a config file's own error)
    # Flag parsing runs no code but the --config file's: its SyntaxError, NameError or the
    # ValueError of its get_config(arg).
    show_traceback()
    spec = config_spec(argv)
    where = f"config file {spec}" if spec else "the command line"
    sys.exit(f"error: cannot load {where}: {type(e).__name__}: {e}")


def missing_config_file(argv: Sequence[str]) -> None:
  """Exits with one line when a config flag's file could not be read: ml_collections keeps
  that error (an OSError listing the paths it tried) until the config is first used, where it
  would come out as a traceback."""
  for name in FLAGS:
    value = FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":  # ml_collections' stand-in for such a config
      error = object.__getattribute__(value, "_error")
      lines = [line.strip() for line in str(error).splitlines() if line.strip()]
      sys.exit(f"error: cannot load config file {FLAGS[name].serialize()}: "
               f"{lines[-1] if lines else error}")


def config_spec(argv: Sequence[str]) -> str | None:
  """The value of --config in argv (configs/X.py[:ARG]), or None."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  return spec


# Set to 1 to see the traceback of a user's error (also of one while the flags are parsed,
# before --verbosity=1 is known).
TRACEBACK_ENV = "SEGVIT_JAX_TRACEBACK"


def traceback_wanted() -> bool:
  return os.environ.get(TRACEBACK_ENV, "").lower() not in ("", "0", "false", "no")


def show_traceback() -> None:
  """Prints the traceback of the exception being handled to stderr when $SEGVIT_JAX_TRACEBACK
  asks for it."""
  if traceback_wanted():
    traceback.print_exc()


# ---------------------------------------------------------------------------------------------
# --help: the entry point's own flags, one line each.

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "-helpshort", "-?")
_ALIAS_HELP = re.compile(r"Alias for --(\S+)\.")
_REQUIRED_HELP = "must have a value other than None"  # absl's mark_flag_as_required message


def module_name(main: Callable) -> str:
  """The name absl files `main`'s module's flags under (the script path for __main__)."""
  return sys.argv[0] if main.__module__ == "__main__" else main.__module__


def own_flags(module: str) -> list[flags.Flag]:
  """The flags `module` defined, then the shared ones of this module that the entry point
  defined (distributed, compilation cache), in definition order; aliases excluded."""
  by_module = FLAGS.flags_by_module_dict()
  out = []
  for flag in [*by_module.get(module, []), *by_module.get(__name__, [])]:
    if flag not in out and not _ALIAS_HELP.fullmatch(flag.help or ""):
      out.append(flag)
  return out


def _default_text(flag: flags.Flag) -> str:
  if any(_REQUIRED_HELP in getattr(v, "message", "") for v in flag.validators):
    return " (required)"
  value = flag.default
  if value is None:
    return ""
  if isinstance(value, bool):
    value = "true" if value else "false"
  elif isinstance(value, str):
    value = repr(value)
  elif isinstance(value, (list, tuple)):
    value = ",".join(map(str, value))
  return f" (default: {value})"


def flag_line(flag: flags.Flag, aliases: Sequence[str] = ()) -> str:
  """`--name: help (default: value)` on one line; `--[no]name` for booleans."""
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  if aliases:
    name += " (alias " + ", ".join(f"--{a}" for a in aliases) + ")"
  text = " ".join((flag.help or "").split())
  return f"  {name}: {text}{_default_text(flag)}"


def help_text(module: str, epilog: str = "") -> str:
  """The module docstring of the entry point, `epilog` (e.g. a table the tool derives from its
  data), and one line per flag of `own_flags(module)`."""
  doc = sys.modules["__main__" if module == sys.argv[0] else module].__doc__ or ""
  aliases: dict[str, list[str]] = {}
  for flag in FLAGS.flags_by_module_dict().get(module, []):
    if m := _ALIAS_HELP.fullmatch(flag.help or ""):
      aliases.setdefault(m.group(1), []).append(flag.name)
  lines = [flag_line(f, aliases.get(f.name, ())) for f in own_flags(module)]
  doc = doc.strip("\n") + (f"\n\n{epilog.strip()}" if epilog else "")
  return (doc + "\n\nflags:\n" + "\n".join(lines) + "\n\n"
          "--helpfull also lists the libraries' flags; errors print one line, "
          f"--verbosity=1 (or {TRACEBACK_ENV}=1) adds their traceback.")


# ---------------------------------------------------------------------------------------------
# Running an entry point.

# A user's mistake: one line, no traceback. (The project raises these with messages that say
# what to fix; `--verbosity=1` logs the traceback too.)
USER_ERRORS = (app.UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               ValueError)
# The tool whose flags `run` defined last (`define_flags`'s name) and the flag names it defined.
_TOOL_FLAGS: dict[str, Any] = {"tool": None, "names": ()}


def error_line(e: BaseException) -> str:
  """`error: MESSAGE` for a usage error, `error: TYPE: MESSAGE` for an exception."""
  if isinstance(e, app.UsageError):
    return f"error: {e}"
  return f"error: {type(e).__name__}: {e}"


def exit_status(code: Any) -> int:
  """`SystemExit.code` as an exit status; a message (str) goes to stderr, status 1."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def no_arguments(argv: Sequence[str]) -> None:
  """For a `main` that takes flags only: a usage error naming any other argument."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def refuse_overwrite(path: str, overwrite: bool, flag: str = "--overwrite") -> None:
  """For a tool that writes `path` (a bundle, a checkpoint file or directory): a usage error
  naming it when something is there already (a file, or a directory that is not empty) and
  `overwrite` is off, so that a trained result is never replaced by a slip of the command
  line."""
  if overwrite or not os.path.lexists(path):
    return
  if os.path.isdir(path) and not os.listdir(path):
    return
  what = "a directory" if os.path.isdir(path) else "a file"
  if os.path.isfile(os.path.join(path, "config.json")):
    what = "a directory with a config.json (a bundle or a training workdir)"
  raise app.UsageError(f"{os.path.abspath(path)} exists ({what}): pass {flag} to replace it")


def start() -> None:
  """What every process does before its work: jax.distributed (when the entry point defined
  the distributed flags), the compilation cache (when it defined --compilation_cache), the
  library log filter. The filter comes first: `initialize_distributed` starts jax's backends,
  which logs the failed TPU attempt of a CPU / GPU machine."""
  quiet_library_logs()
  if _DISTRIBUTED is not None:
    initialize_distributed(_DISTRIBUTED, os.environ)
  if _CACHE is not None:
    enable_compilation_cache(_CACHE.value)


def release_frames(error: BaseException) -> None:
  """Frees what the frames of `error`'s traceback hold, now rather than at interpreter exit:
  a training batch read from grain's worker processes lives in shared memory, and freed only
  at exit it is reported as "leaked shared_memory objects" (and grain's iterators fail in
  `__del__` once the modules are torn down)."""
  traceback.clear_frames(error.__traceback__)
  error.__traceback__ = None
  gc.collect()
  wait_for_shared_memory_release()


def wait_for_shared_memory_release() -> None:
  """Waits until grain has unlinked the shared memory of the arrays freed so far: with worker
  processes it unlinks in a thread of its own (`SharedMemoryArray.enable_async_del`, one thread,
  first in first out), which a process that exits at once leaves undone ("leaked
  shared_memory objects")."""
  module = sys.modules.get("grain._src.python.ipc.shared_memory_array")
  threads = getattr(getattr(module, "SharedMemoryArray", None), "_del_thread_pool", None)
  if threads is not None:
    threads.apply(lambda: None)  # queued after every unlink requested so far


def define_tool_flags(define_flags: Callable[[], Any]) -> None:
  """Has `define_flags` define its tool's flags in the process's flags unless they are there.
  The tool that ran before gives its flags up first, so tools whose flags share names (convert
  and export both have --overwrite) run one after another in one process."""
  tool = f"{define_flags.__module__}.{define_flags.__qualname__}"
  if _TOOL_FLAGS["tool"] == tool:
    return
  for name in _TOOL_FLAGS["names"]:
    if name in FLAGS:
      delattr(FLAGS, name)
  before = set(FLAGS)
  try:
    define_flags()
  except BaseException:  # the next run gives up what a failed definition left
    _TOOL_FLAGS.update(tool=None, names=tuple(set(FLAGS) - before))
    raise
  _TOOL_FLAGS.update(tool=tool, names=tuple(set(FLAGS) - before))


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, *,
        define_flags: Callable[[], Any] | None = None,
        help_epilog: Callable[[], str] | None = None) -> int:
  """Runs an entry point: `main(args)` (absl's: the program name, then the arguments that are
  not flags) with the flags parsed from `argv` (the command line after the program name;
  default sys.argv[1:]), after `start()`. Returns the exit status: main's return value (None:
  0), 0 after --help, 1 after a user's mistake (`USER_ERRORS`, flag errors: one line on
  stderr).

  `define_flags` defines the flags of a module that other modules import (a tool inside the
  package), which must not define them at import; it runs once per process. `help_epilog()`
  adds text to --help after the module docstring."""
  if define_flags is not None:
    define_tool_flags(define_flags)
  args = list(sys.argv[1:] if argv is None else argv)
  before = args[:args.index("--")] if "--" in args else args
  if any(a in HELP_ARGS for a in before):
    print(help_text(module_name(main), help_epilog() if help_epilog else ""))
    return 0
  if "--helpfull" in before:
    app.usage(writeto_stdout=True)
    return 0
  if FLAGS.is_parsed():  # run before in this process: start from the defaults again
    FLAGS.unparse_flags()

  def checked_main(remaining: list[str]) -> int | None:
    start()
    try:
      return main(remaining)
    except USER_ERRORS as e:
      if traceback_wanted():
        traceback.print_exc()
      else:
        logging.debug("traceback of the error below", exc_info=True)
      line = error_line(e)
      release_frames(e)
      sys.exit(line)

  try:
    app.run(checked_main, argv=[sys.argv[0], *args], flags_parser=parse_flags)
  except SystemExit as e:
    return exit_status(e.code)
  return 0
