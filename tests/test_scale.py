"""Scaling out, on one device: gradient accumulation equals the whole-batch step, bfloat16
compute keeps float32 parameters, optimizer state and gradients, and the start-up memory log.
(The multi-process start-up decision, `runtime.distributed_args`: tests/test_runtime.py.)

The runs train the smoke config for 3 steps with batch 8, the full learning rate from step 1
and dropout / drop path off (so micro-batches draw no random numbers that the whole batch
would draw differently). Measured (float32, this CPU):
  grad_accum_steps 2 and 4 against 1: losses, loss terms and grad norms relative <= 4.9e-7;
  final parameters absolute <= 1.8e-6, the largest in the attention key biases, whose exact
  gradient is zero (Adam turns rounding noise into updates; see tests/test_sharding.py), while
  training moved parameters by up to 2.5e-3 (asserted: 1e-5 for both). Plain 1 / steps
  averaging of the micro-batch losses would differ by 1.0e-2 relative here: the ATM loss
  normalises over the whole batch (trainer.accumulated_value_and_grad);
  model.dtype bfloat16 against float32: loss relative <= 1.4e-5, loss terms and grad norms
  relative <= 1.6e-3 (asserted: 2e-2; the smoke model is near its initialisation, where the
  loss is dominated by the class cross-entropy of small logits).
"""

import logging as py_logging
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from configs import demo
from segvit_jax import checkpoint, sharding, trainer
from segvit_jax.losses import LOSSES
from segvit_jax.losses.atm import atm_normalisers, class_targets
from segvit_jax.models import build_model

from tests.support import flat_params, read_metrics

STEPS = 3
BASE = {"batch_size": 8, "total_steps": STEPS, "log_every": 1, "ckpt_every": STEPS,
        "optim.warmup_steps": 0, "model.head.dropout": 0.0, "model.backbone.drop_path": 0.0}
ACCUM_TOL = 1e-5
BF16_RTOL = 2e-2
TERMS = ("loss", "grad_norm", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0",
         "loss_dice_0")


def config(**overrides):
  c = demo.get_config("smoke")
  c.update_from_flattened_dict({**BASE, **overrides})
  return c


def init_params(c, abstract=False):
  """The parameters `trainer.train` starts from (or their shapes)."""
  model = build_model(c.model)
  h, w = c.augment.crop_size
  init = lambda: nn.meta.unbox(
      model.init(jax.random.key(c.seed), jnp.zeros((1, h, w, 3)))["params"])
  return jax.eval_shape(init) if abstract else jax.jit(init)()


class _Records(py_logging.Handler):
  def __init__(self):
    super().__init__(py_logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> (workdir, metrics, log messages) for accumulation 1, 2, 4 and bfloat16."""
  variants = {"accum1": {}, "accum2": {"grad_accum_steps": 2},
              "accum4": {"grad_accum_steps": 4}, "bf16": {"model.dtype": "bfloat16"}}
  out = {}
  for name, overrides in variants.items():
    workdir = str(tmp_path_factory.mktemp(name))
    records = _Records()
    logging.get_absl_logger().addHandler(records)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.INFO)
    try:
      trainer.train(config(**overrides), workdir)
    finally:
      logging.get_absl_logger().removeHandler(records)
      logging.set_verbosity(verbosity)
    out[name] = (workdir, read_metrics(workdir), records.messages)
  return out


# ----------------------------------------------------------------------------------------------
# Gradient accumulation.

@pytest.mark.parametrize("name", ["accum2", "accum4"])
def test_grad_accumulation_matches_whole_batch(runs, name):
  ref_dir, ref, _ = runs["accum1"]
  workdir, got, log = runs[name]
  assert [m["step"] for m in got] == [m["step"] for m in ref] == list(range(1, STEPS + 1))
  for key in TERMS:
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=ACCUM_TOL,
                               err_msg=key)
  a, b = flat_params(workdir, STEPS), flat_params(ref_dir, STEPS)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=ACCUM_TOL, err_msg=k)
  # Training moved the parameters by far more than the tolerance: the comparison has teeth.
  init = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(init_params(config()))}
  assert max(float(np.max(np.abs(b[k] - init[k]))) for k in b) > 100 * ACCUM_TOL
  steps = int(name.removeprefix("accum"))
  assert any(f"batch 8 in {steps} micro-batches of {8 // steps}" in m for m in log), log


def test_grad_accumulation_lowers_step_memory(runs):
  # The compiled step's temporaries shrink with the micro-batch (measured: 2.51, 1.37 and
  # 0.81 MiB for 1, 2 and 4 micro-batches of the batch of 8).
  temp = {}
  for name in ("accum1", "accum2", "accum4"):
    line = _memory_line(runs[name][2])
    temp[name] = float(re.search(r"temp (\d+\.\d+) MiB", line).group(1))
  assert temp["accum4"] < 0.5 * temp["accum1"] and temp["accum2"] < 0.7 * temp["accum1"], temp


def test_grad_accumulation_batch_must_divide(tmp_path):
  with pytest.raises(ValueError, match=re.escape(
      "config.batch_size=8 is not divisible by config.grad_accum_steps=3 x the 1 batch shards "
      "of mesh {'data': 1, 'fsdp': 1, 'tensor': 1}")):
    trainer.train(config(grad_accum_steps=3), str(tmp_path))
  with pytest.raises(ValueError, match=re.escape("config.grad_accum_steps=0 must be at least 1")):
    trainer.train(config(grad_accum_steps=0), str(tmp_path))


def test_micro_batches_take_strided_rows():
  # Each device holds a contiguous block of rows; micro-batch i takes rows i, i + steps, ...
  batch = {"image": np.arange(8)[:, None] * np.ones((8, 3)), "label": np.arange(8)}
  micro = trainer.split_micro_batches(batch, 2)
  np.testing.assert_array_equal(micro["label"], [[0, 2, 4, 6], [1, 3, 5, 7]])
  np.testing.assert_array_equal(micro["image"][1, :, 0], [1, 3, 5, 7])


def test_micro_batches_draw_their_own_dropout_rng():
  # A stand-in loss whose value is the rng's draw: micro-batch i gets fold_in(rng, i), and
  # equal normaliser shares weight each by 1 / 2.
  def compute_loss(params, model_state, batch, rng, step=None):
    value = jnp.sum(params["w"] * jax.random.normal(rng, (3,)))
    return value, ({"loss_ce": value}, model_state)

  batch = {"image": jnp.zeros((4, 2, 2, 3)), "label": jnp.zeros((4, 2, 2), jnp.int32)}
  rng = jax.random.key(3)
  fn = trainer.accumulated_value_and_grad(compute_loss, config(grad_accum_steps=2))
  (loss, (terms, _)), grads = fn({"w": jnp.ones(3)}, {}, batch, rng)
  draws = [jax.random.normal(jax.random.fold_in(rng, i), (3,)) for i in range(2)]
  np.testing.assert_allclose(grads["w"], 0.5 * (draws[0] + draws[1]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(terms["loss_ce"]), rtol=1e-6)
  np.testing.assert_allclose(float(loss), 0.5 * float(np.sum(draws[0] + draws[1])), rtol=1e-6)


def test_micro_batch_weights_follow_the_loss_normalisers():
  # Two micro-batches with different numbers of present classes: the whole-batch loss divides
  # by the total, so plain averaging would be wrong; the weighted sum is exact.
  c = config()
  labels = np.zeros((2, 4, 4), np.int32)
  labels[0, :2] = 1  # classes {0, 1} present in example 0, {0} in example 1
  counts = [atm_normalisers(jnp.asarray(labels[i:i + 1]), 6, c.loss.no_object_weight)
            for i in range(2)]
  whole = atm_normalisers(jnp.asarray(labels), 6, c.loss.no_object_weight)
  assert [float(n["masks"]) for n in counts] == [2.0, 1.0] and float(whole["masks"]) == 3.0
  # 6 queries each: present 1.0, absent no_object_weight 0.1.
  np.testing.assert_allclose([float(n["queries"]) for n in counts], [2.4, 1.5], rtol=1e-6)
  # Presence as the loss defines it (ignore pixels and ids >= K belong to no class).
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, (5, 8, 8)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.3] = 255
  labels[0] = 2
  labels[1, :, :4] = 7  # out of range
  _, present = class_targets(jnp.asarray(labels), 6)
  got = atm_normalisers(jnp.asarray(labels), 6, c.loss.no_object_weight)
  assert float(got["masks"]) == float(np.sum(present))
  np.testing.assert_allclose(float(got["queries"]),
                             float(np.sum(np.where(present, 1.0, 0.1))), rtol=1e-6)
  term_normaliser = LOSSES["atm"].term_normaliser
  assert term_normaliser("loss_dice_3") == ("masks", 1.0)
  with pytest.raises(KeyError, match="loss term 'loss_box' has no known normaliser"):
    term_normaliser("loss_box")


# ----------------------------------------------------------------------------------------------
# Mixed precision.

def _leaf_dtypes(tree):
  return {jax.tree_util.keystr(k): np.dtype(v.dtype)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_bfloat16_keeps_float32_state_and_loss_close(runs):
  _, ref, _ = runs["accum1"]
  workdir, got, _ = runs["bf16"]
  losses, ref_losses = [m["loss"] for m in got], [m["loss"] for m in ref]
  assert all(np.isfinite(losses))
  for key in TERMS:
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in ref], rtol=BF16_RTOL,
                               err_msg=key)
  assert losses != ref_losses  # the compute really ran in bfloat16
  # The checkpointed train state: float32 parameters and Adam moments, an int32 step counter.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    state = ckpt.manager.item_metadata(STEPS)["state"]
  finally:
    ckpt.close()
  params, opt = _leaf_dtypes(state["params"]), _leaf_dtypes(state["opt_state"])
  assert np.dtype(state["step"].dtype) == np.int32
  assert params and set(params.values()) == {np.dtype("float32")}
  floating = {v for v in opt.values() if np.issubdtype(v, np.floating)}
  assert floating == {np.dtype("float32")}
  assert sum(np.issubdtype(v, np.floating) for v in opt.values()) >= 2 * len(params)


@pytest.mark.parametrize("accum", [1, 2])
def test_bfloat16_gradients_are_float32(accum):
  c = config(**{"model.dtype": "bfloat16", "grad_accum_steps": accum})
  model = build_model(c.model)
  h, w = c.augment.crop_size
  params = init_params(c, abstract=True)
  batch = {"image": jax.ShapeDtypeStruct((8, h, w, 3), jnp.float32),
           "label": jax.ShapeDtypeStruct((8, h, w), jnp.int32)}
  fn = trainer.accumulated_value_and_grad(trainer.loss_fn(model, c), c)
  (loss, (terms, _)), grads = jax.eval_shape(fn, params, {}, batch, jax.random.key(0))
  assert loss.dtype == np.float32
  assert {t.dtype for t in terms.values()} == {np.dtype("float32")}
  assert set(_leaf_dtypes(grads).values()) == {np.dtype("float32")}
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  # ... while the backbone computes in bfloat16 (the head returns float32 logits).
  _, inter = jax.eval_shape(
      lambda p, x: model.apply({"params": p}, x, capture_intermediates=True,
                               mutable=["intermediates"]), params, batch["image"])
  backbone = [x.dtype for x in jax.tree.leaves(inter["intermediates"]["backbone"])
              if jnp.issubdtype(x.dtype, jnp.floating)]
  assert backbone and set(backbone) == {np.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------------------------
# The start-up memory log.

def _memory_line(log):
  lines = [m for m in log if m.startswith("memory per device")]
  assert len(lines) == 1, log
  return lines[0]


def test_memory_log_line(runs):
  line = _memory_line(runs["accum1"][2])
  # 33,975 float32 parameters = 0.13 MiB; Adam's two moments (+ counters) = 0.26 MiB. The CPU
  # backend reports the compiled sizes (no "n/a").
  assert re.fullmatch(
      r"memory per device: params 0\.13 MiB, optimizer state 0\.26 MiB \| compiled train step: "
      r"arguments \d+\.\d\d MiB, outputs \d+\.\d\d MiB, temp \d+\.\d\d MiB, total \d+\.\d\d MiB",
      line), line


def test_memory_report_without_analysis():
  class NoAnalysis:
    def memory_analysis(self):
      return None

  assert trainer.compiled_memory(NoAnalysis()) == {
      "argument": None, "output": None, "temp": None, "total": None}
  assert trainer.format_bytes(None) == "n/a"
  assert trainer.format_bytes(3 * 2**29) == "1.50 GiB"
  assert trainer.format_bytes(2**20 + 2**19) == "1.50 MiB"


def test_bytes_per_device_follows_shardings():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  tree = {"a": jax.ShapeDtypeStruct((4, 8), jnp.float32),
          "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  sh = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  assert trainer.bytes_per_device(tree, sh) == 4 * 8 * 4 + 3 * 2
