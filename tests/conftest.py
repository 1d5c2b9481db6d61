"""Shared pytest setup. Kept minimal on purpose."""

import os
import tempfile

# Tests never reach the network: transformers models are built from local configs only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Tests compile many small programs and run each a few times: XLA's CPU backend without its
# LLVM optimisation passes compiles them in about half the time (the numbers are the same
# IEEE arithmetic: no fast-math either way). Subprocesses (train.py, eval.py, ...) inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

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
