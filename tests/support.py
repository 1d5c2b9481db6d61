"""Helpers the test modules share (test modules never import each other): the repository
root, running the command-line tools as subprocesses, the smoke training config, reading a
run's metrics and checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import common, demo
from segvit_jax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cache_env() -> dict[str, str]:
  """Environment entries that let a subprocess share the suite's compilation cache."""
  return {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run(*args, check=True):
  """`python ARGS...` from the repository root on the CPU; fails with its stderr tail."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **cache_env()}
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        env=env, timeout=600)
  if check and proc.returncode:
    raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def device_env(devices: int) -> dict:
  """Environment of a subprocess with `devices` forced CPU devices."""
  # 8 training processes share the cores: the devices of one may wait for each other inside a
  # collective longer than XLA's default 40 s before it aborts the process.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}",
                                 "--xla_cpu_collective_call_terminate_timeout_seconds=600"]),
          **cache_env(),
          "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(
              os.pathsep)}


def results(procs: list[subprocess.Popen], timeout: float = 420) -> list[dict]:
  """Waits for all `procs`; fails with each failed process's stderr tail. Returns the JSON of
  each one's last `RESULT {...}` stdout line (None without one)."""
  outputs, failures = [], []
  for i, proc in enumerate(procs):
    try:
      stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:  # a stuck collective waits forever: stop the others too
        p.kill()
      stdout, stderr = proc.communicate()
      failures.append(f"worker {i} timed out after {timeout} s:\n{stderr[-3000:]}")
      continue
    if proc.returncode:
      failures.append(f"worker {i} exited with {proc.returncode}:\n{stderr[-3000:]}")
      continue
    line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    outputs.append(json.loads(line[-1][len("RESULT "):]) if line else None)
  if failures:
    raise AssertionError("\n\n".join(failures))
  return outputs


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def dataset_config(**fields):
  """A `config.dataset` section: the skeleton's (configs/common.py, every key with its default)
  with `fields` set, as a config file would give it."""
  c = common.run_config().dataset
  c.update(fields)
  return c


def smoke_config(**overrides):
  """`configs/demo.py:smoke` with dotted-key overrides, e.g. smoke_config(**{"optim.lr": 1})."""
  c = demo.get_config("smoke")
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def flat_params(workdir, step):
  """The parameters of checkpoint `step` of a run, flat {path: array}."""
  params, got = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), step)
  assert got == step
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def tiny_segvit_config(shrunk_patch_size: int = 8) -> str:
  """The source of a config file of a tiny SegViT / SegViT-Shrunk made from the paper's recipe
  (the ViT-B ADE20K configs), as a user would write one: `FILE:atm` / `FILE:shrunk` (the Shrunk
  ViT at patch `shrunk_patch_size`; 4 keeps QD's grid even at sizes like 40 x 56)."""
  return f'''
from configs import segvit_shrunk_vit_b16_ade20k, segvit_vit_b16_ade20k


def get_config(arg="atm"):
  recipe = segvit_shrunk_vit_b16_ade20k if arg == "shrunk" else segvit_vit_b16_ade20k
  c = recipe.get_config()
  c.dataset.name = "synthetic"
  c.dataset.num_classes = c.model.num_classes = 6
  c.model.backbone.update(width=64, depth=4, mlp_dim=128, num_heads=4, posemb_grid=(8, 8),
                          drop_path=0.0)
  if arg == "shrunk":
    c.model.backbone.update(patch_size={shrunk_patch_size}, shrink_idx=2)
    c.model.head.update(tap_layers=(1, 3), width=32, num_heads=4, query_grid=(8, 8),
                        qu_layers=2, atm_layers=2)
  else:
    c.model.backbone.patch_size = 8
    c.model.head.update(tap_layers=(1, 2, 3), width=32, num_heads=4, layers_per_stage=2)
  return c
'''


def max_diff(a, b) -> float:
  """max |a - b| in float64 (NumPy on the host: no program compiled per shape) over arrays or
  pytrees of arrays, after checking the structures and shapes agree."""
  (a, b), (tree_a, tree_b) = zip(*(jax.tree.flatten(t) for t in (a, b)))
  assert tree_a == tree_b, (tree_a, tree_b)
  diff = 0.0
  for x, y in zip(a, b):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape, (x.shape, y.shape)
    diff = max(diff, float(np.max(np.abs(x - y), initial=0.0)))
  return diff


def perturbed(params, scale: float = 0.1, seed: int = 0):
  """`params` + `scale` x N(0, 1) per value (wider than the initialisers', e.g. LayerNorm away
  from 1 / 0), drawn by NumPy on the host: no program compiled per parameter shape."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: (np.asarray(p) + scale * rng.standard_normal(np.shape(p))).astype(p.dtype),
      params)


def convert_cli(*args) -> int:
  """`python -m segvit_jax.convert ARGS...` in this process: its exit status."""
  from segvit_jax.convert import __main__ as cli
  return cli.cli([str(a) for a in args])


def convert_ok(capsys, *args) -> str:
  """`convert_cli(ARGS...)`, which must succeed: what it printed."""
  capsys.readouterr()
  rc = convert_cli(*args)
  out, err = capsys.readouterr()
  assert rc == 0, err
  return out


def normal_images(size: int, seed: int = 0, n: int = 2) -> np.ndarray:
  """`n` float32 (size, size, 3) standard-normal images (already normalised model inputs)."""
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def hf_eomt_outputs(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mask logits, class logits) of a transformers EoMT model (in eval) on NHWC `images`, in
  float64; the model is left in the dtype it had."""
  import torch
  dtype = next(model.parameters()).dtype
  with torch.no_grad():
    out = model.double()(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2).double())
  model.to(dtype)
  return out.masks_queries_logits.numpy(), out.class_queries_logits.numpy()


def eomt_outputs(b, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mask logits, class logits) of our EoMT bundle `b` (a Bundle or its path) at float32
  "highest" matmul precision, in float64."""
  from segvit_jax import bundle
  b = bundle.load_bundle(b) if isinstance(b, str) else b
  with jax.default_matmul_precision("highest"):
    out = jax.jit(b.model.apply)(b.variables, images)
  return (np.asarray(out["mask_logits"], np.float64),
          np.asarray(out["class_logits"], np.float64))
