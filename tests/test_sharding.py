"""Sharding: mesh resolution, and training on several devices / processes against one device.

The multi-device runs need `--xla_force_host_platform_device_count` before jax is imported, and
pytest has already imported it, so they run in subprocesses (the `_WORKER` script below) that
print their results as JSON. Every run trains the smoke config for 4 steps with batch 8 and the
full learning rate from step 1 (no warmup, so the steps move the parameters); the reference is
the same config on a single CPU device.

Measured differences from the 1-device run (float32; reductions run in another order):
  loss, grad_norm and the loss terms: relative <= 3.1e-7 (asserted: 1e-5);
  final parameters: absolute <= 1.1e-5 (asserted: 5e-5; the 4 Adam steps, lr 5e-4 decaying to
  1.25e-4, move a parameter by up to 1.25e-3). The largest differences are in the ViT blocks'
  attention key biases, whose exact gradient is zero (softmax ignores a shift shared by all
  keys): Adam turns rounding noise into updates there. The other parameters differ by <= 2e-6.
"""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from segvit_jax import bundle, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 4
BASE = {"batch_size": 8, "total_steps": STEPS, "log_every": 1, "ckpt_every": 100,
        "optim.warmup_steps": 0}
TP_MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
RTOL = 1e-5  # losses, grad norms, loss terms
PARAM_ATOL = 5e-5

# Runs `trainer.train` on the smoke config once per entry of argv[1]["runs"] and prints
# "RESULT {json}": metrics.jsonl, the train state's shardings (captured when it is saved),
# and the batch shardings; process 0 also writes the final parameters to final_params.npz.
_WORKER = r'''
import json, os, sys
args = json.loads(sys.argv[1])
import jax
if args.get("distributed"):
  d = args["distributed"]
  jax.distributed.initialize(coordinator_address=d["address"], num_processes=d["num_processes"],
                             process_id=d["process_id"], initialization_timeout=120)
import numpy as np
from configs import demo
from segvit_jax import checkpoint as ckpt_lib, sharding, trainer
from segvit_jax.data import pipeline, sources

SEEN = set()  # indices of the training examples this process read (all runs)
orig_source = sources.get_source


class Recording:
  def __init__(self, src):
    self.src, self.class_names = src, src.class_names

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    SEEN.add(int(i))
    return self.src[i]


sources.get_source = lambda cfg, split: Recording(orig_source(cfg, split))


class ConcatIterator:
  """Batches of several per-process iterators side by side: the global batch of a multi-process
  run, in one process (process i's rows come i-th, as its devices come i-th in the mesh)."""

  def __init__(self, its):
    self.its = its

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self.its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):  # grain's checkpoint handler stores bytes of non-grain iterators
    return json.dumps([it.get_state() for it in self.its]).encode()

  def set_state(self, state):
    for it, s in zip(self.its, json.loads(state)):
      it.set_state(s)

  def start_prefetch(self):
    pass


def spec(sh):
  return [a if a is None or isinstance(a, str) else list(a) for a in sh.spec]


def host_array(x):
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


orig_iterator, orig_save, orig_batch = (pipeline.make_train_iterator,
                                        ckpt_lib.Checkpointer.save, sharding.global_batch)
out = {"device_count": jax.device_count(), "process_count": jax.process_count()}
for run in args["runs"]:
  c = demo.get_config("smoke")
  c.update_from_flattened_dict(run["overrides"])
  n = run.get("emulate_processes")
  pipeline.make_train_iterator = (
      (lambda cfg: ConcatIterator([orig_iterator(cfg, i, n) for i in range(n)]))
      if n else orig_iterator)
  res = {"params": {}, "opt_state": {}, "final": {}, "batch": {}}

  def save(self, step, state, data_iter=None):
    for path, x in jax.tree_util.tree_leaves_with_path(state.params):
      k = jax.tree_util.keystr(path)
      res["params"][k] = {"spec": spec(x.sharding), "shape": list(x.shape),
                          "shard_shape": list(x.addressable_shards[0].data.shape),
                          "replicated": x.sharding.is_fully_replicated}
      res["final"][k] = host_array(x)
    for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
      res["opt_state"][jax.tree_util.keystr(path)] = spec(x.sharding)
    return orig_save(self, step, state, data_iter)

  def global_batch(batch, mesh):
    arrays = orig_batch(batch, mesh)
    x = arrays["image"]
    res["batch"] = {"spec": spec(x.sharding), "shape": list(x.shape),
                    "shard_shape": list(x.addressable_shards[0].data.shape)}
    return arrays

  ckpt_lib.Checkpointer.save, sharding.global_batch = save, global_batch
  try:
    trainer.train(c, run["workdir"])
  finally:
    ckpt_lib.Checkpointer.save, sharding.global_batch = orig_save, orig_batch
  if jax.process_index() == 0:
    np.savez(os.path.join(run["workdir"], "final_params.npz"), **res.pop("final"))
    with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
      res["metrics"] = [json.loads(line) for line in f]
  res.pop("final", None)
  res["seen"] = sorted(SEEN)
  SEEN.clear()
  out[run["name"]] = res
print("RESULT " + json.dumps(out), flush=True)
'''


def _env(devices: int) -> dict:
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
          "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
          "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _start(script, devices: int, args: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=ROOT,
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _results(procs: list[subprocess.Popen], timeout: float = 420) -> list[dict]:
  """Waits for all `procs`; fails with each failed process's stderr tail."""
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """Starts every training subprocess at once (they overlap well on few cores): the 1-device
  references, the 8-device runs and the 2 processes x 2 devices run. Yields their Popen handles
  and workdirs; whatever is still running at the end of the module is killed."""
  root = tmp_path_factory.mktemp("sharding")
  script = root / "sharding_worker.py"
  script.write_text(_WORKER)
  workdirs = {name: str(root / name)
              for name in ("one", "one_2proc_batches", "dp", "tp", "mp")}
  procs = {
      "one": [_start(script, 1, {"runs": [
          {"name": "one", "workdir": workdirs["one"], "overrides": BASE},
          # The global batches of the 2-process run (each process reads its own data shard).
          {"name": "one_2proc_batches", "workdir": workdirs["one_2proc_batches"],
           "overrides": BASE, "emulate_processes": 2}]})],
      "eight": [_start(script, 8, {"runs": [
          {"name": "dp", "workdir": workdirs["dp"], "overrides": BASE},  # mesh data=-1 (8)
          {"name": "tp", "workdir": workdirs["tp"], "overrides": {**BASE, **TP_MESH}}]})],
  }
  address = f"127.0.0.1:{_free_port()}"
  procs["mp"] = [_start(script, 2, {
      "distributed": {"address": address, "num_processes": 2, "process_id": i},
      "runs": [{"name": "mp", "workdir": workdirs["mp"], "overrides": BASE}]})
                 for i in range(2)]
  yield procs, workdirs
  for group in procs.values():
    for proc in group:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _named(outputs: list[dict], workdirs: dict) -> dict:
  return {k: {**v, "workdir": workdirs[k]} for out in outputs for k, v in out.items()
          if isinstance(v, dict)}


@pytest.fixture(scope="module")
def runs(launched):
  """Results of the single-process runs: one, one_2proc_batches (1 device), dp, tp (8)."""
  procs, workdirs = launched
  (r1,), (r8,) = _results(procs["one"]), _results(procs["eight"])
  assert r1["device_count"] == 1 and r8["device_count"] == 8
  return _named([r1, r8], workdirs)


def _assert_same_training(run: dict, ref: dict) -> None:
  steps = [m["step"] for m in run["metrics"]]
  assert steps == [m["step"] for m in ref["metrics"]] == list(range(1, STEPS + 1))
  for key in ("loss", "grad_norm", "loss_ce", "loss_mask", "loss_dice"):
    np.testing.assert_allclose([m[key] for m in run["metrics"]],
                               [m[key] for m in ref["metrics"]], rtol=RTOL, err_msg=key)
  got = np.load(os.path.join(run["workdir"], "final_params.npz"))
  want = np.load(os.path.join(ref["workdir"], "final_params.npz"))
  assert sorted(got.files) == sorted(want.files)
  for k in want.files:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=PARAM_ATOL, err_msg=k)


# ----------------------------------------------------------------------------------------------
# Mesh shapes (in process).

@pytest.mark.parametrize("mesh, devices, shape", [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=-1, fsdp=2, tensor=1), 8, (4, 2, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=1, tensor=-1), 4, (1, 1, 4)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (dict(data=-1, fsdp=1, tensor=1), 1, (1, 1, 1)),
])
def test_mesh_shape_resolves(mesh, devices, shape):
  assert sharding.mesh_shape(mesh, devices) == shape


@pytest.mark.parametrize("mesh, devices, message", [
    (dict(data=2, fsdp=2, tensor=1), 8,
     "config.mesh {'data': 2, 'fsdp': 2, 'tensor': 1} needs 4 devices, there are 8"),
    (dict(data=4, fsdp=2, tensor=2), 8,
     "config.mesh {'data': 4, 'fsdp': 2, 'tensor': 2} needs 16 devices, there are 8"),
    (dict(data=-1, fsdp=3, tensor=1), 8,
     "config.mesh {'data': -1, 'fsdp': 3, 'tensor': 1} does not divide 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=2), 8,
     "config.mesh {'data': -1, 'fsdp': -1, 'tensor': 2}: at most one axis may be -1"),
])
def test_mesh_shape_errors(mesh, devices, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    sharding.mesh_shape(mesh, devices)


@pytest.mark.parametrize("mesh", [dict(data=-1, fsdp=0, tensor=1),
                                  dict(data=-2, fsdp=-4, tensor=1)])
def test_mesh_shape_rejects_non_positive_sizes(mesh):
  with pytest.raises(ValueError, match=r"config\.mesh"):
    sharding.mesh_shape(mesh, 8)


# ----------------------------------------------------------------------------------------------
# 8 devices in one process.

def test_data_parallel_matches_one_device(runs):
  dp, one = runs["dp"], runs["one"]
  _assert_same_training(dp, one)
  # The batch is split over all 8 devices; every parameter is replicated.
  assert dp["batch"] == {"spec": [["data", "fsdp"]], "shape": [8, 32, 32, 3],
                         "shard_shape": [1, 32, 32, 3]}
  assert all(p["replicated"] for p in dp["params"].values())


# (logical axes) -> mesh axes, for one parameter of each kind; the smoke widths (ViT 32, MLP 64,
# head 16, 2 heads) are divisible by the fsdp and tensor sizes (2).
EXPECTED_TP_SPECS = {
    # ("embed", "heads")
    "['backbone']['encoderblock_0']['attn']['query']['kernel']": ["fsdp", "tensor"],
    "['backbone']['encoderblock_1']['attn']['value']['kernel']": ["fsdp", "tensor"],
    # ("heads",) / ("heads", "embed")
    "['backbone']['encoderblock_0']['attn']['query']['bias']": ["tensor"],
    "['backbone']['encoderblock_0']['attn']['out']['kernel']": ["tensor", "fsdp"],
    # ("embed", "mlp") / ("mlp",) / ("mlp", "embed")
    "['backbone']['encoderblock_0']['mlp']['fc1']['kernel']": ["fsdp", "tensor"],
    "['backbone']['encoderblock_0']['mlp']['fc1']['bias']": ["tensor"],
    "['backbone']['encoderblock_0']['mlp']['fc2']['kernel']": ["tensor", "fsdp"],
    # ("embed",): LayerNorm
    "['backbone']['encoderblock_0']['norm1']['scale']": ["fsdp"],
    "['head']['decoder_0_layer_0']['norm3']['bias']": ["fsdp"],
    # (None, None, "embed")
    "['backbone']['pos_embedding']": [None, None, "fsdp"],
    "['backbone']['cls']": [None, None, "fsdp"],
    # ("queries", "embed"): the ATM class tokens
    "['head']['class_tokens']": [None, "fsdp"],
    # ("embed", "classes") / ("classes",)
    "['head']['class_embed']['kernel']": ["fsdp", None],
    "['head']['class_embed']['bias']": [None],
    "['head']['decoder_1_layer_0']['cross_attn']['key']['kernel']": ["fsdp", "tensor"],
}


def test_fsdp_and_tensor_parallel_match_one_device(runs):
  tp, one = runs["tp"], runs["one"]
  _assert_same_training(tp, one)
  assert tp["batch"]["spec"] == [["data", "fsdp"]]
  assert tp["batch"]["shard_shape"] == [2, 32, 32, 3]  # 8 over data x fsdp = 4 shards

  params = tp["params"]
  specs = {k: p["spec"] for k, p in params.items()}
  assert {k: specs.get(k) for k in EXPECTED_TP_SPECS} == EXPECTED_TP_SPECS
  # The parameters are really split: a (32, 32) attention kernel is (16, 16) per device.
  q = params["['backbone']['encoderblock_0']['attn']['query']['kernel']"]
  assert (q["shape"], q["shard_shape"]) == ([32, 32], [16, 16])
  t = params["['head']['class_tokens']"]
  assert (t["shape"], t["shard_shape"]) == ([6, 16], [6, 8])
  # Every sharded dimension divides by its mesh axes (else jax would have refused anyway).
  sizes = {"data": 2, "fsdp": 2, "tensor": 2}
  for k, p in params.items():
    for dim, axes in zip(p["shape"], p["spec"]):
      for axis in [axes] if isinstance(axes, str) else axes or []:
        assert dim % sizes[axis] == 0, (k, p)
  # Adam's moments follow their parameters; its counters are replicated.
  query = "['backbone']['encoderblock_0']['attn']['query']['kernel']"
  moments = {k: s for k, s in tp["opt_state"].items() if k.endswith(query)}
  assert len(moments) >= 2 and all(s == ["fsdp", "tensor"] for s in moments.values()), moments
  counts = [s for k, s in tp["opt_state"].items() if k.endswith(".count")]
  assert counts and all(s == [] for s in counts)


@pytest.mark.skipif(jax.device_count() != 1, reason="loads on this process's devices")
def test_checkpoint_from_8_devices_loads_on_one(runs):
  # eval.py / export_bundle on a workdir trained with another device count.
  loaded = bundle.load_model(runs["tp"]["workdir"])
  want = np.load(os.path.join(runs["tp"]["workdir"], "final_params.npz"))
  got = {jax.tree_util.keystr(k): np.asarray(v)
         for k, v in jax.tree_util.tree_leaves_with_path(loaded.variables["params"])}
  assert sorted(got) == sorted(want.files)
  for k in want.files:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# 2 processes x 2 devices on loopback.

def test_two_processes_match_one_device(runs, launched):
  procs, workdirs = launched
  r0, r1 = _results(procs["mp"])
  assert (r0["device_count"], r0["process_count"]) == (4, 2)
  mp = _named([r0], workdirs)["mp"]
  # Each process feeds its 4 examples into the 8-example global batch over mesh data=4.
  assert mp["batch"] == {"spec": [["data", "fsdp"]], "shape": [8, 32, 32, 3],
                         "shard_shape": [2, 32, 32, 3]}
  # Each process reads its own shard of the data (`source[i::2]`, its own seed), so the
  # reference is one device fed both processes' batches side by side.
  _assert_same_training(mp, runs["one_2proc_batches"])
  assert r1["mp"]["params"] == mp["params"]  # both processes saw the same global shardings
  # Each process read only its own examples (source[i::2], through jax.process_index()):
  # 4 steps x 4 examples drawn from each 32-example shard, disjoint across the processes.
  seen0, seen1 = set(r0["mp"]["seen"]), set(r1["mp"]["seen"])
  assert len(seen0) >= 16 and len(seen1) >= 16 and not seen0 & seen1
  assert all(i % 2 == 0 for i in seen0) and all(i % 2 == 1 for i in seen1)
  # Only process 0 logs; the checkpoint holds both processes' data iterators.
  assert len(mp["metrics"]) == STEPS
  data_dir = os.path.join(mp["workdir"], "checkpoints", str(STEPS), "data")
  assert sorted(f for f in os.listdir(data_dir) if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
