"""Process start-up and the command line (`segvit_jax.runtime`): the multi-process decision,
the compilation cache, the library log filter, flag parsing and `run`'s exit statuses, one-line
errors and `--help` lines. (Every entry point's --help end to end: tests/test_cli.py.)"""

import logging as py_logging
import re
import types

import jax
import ml_collections
import pytest
from absl import app, flags, logging

from segvit_jax import runtime

# ----------------------------------------------------------------------------------------------
# Multi-process start-up.

NO_FLAGS = {"coordinator_address": None, "num_processes": None, "process_id": None}


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"HOME": "/root"}, None),
    # GKE multi-host TPU slice: jax reads the hosts and the worker id itself.
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"}, {}),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, None),  # one host
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080", "MEGASCALE_NUM_SLICES": "2"}, {}),
    # SLURM: an srun task of several; a one-task job or a bare salloc shell is one process.
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_JOB_ID": "7"}, {}),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, None),
    ({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}, None),
])
def test_distributed_args_from_environment(environ, expected):
  assert runtime.distributed_args(NO_FLAGS, environ) == expected


def test_distributed_args_explicit_flags_win():
  flags = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
  slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
  assert runtime.distributed_args(flags, slurm) == flags
  assert runtime.distributed_args(flags, {}) == flags


@pytest.mark.parametrize("flags, message", [
    ({"coordinator_address": "h:1"},
     "--coordinator_address given without --num_processes, --process_id"),
    ({"num_processes": 2, "process_id": 1},
     "--num_processes, --process_id given without --coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     "--process_id=2 is not in [0, --num_processes=2)"),
])
def test_distributed_args_errors(flags, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    runtime.distributed_args({**NO_FLAGS, **flags}, {})


def holders(**values):
  return runtime.DistributedFlags(*(types.SimpleNamespace(value=values.get(name))
                                    for name in runtime.DistributedFlags._fields))


def test_initialize_distributed_single_process_and_flag_errors():
  verbosity = logging.get_verbosity()
  try:
    logging.set_verbosity(logging.WARNING)
    assert runtime.initialize_distributed(holders(), {}) is False
    assert logging.get_verbosity() == logging.INFO  # process 0 logs INFO
    logging.set_verbosity(logging.DEBUG)
    assert runtime.initialize_distributed(holders(), {}) is False
    assert logging.get_verbosity() == logging.DEBUG  # a higher --verbosity stays
  finally:
    logging.set_verbosity(verbosity)
  with pytest.raises(SystemExit, match=re.escape(
      "error: --coordinator_address given without --num_processes, --process_id")):
    runtime.initialize_distributed(holders(coordinator_address="h:1"), {})


def test_wait_for_all_processes_returns_at_once_in_one_process():
  assert jax.process_count() == 1
  runtime.wait_for_all_processes("test", timeout_s=0)


# ----------------------------------------------------------------------------------------------
# Compilation cache, logs.

def test_compilation_cache_setting(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
  assert runtime.default_compilation_cache() == str(tmp_path / "env")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert runtime.default_compilation_cache() == runtime.DEFAULT_COMPILATION_CACHE
  before = jax.config.jax_compilation_cache_dir
  try:
    runtime.enable_compilation_cache("")  # off: nothing changes
    assert jax.config.jax_compilation_cache_dir == before
    runtime.enable_compilation_cache(str(tmp_path / "cache"))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def record(level, path):
  return py_logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_quiet_library_logs_drops_library_info_only():
  handler = logging.get_absl_handler()
  runtime.quiet_library_logs()
  runtime.quiet_library_logs()  # once per process
  filters = [f for f in handler.filters if isinstance(f, runtime.LibraryFilter)]
  assert len(filters) == 1
  keep = filters[0].filter
  assert not keep(record(py_logging.INFO, "/site-packages/orbax/checkpoint/x.py"))
  assert not keep(record(py_logging.INFO, "/site-packages/grain/_src/y.py"))
  assert keep(record(py_logging.WARNING, "/site-packages/orbax/checkpoint/x.py"))
  assert keep(record(py_logging.INFO, "/repo/segvit_jax/trainer.py"))


# ----------------------------------------------------------------------------------------------
# Flags.

def test_unknown_override_names_the_key_and_the_keys_there():
  config = ml_collections.ConfigDict({"optim": {"lr": 1.0, "warmup_steps": 0}, "seed": 0})
  assert runtime.unknown_override(config, ["--config.optim.lr=2", "--config.seed=1"]) is None
  assert runtime.unknown_override(config, ["--config.optim.learning_rate=1"]) == (
      "unknown config key 'optim.learning_rate' in '--config.optim.learning_rate=1': optim has "
      "no 'learning_rate'; known keys there: lr, warmup_steps")
  assert runtime.unknown_override(config, ["--x", "--config.batch=8"]) == (
      "unknown config key 'batch' in '--config.batch=8': the top level has no 'batch'; known "
      "keys there: optim, seed")
  assert runtime.unknown_override(config, ["--config.seed.x=1"]) == (
      "unknown config key 'seed.x' in '--config.seed.x=1': seed has no 'x'")


def define_test_flags():
  flags.DEFINE_integer("runtime_test_value", 3, "The exit status main returns.")
  flags.DEFINE_alias("runtime-test-value", "runtime_test_value")
  flags.DEFINE_string("runtime_test_raise", "", "An exception for main to raise.")
  flags.DEFINE_bool("runtime_test_flag", False, "A boolean.")
  flags.DEFINE_list("runtime_test_list", ["a", "b"], "A list.")
  flags.DEFINE_string("runtime_test_required", None, "Needed   by\n  nothing.")


def main(argv):
  errors = {"missing": FileNotFoundError("/nowhere/x not found"),
            "usage": app.UsageError("give --runtime_test_value"),
            "bug": TypeError("a bug keeps its traceback")}
  if flags.FLAGS.runtime_test_raise:
    raise errors[flags.FLAGS.runtime_test_raise]
  runtime.no_arguments(argv)
  return flags.FLAGS.runtime_test_value


def run(argv):
  return runtime.run(main, argv, define_flags=define_test_flags)


def test_run_returns_main_status_and_reparses_from_the_defaults(capsys):
  assert run(["--runtime_test_value=5"]) == 5
  assert run(["--runtime-test-value", "7"]) == 7  # the alias
  assert run([]) == 3  # not 7: every run starts from the defaults
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, line", [
    (["--runtime_test_raise=missing"], "error: FileNotFoundError: /nowhere/x not found"),
    (["--runtime_test_raise=usage"], "error: give --runtime_test_value"),
    (["extra"], "error: unexpected arguments: extra"),
    (["--runtime_test_value=x"], "error: flag --runtime_test_value=x: invalid literal for int() "
                                 "with base 10: 'x'"),
    (["--runtime_test_valu=1"], "error: Unknown command line flag 'runtime_test_valu'. Did you "
                                "mean: runtime_test_value ?"),
])
def test_run_reports_a_users_mistake_in_one_line(capsys, argv, line):
  assert run(argv) == 1
  out = capsys.readouterr()
  assert out.err == line + "\n" and out.out == ""


def test_run_lets_other_errors_raise():
  with pytest.raises(TypeError, match="a bug keeps its traceback"):
    run(["--runtime_test_raise=bug"])


def test_help_lists_own_flags_one_line_each_and_exits_0(capsys):
  for arg in runtime.HELP_ARGS:
    assert run(["--runtime_test_value=x", arg]) == 0  # before parsing: no flag error
    text = capsys.readouterr().out
    assert text.startswith(__doc__.strip("\n")), text
    lines = [line for line in text.splitlines() if line.startswith("  --")]
    assert lines == [
        "  --runtime_test_value (alias --runtime-test-value): The exit status main returns. "
        "(default: 3)",
        "  --runtime_test_raise: An exception for main to raise. (default: '')",
        "  --[no]runtime_test_flag: A boolean. (default: false)",
        "  --runtime_test_list: A list. (default: a,b)",
        "  --runtime_test_required: Needed by nothing.",
    ]
  flags.mark_flag_as_required("runtime_test_required")
  try:
    assert run(["-h"]) == 0
    assert "  --runtime_test_required: Needed by nothing. (required)\n" in capsys.readouterr().out
  finally:
    flags.FLAGS["runtime_test_required"].validators.clear()


def test_exit_status():
  assert runtime.exit_status(None) == 0 and runtime.exit_status(3) == 3
  assert runtime.exit_status("error: x") == 1


def define_other_tool_flags():
  flags.DEFINE_integer("runtime_test_value", 30, "Another tool's flag of the same name.")
  flags.DEFINE_alias("runtime-test-value", "runtime_test_value")


def test_tools_whose_flags_share_names_run_one_after_another_in_one_process(capsys):
  """Each tool defines its flags when it runs (convert and export both have --overwrite): the
  one that ran before gives its flags up instead of a DuplicateFlagError."""
  def other():
    return runtime.run(lambda argv: flags.FLAGS.runtime_test_value, ["--runtime-test-value=4"],
                       define_flags=define_other_tool_flags)

  assert run([]) == 3
  assert other() == 4
  assert runtime.run(lambda argv: flags.FLAGS.runtime_test_value, [],
                     define_flags=define_other_tool_flags) == 30
  assert run([]) == 3 and run(["--runtime_test_flag"]) == 3  # its own flags are back
  assert capsys.readouterr().err == ""


def test_release_frames_waits_for_grains_shared_memory_to_be_unlinked(monkeypatch):
  """grain unlinks its worker processes' shared memory in a thread; exiting before that thread
  ran left "There appear to be 1 leaked shared_memory objects" on stderr (CI, a bad example
  read by worker processes)."""
  import time

  import numpy as np
  from grain._src.python.ipc import shared_memory_array as shm_lib

  array_type = shm_lib.SharedMemoryArray
  slow = array_type.close_shm_async.__func__

  def close_slowly(cls, shm, unlink):
    time.sleep(0.3)
    slow(cls, shm, unlink)

  monkeypatch.setattr(array_type, "close_shm_async", classmethod(close_slowly))
  array_type.enable_async_del(1)

  def fail():
    batch = array_type((4, 4), np.float32)
    batch.unlink_on_del()
    raise ValueError(f"a bad example in {batch.shm.name}")

  with pytest.raises(ValueError) as info:
    fail()
  name = str(info.value).rsplit(" ", 1)[1]
  runtime.release_frames(info.value)
  with pytest.raises(FileNotFoundError):
    shm_lib.shared_memory.SharedMemory(name)
