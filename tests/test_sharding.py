"""Sharding: mesh resolution, training on several devices / processes against one device, and
resuming checkpoints on other meshes and process counts.

The multi-device runs need `--xla_force_host_platform_device_count` before jax is imported, and
pytest has already imported it, so they run in subprocesses: the `_WORKER` script below, which
prints its results as JSON, and `train.py` itself. Every run trains the smoke config for 4
steps with batch 8 and the full learning rate from step 1 (no warmup, so the steps move the
parameters); the reference is the same config on a single CPU device. On 8 devices: data=8;
data=2 x fsdp=2 x tensor=2 (also with 2 micro-batches); data=4 x fsdp=2 (also through train.py
with --config.mesh.fsdp=2, against the 1-device worker run); 2 processes x 2 devices on loopback.
All of them start at once.

Measured differences from the 1-device run (float32; reductions run in another order):
  loss, grad_norm and the loss terms: relative <= 3.1e-7 (this CPU: <= 2.5e-7 for every mesh,
  with accumulation, through train.py and over 2 processes) (asserted: 1e-5);
  final parameters: absolute <= 1.1e-5 (this CPU: <= 3.5e-6) (asserted: 5e-5; the 4 Adam
  steps, lr 5e-4 decaying to 1.25e-4, move a parameter by up to 1.25e-3). The largest
  differences are in the ViT blocks' attention key biases, whose exact gradient is zero
  (softmax ignores a shift shared by all keys): Adam turns rounding noise into updates there.
  The other parameters differ by <= 2e-6 (this CPU: <= 5e-7).
Restored checkpoints (another mesh, another process count) are bitwise equal to what was saved.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from segvit_jax import checkpoint, sharding, trainer
from tests.support import ROOT, device_env, free_port, results


STEPS = 4
BASE = {"batch_size": 8, "total_steps": STEPS, "log_every": 1, "ckpt_every": 100,
        "optim.warmup_steps": 0}
TP_MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
FSDP_MESH = {"mesh.data": 4, "mesh.fsdp": 2, "mesh.tensor": 1}
RESHARD_MESH = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}
RTOL = 1e-5  # losses, grad norms, loss terms
PARAM_ATOL = 5e-5

# Runs `trainer.train` on the smoke config once per entry of argv[1]["runs"] and prints
# "RESULT {json}": metrics.jsonl, the train state's shardings (captured when it is saved and
# when it is restored), the batch shardings, the trainer's warnings and memory log line;
# process 0 also writes the final (and restored) parameters to final_params.npz
# (restored_params.npz), then a `done` file. A run may first wait for another run's `done`
# ("wait_for") and start from a copy of its checkpoints ("resume_from").
_WORKER = r'''
import json, os, shutil, sys, time
args = json.loads(sys.argv[1])
import jax
if args.get("distributed"):
  d = args["distributed"]
  jax.distributed.initialize(coordinator_address=d["address"], num_processes=d["num_processes"],
                             process_id=d["process_id"], initialization_timeout=120)
import logging as py_logging
import numpy as np
from absl import logging
from configs import demo
from segvit_jax import checkpoint as ckpt_lib, runtime, sharding, trainer
from segvit_jax.data import pipeline, registry

LOG = []  # this run's trainer warnings and memory line


class Recorder(py_logging.Handler):
  def emit(self, record):
    message = record.getMessage()
    if record.levelno >= py_logging.WARNING and record.pathname.endswith("trainer.py") or (
        message.startswith("memory per device")):
      LOG.append(message)


logging.get_absl_logger().addHandler(Recorder())
logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
runtime.quiet_library_logs()

SEEN = set()  # indices of the training examples this process read (all runs)
orig_source = registry.get_source


class Recording:
  def __init__(self, src):
    self.src, self.class_names = src, src.class_names

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    SEEN.add(int(i))
    return self.src[i]


registry.get_source = lambda cfg, split: Recording(orig_source(cfg, split))


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

  def close(self):
    for it in self.its:
      it.close()


def spec(sh):
  return [a if a is None or isinstance(a, str) else list(a) for a in sh.spec]


def host_array(x):
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def record_state(state, into, values):
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    k = jax.tree_util.keystr(path)
    into["params"][k] = {"spec": spec(x.sharding), "shape": list(x.shape),
                         "shard_shape": list(x.addressable_shards[0].data.shape),
                         "replicated": x.sharding.is_fully_replicated}
    values[k] = host_array(x)
  for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):
    into["opt_state"][jax.tree_util.keystr(path)] = spec(x.sharding)


orig_iterator, orig_save, orig_restore, orig_batch = (
    pipeline.make_train_iterator, ckpt_lib.Checkpointer.save, ckpt_lib.Checkpointer.restore,
    sharding.global_batch)
out = {"device_count": jax.device_count(), "process_count": jax.process_count()}
for run in args["runs"]:
  if run.get("wait_for"):
    deadline = time.time() + 400
    while not os.path.exists(run["wait_for"]):
      if time.time() > deadline:
        raise TimeoutError(f"{run['wait_for']} did not appear")
      time.sleep(0.5)
  if run.get("resume_from"):
    shutil.copytree(os.path.join(run["resume_from"], "checkpoints"),
                    os.path.join(run["workdir"], "checkpoints"))
  c = demo.get_config("smoke")
  c.update_from_flattened_dict(run["overrides"])
  n = run.get("emulate_processes")
  pipeline.make_train_iterator = (
      (lambda cfg: ConcatIterator([orig_iterator(cfg, i, n) for i in range(n)]))
      if n else orig_iterator)
  res = {"params": {}, "opt_state": {}, "final": {}, "batch": {}}
  restored_values = {}

  def save(self, step, state, data_iter=None):
    record_state(state, res, res["final"])
    return orig_save(self, step, state, data_iter)

  def restore(self, abstract_state, data_iter=None, step=None):
    state = orig_restore(self, abstract_state, data_iter, step)
    res["restored"] = {"step": int(state.step), "data_iter": data_iter is not None,
                       "params": {}, "opt_state": {}}
    record_state(state, res["restored"], restored_values)
    return state

  def global_batch(batch, mesh):
    arrays = orig_batch(batch, mesh)
    x = arrays["image"]
    res["batch"] = {"spec": spec(x.sharding), "shape": list(x.shape),
                    "shard_shape": list(x.addressable_shards[0].data.shape)}
    return arrays

  ckpt_lib.Checkpointer.save, ckpt_lib.Checkpointer.restore = save, restore
  sharding.global_batch = global_batch
  try:
    trainer.train(c, run["workdir"])
  finally:
    ckpt_lib.Checkpointer.save, ckpt_lib.Checkpointer.restore = orig_save, orig_restore
    sharding.global_batch = orig_batch
  if jax.process_index() == 0:
    np.savez(os.path.join(run["workdir"], "final_params.npz"), **res.pop("final"))
    if restored_values:
      np.savez(os.path.join(run["workdir"], "restored_params.npz"), **restored_values)
    with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
      res["metrics"] = [json.loads(line) for line in f]
    open(os.path.join(run["workdir"], "done"), "w").close()
  res.pop("final", None)
  res["seen"] = sorted(SEEN)
  res["log"] = list(LOG)
  SEEN.clear()
  LOG.clear()
  out[run["name"]] = res
print("RESULT " + json.dumps(out), flush=True)
'''


def _start(script, devices: int, args: dict) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=ROOT,
                          env=device_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _start_cli(devices: int, workdir: str, *overrides: str, wait_for: str) -> subprocess.Popen:
  """`python train.py --config configs/demo.py:smoke ... --workdir W` with BASE as flags, once
  the file `wait_for` exists (the worker run that compiles the same train step is done: the
  persistent compilation cache then holds it)."""
  flags = [f"--config.{k}={v}" for k, v in BASE.items()]
  cmd = [sys.executable, "train.py", "--config", "configs/demo.py:smoke", *overrides,
         "--workdir", workdir, *flags]
  wait = f"for i in $(seq 800); do [ -e {shlex.quote(wait_for)} ] && break; sleep 0.5; done"
  return subprocess.Popen(["sh", "-c", f"{wait}; exec {shlex.join(cmd)}"], cwd=ROOT,
                          env=device_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
  """Starts every training subprocess at once (they overlap well on few cores): the 1-device
  references, the 8-device runs, the 2 processes x 2 devices run, the 1-process resume of its
  checkpoint (which waits for it) and the train.py runs. Yields their Popen handles and
  workdirs; whatever is still running at the end of the module is killed."""
  root = tmp_path_factory.mktemp("sharding")
  script = root / "sharding_worker.py"
  script.write_text(_WORKER)
  workdirs = {name: str(root / name)
              for name in ("one", "one_2proc_batches", "dp", "reshard", "tp", "fsdp", "accum",
                           "mp", "mp_resumed", "cli8")}
  procs = {
      "one": [_start(script, 1, {"runs": [
          {"name": "one", "workdir": workdirs["one"], "overrides": BASE},
          # The global batches of the 2-process run (each process reads its own data shard).
          {"name": "one_2proc_batches", "workdir": workdirs["one_2proc_batches"],
           "overrides": BASE, "emulate_processes": 2}]})],
      "eight": [
          _start(script, 8, {"runs": [
              {"name": "dp", "workdir": workdirs["dp"], "overrides": BASE},  # data=-1 (8)
              # dp's step-4 checkpoint, restored as fsdp 4 x tensor 2, then one more step.
              {"name": "reshard", "workdir": workdirs["reshard"], "resume_from": workdirs["dp"],
               "overrides": {**BASE, **RESHARD_MESH, "total_steps": STEPS + 1}}]}),
          _start(script, 8, {"runs": [
              {"name": "tp", "workdir": workdirs["tp"], "overrides": {**BASE, **TP_MESH}},
              {"name": "fsdp", "workdir": workdirs["fsdp"],
               "overrides": {**BASE, **FSDP_MESH}},
              {"name": "accum", "workdir": workdirs["accum"],
               "overrides": {**BASE, **TP_MESH, "grad_accum_steps": 2}}]})],
      "cli": [_start_cli(8, workdirs["cli8"], "--config.mesh.fsdp=2",
                         wait_for=os.path.join(workdirs["fsdp"], "done"))],
  }
  address = f"127.0.0.1:{free_port()}"
  procs["mp"] = [_start(script, 2, {
      "distributed": {"address": address, "num_processes": 2, "process_id": i},
      "runs": [{"name": "mp", "workdir": workdirs["mp"], "overrides": BASE}]})
                 for i in range(2)]
  # One process (1 device) continues the 2-process checkpoint to step STEPS + 2.
  procs["resume"] = [_start(script, 1, {"runs": [
      {"name": "mp_resumed", "workdir": workdirs["mp_resumed"],
       "wait_for": os.path.join(workdirs["mp"], "done"), "resume_from": workdirs["mp"],
       "overrides": {**BASE, "total_steps": STEPS + 2}}]})]
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
  """Results of the single-process worker runs: one, one_2proc_batches (1 device), dp, reshard,
  tp, fsdp, accum (8)."""
  procs, workdirs = launched
  (r1,), (r8, r8b) = results(procs["one"]), results(procs["eight"])
  assert r1["device_count"] == 1 and r8["device_count"] == r8b["device_count"] == 8
  return _named([r1, r8, r8b], workdirs)


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


def _assert_split_as_specs(params: dict, sizes: dict) -> None:
  """Every parameter's per-device shape is its shape divided by the mesh axes of its spec."""
  for k, p in params.items():
    want = list(p["shape"])
    for d, axes in enumerate(p["spec"]):
      for axis in [axes] if isinstance(axes, str) else axes or []:
        assert want[d] % sizes[axis] == 0, (k, p)
        want[d] //= sizes[axis]
    assert p["shard_shape"] == want, (k, p)


def _memory_line(run: dict) -> str:
  lines = [m for m in run["log"] if m.startswith("memory per device")]
  assert len(lines) == 1, run["log"]
  return lines[0]


def test_fsdp_mesh_matches_one_device(runs):
  # mesh data=4 x fsdp=2: the batch over all 8 devices, parameters split over fsdp.
  fsdp, one = runs["fsdp"], runs["one"]
  _assert_same_training(fsdp, one)
  assert fsdp["batch"] == {"spec": [["data", "fsdp"]], "shape": [8, 32, 32, 3],
                           "shard_shape": [1, 32, 32, 3]}
  params = fsdp["params"]
  # The same rules as for data=2 x fsdp=2 x tensor=2; "tensor" has size 1 here.
  assert {k: params[k]["spec"] for k in EXPECTED_TP_SPECS} == EXPECTED_TP_SPECS
  _assert_split_as_specs(params, {"data": 4, "fsdp": 2, "tensor": 1})
  # Embedding dimensions are halved, heads / MLP dimensions whole.
  for k, shard in [("['backbone']['encoderblock_0']['attn']['query']['kernel']", [16, 32]),
                   ("['backbone']['encoderblock_0']['mlp']['fc1']['kernel']", [16, 64]),
                   ("['backbone']['encoderblock_0']['mlp']['fc2']['kernel']", [64, 16]),
                   ("['backbone']['pos_embedding']", [1, 17, 16]),  # 16 patches + cls
                   ("['head']['class_tokens']", [6, 8])]:
    assert params[k]["shard_shape"] == shard, (k, params[k])
  assert sum(p["replicated"] for p in params.values()) < len(params) // 4
  # The start-up memory log counts exactly the per-device shards (float32), less than the
  # replicated parameters of the data-parallel run.
  per_device = 4 * sum(int(np.prod(p["shard_shape"])) for p in params.values())
  replicated = 4 * sum(int(np.prod(p["shape"])) for p in params.values())
  assert per_device < 0.7 * replicated
  assert f"params {trainer.format_bytes(per_device)}," in _memory_line(fsdp)
  assert f"params {trainer.format_bytes(replicated)}," in _memory_line(runs["dp"])


def test_grad_accumulation_on_8_devices_matches_one_device(runs):
  # data=2 x fsdp=2 x tensor=2, batch 8 in 2 micro-batches of 4 (one row per batch shard).
  _assert_same_training(runs["accum"], runs["one"])
  assert runs["accum"]["batch"]["shard_shape"] == [2, 32, 32, 3]


def test_data_parallel_checkpoint_restores_as_fsdp_and_tensor(runs):
  # dp's step-4 checkpoint (every parameter replicated on 8 devices) restored into
  # mesh fsdp=4 x tensor=2: equal values, the new shardings; then it trains on.
  dp, rs = runs["dp"], runs["reshard"]
  restored = rs["restored"]
  assert restored["step"] == STEPS and restored["data_iter"]  # same process count
  got = np.load(os.path.join(rs["workdir"], "restored_params.npz"))
  want = np.load(os.path.join(dp["workdir"], "final_params.npz"))
  assert sorted(got.files) == sorted(want.files)
  for k in want.files:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  params = restored["params"]
  assert {k: params[k]["spec"] for k in EXPECTED_TP_SPECS} == EXPECTED_TP_SPECS
  _assert_split_as_specs(params, {"data": 1, "fsdp": 4, "tensor": 2})
  q = params["['backbone']['encoderblock_0']['attn']['query']['kernel']"]
  assert (q["shape"], q["shard_shape"]) == ([32, 32], [8, 16])
  t = params["['head']['class_tokens']"]
  assert (t["shape"], t["shard_shape"]) == ([6, 16], [6, 4])
  query = "['backbone']['encoderblock_0']['attn']['query']['kernel']"
  moments = {k: s for k, s in restored["opt_state"].items() if k.endswith(query)}
  assert len(moments) >= 2 and all(s == ["fsdp", "tensor"] for s in moments.values()), moments
  assert [m["step"] for m in rs["metrics"]] == [STEPS + 1]
  assert rs["log"] == [_memory_line(rs)]  # no warning


@pytest.mark.skipif(jax.device_count() != 1, reason="loads on this process's devices")
def test_checkpoint_from_8_devices_loads_on_one(runs):
  # eval.py / export_bundle on a workdir trained with another device count.
  loaded = checkpoint.load_model(runs["tp"]["workdir"])
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
  r0, r1 = results(procs["mp"])
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


RESUME_WARNING = (
    "checkpoint 4 holds the data iterator state of 2 process(es), this run has 1: restoring the "
    "train state only (resharded onto mesh {'data': 1, 'fsdp': 1, 'tensor': 1}); the data order "
    "restarts from a fresh per-process shuffle.")


def test_one_process_resumes_two_process_checkpoint(launched):
  procs, workdirs = launched
  (r,) = results(procs["resume"])
  assert (r["device_count"], r["process_count"]) == (1, 1)
  res = _named([r], workdirs)["mp_resumed"]
  # The train state is restored (from 2 processes x 2 devices onto 1 device), the per-process
  # data iterators are not.
  assert res["restored"]["step"] == STEPS and not res["restored"]["data_iter"]
  assert RESUME_WARNING in res["log"]
  got = np.load(os.path.join(res["workdir"], "restored_params.npz"))
  want = np.load(os.path.join(workdirs["mp"], "final_params.npz"))
  assert sorted(got.files) == sorted(want.files)
  for k in want.files:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # The step counter goes on from 4; the parameters move on from the restored ones.
  assert [m["step"] for m in res["metrics"]] == [STEPS + 1, STEPS + 2]
  assert all(np.isfinite(m["loss"]) for m in res["metrics"])
  final = np.load(os.path.join(res["workdir"], "final_params.npz"))
  assert max(float(np.max(np.abs(final[k] - got[k]))) for k in got.files) > 1e-4
  # A fresh one-process iterator: it reads the whole set (both processes' former shards) and
  # its checkpoint holds one process's state.
  assert {i % 2 for i in res["seen"]} == {0, 1}
  data_dir = os.path.join(res["workdir"], "checkpoints", str(STEPS + 2), "data")
  assert sorted(f for f in os.listdir(data_dir) if f.startswith("process_")) == [
      "process_0-of-1.json"]


# ----------------------------------------------------------------------------------------------
# train.py itself.

def test_train_py_fsdp_on_8_devices_matches_one_device(runs, launched):
  """train.py's run on mesh data=4 x fsdp=2 against the 1-device worker run of the same config
  (`trainer.train`, which train.py calls)."""
  procs, workdirs = launched
  (proc,) = procs["cli"]
  try:
    _, err = proc.communicate(timeout=420)
  except subprocess.TimeoutExpired:
    proc.kill()
    _, err = proc.communicate()
  assert proc.returncode == 0, f"train.py exited with {proc.returncode}:\n{err[-3000:]}"
  assert "mesh {'data': 4, 'fsdp': 2, 'tensor': 1} over 1 process(es)" in err
  memory = [l for l in err.splitlines() if "memory per device:" in l]
  assert len(memory) == 1 and re.search(
      r"params \d+\.\d\d MiB, optimizer state \d+\.\d\d MiB \| compiled train step: "
      r"arguments \d+\.\d\d MiB, outputs \d+\.\d\d MiB, temp \d+\.\d\d MiB, total "
      r"\d+\.\d\d MiB$", memory[0]), memory
  with open(os.path.join(workdirs["cli8"], "metrics.jsonl")) as f:
    run8 = {"metrics": [json.loads(line) for line in f], "workdir": workdirs["cli8"]}
  # The final parameters from its checkpoint, on this process's device.
  params, step = checkpoint.restore_params(os.path.join(run8["workdir"], "checkpoints"))
  assert step == STEPS
  np.savez(os.path.join(run8["workdir"], "final_params.npz"), **{
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(params)})
  _assert_same_training(run8, runs["one"])
