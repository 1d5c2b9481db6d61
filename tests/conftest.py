"""Shared pytest setup. Kept minimal on purpose."""

import os
import subprocess
import sys
import tempfile

# Tests never reach the network: transformers models are built from local configs only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tests compile many small programs and run each a few times: XLA's CPU backend without its
# LLVM optimisation passes compiles them in about half the time, and its loop emitters with
# the code generated in one piece (not split over threads: the cores are busy with other tests)
# compile the smoke train step in 2.1 s instead of 3.5 s (BENCHMARKS.md, "The test suite").
# The numbers are the same IEEE arithmetic, no fast-math either way; two programs that fuse the
# same computation differently may round differently (in XLA's default CPU emitters too).
# Subprocesses (train.py, eval.py, ...) inherit the flags.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_FASTER_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"


def _xla_accepts(flags: str) -> bool:
  """Whether this jaxlib's XLA knows `flags` (an unknown flag aborts the process that starts
  a backend): asked once per session, in a subprocess; its worker processes inherit the answer."""
  if "SEGVIT_TEST_XLA_FLAGS" not in os.environ:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    ok = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                        capture_output=True).returncode == 0
    os.environ["SEGVIT_TEST_XLA_FLAGS"] = flags if ok else ""
  return os.environ["SEGVIT_TEST_XLA_FLAGS"] == flags


_FLAGS = (f"{_FAST_COMPILE} {_FASTER_COMPILE}" if _xla_accepts(_FASTER_COMPILE) else
          _FAST_COMPILE)
if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()

import jax  # noqa: E402  (after the environment is set)

# Many tests build the same small train step; a persistent compilation cache shared by the
# session compiles each program once (about halves the suite's time on 2 CPU cores).
# The command-line tools the tests start (their --compilation_cache default) share it.
_CACHE = os.environ.get("SEGVIT_TEST_JAX_CACHE",
                        os.path.join(tempfile.gettempdir(), "segvit_jax_test_cache"))
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import gc  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402
from flax.core import meta as flax_meta  # noqa: E402
from flax.core import scope as flax_scope  # noqa: E402


def _skip_flax_apply_shape_check() -> None:
  """In this process (not the tools the tests start), `model.apply` no longer re-traces every
  parameter's initializer under `jax.eval_shape` to check the given parameter's shape against
  it (flax's `Scope.param`, once per parameter per trace): about a fifth of the time of the
  abstract-shape tests (test_flops: 98-111 s -> 78-86 s; BENCHMARKS.md, "The test suite").
  The check only raises; no value changes. The project does not rely on it: loading weights
  checks every shape itself (bundle.py names each mis-shaped key; orbax restores against the
  abstract state), and the tests of those messages run with the patch. Where flax's
  `Scope.param` is not the one this was written against, nothing is patched."""
  original = flax_scope.Scope.param
  if list(inspect.signature(original).parameters) != [
      "self", "name", "init_fn", "init_args", "unbox", "init_kwargs"]:
    return

  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if not self.has_variable("params", name):  # init: flax's own path
      return original(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    self.reserve(name, "params")
    value = self.get_variable("params", name)
    return flax_meta.unbox(value) if unbox else value

  flax_scope.Scope.param = param


_skip_flax_apply_shape_check()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled programs and traced functions when the module ends: the
  in-process caches otherwise grow through the whole session (over 10 GB by its end, which the
  24 GiB CI machine could not hold). Later modules read what they share from the persistent
  cache above."""
  yield
  jax.clear_caches()
  gc.collect()


# The longest files (cold, on the 2-core machine: BENCHMARKS.md, "The test suite"), longest
# first. `make test` hands each pytest-xdist worker a whole file at a time in collection order
# (--no-loadscope-reorder), so these start first and the short files fill in at the end: a long
# file started last would leave the other core idle while it runs.
_LONGEST_FIRST = (
    "tests/test_cli.py", "tests/test_export.py", "tests/test_sharding.py",
    "tests/test_benchmarks.py", "tests/convert/test_segformer.py", "tests/faults/test_steps.py",
    "tests/models/test_segformer_vs_hf.py", "tests/test_flops.py",
    "tests/evaluation/test_one_path.py", "tests/test_configs.py", "tests/models/test_scan.py",
    "tests/test_scale.py", "tests/models/test_shrunk.py", "tests/test_train.py",
    "tests/test_eomt_train.py", "tests/test_panoptic_train.py", "tests/test_segformer_train.py")


def pytest_collection_modifyitems(config, items):
  root = str(config.rootpath)
  missing = [p for p in _LONGEST_FIRST if not os.path.exists(os.path.join(root, p))]
  if missing:  # a renamed file would silently lose its place
    raise pytest.UsageError(f"tests/conftest.py _LONGEST_FIRST names no file at {missing}")
  rank = {path: i for i, path in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
