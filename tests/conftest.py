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

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Frees each module's compiled programs and traced functions when the module ends: the
  in-process caches otherwise grow through the whole session (over 10 GB by its end, which the
  24 GiB CI machine could not hold). Later modules read what they share from the persistent
  cache above."""
  yield
  jax.clear_caches()
  gc.collect()
