"""The training progress line: one line of at most 150 characters with absl's prefix (step /
total, loss, the final prediction's loss terms, lr, steps/s, ETA), the first one at the run's
first step, and a speed that leaves out the time of saves and in-training evaluations."""

import logging as py_logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from segvit_jax import trainer
from segvit_jax.data import pipeline
from segvit_jax.models import build_model
from tests.support import read_metrics, smoke_config

# absl's prefix of a console line: "I1202 06:23:15.035249 140317087267712 trainer.py:673] ".
ABSL_PREFIX = 54
MAX_LINE = 150


def mask2former_smoke():
  """configs/demo.py:eomt (EoMT, Mask2Former loss) at the smoke variant's sizes."""
  c = demo.get_config("eomt")
  c.dataset.update(image_size=32)
  c.augment.update(crop_size=(32, 32), scale=(128, 32))
  c.model.num_queries = c.loss.num_queries = 8
  c.model.backbone.update(width=32, num_heads=2, mlp_dim=64, posemb_grid=(4, 4))
  return c


def segformer_smoke():
  c = smoke_config()
  c.model = dict(name="segformer", num_classes=6, dtype="float32",
                 backbone=dict(variant="B0", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 2), drop_path=0.0),
                 head=dict(width=16, dropout=0.0))
  c.loss = dict(name="pixel_ce", ce_weight=1.0, avg_non_ignore=False)
  return c


def loss_term_names(config) -> list[str]:
  """The loss terms a train step of `config` logs, from shapes (traced, nothing compiles)."""
  model = build_model(config.model)
  dummy = jnp.zeros(trainer.input_shape(config), jnp.float32)
  variables = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), dummy)))
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, *shape), dtype)
           for k, (shape, dtype) in pipeline.train_batch_spec(config).items()}
  _, (terms, _) = jax.eval_shape(
      trainer.loss_fn(model, config), variables["params"], trainer.model_state_of(variables),
      batch, jax.random.key(0), jnp.zeros((), jnp.int32))
  return sorted(terms)


@pytest.fixture(scope="module")
def term_names():
  return {"atm": loss_term_names(smoke_config()),
          "mask2former": loss_term_names(mask2former_smoke()),
          "segformer": loss_term_names(segformer_smoke())}


def fake_scalars(names, value):
  return {"loss": 10 * value, "loss_avg": 10 * value, **{k: value for k in names},
          "grad_norm": 123.4,
          "lr": 5.97e-5, "steps_per_s": 0.25, "images_per_s": 4.0, "tflops": 1.5, "mfu": 0.4}


def test_the_line_shows_the_final_prediction_terms_only(term_names):
  # Every term of the smoke configs: the auxiliary predictions' too (what metrics.jsonl holds).
  assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_0"} <= set(
      term_names["atm"])
  assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0"} <= set(term_names["mask2former"])
  assert term_names["segformer"] == ["loss_ce"]
  want = {"atm": ["ce", "mask", "dice"], "mask2former": ["ce", "mask", "dice"],
          "segformer": ["ce"]}
  for name, names in term_names.items():  # names sorted, as a step's metrics arrive
    assert list(trainer.headline_terms(fake_scalars(names, 1.0))) == want[name]
  line = trainer.progress_line(100, 3000, {"loss": 3.4561, "loss_ce": 0.1234,
                                           "loss_mask": 1.234, "loss_dice": 0.4567,
                                           "loss_ce_0": 9.0, "grad_norm": 2.0,
                                           "lr": 6e-4}, 5.234)
  assert line == ("step 100/3000 | loss 3.456 (ce 0.12 mask 1.23 dice 0.46) | lr 0.0006 | "
                  "5.23 steps/s ETA 9m14s")  # 2900 / 5.234 = 554 s


@pytest.mark.parametrize("total,loss,term,speed", [
    (3000, 123.45, 12.345, 0.25),  # a 3000-step schedule, wide numbers (ETA 3h20m at step 1)
    (160000, 34.5, 1.234, 0.9)])  # the papers' longest (ADE20K 160k), ETA 49h22m at step 1
def test_the_line_fits_150_characters_with_absl_prefix(term_names, total, loss, term, speed):
  for name, names in term_names.items():
    for step in (1, total // 2, total):
      line = trainer.progress_line(step, total, {**fake_scalars(names, term), "loss": loss},
                                   speed)
      assert "\n" not in line
      assert ABSL_PREFIX + len(line) <= MAX_LINE, (name, len(line), line)
      assert "grad_norm" not in line and "_0" not in line and "avg" not in line


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class Records:
  """A MetricsWriter that keeps the records."""

  def __init__(self):
    self.records = []

  def write(self, step, scalars):
    self.records.append({"step": step, **scalars})


class SlowCheckpointer:
  def __init__(self, clock, seconds):
    self.clock, self.seconds, self.saved = clock, seconds, []
    self.directory = "/nowhere"

  def save(self, step, state, data_iter):
    self.clock.now += self.seconds
    self.saved.append(step)

  def latest_step(self):
    return self.saved[-1] if self.saved else None


def test_saves_and_evaluations_stay_out_of_the_speed(monkeypatch, caplog):
  # trainer.train's loop order with a fake clock: a step takes 0.5 s, a save 30 s and an
  # evaluation 60 s. Counted in, the window after an evaluation would read 2 / 91 steps/s.
  clock = FakeClock()
  monkeypatch.setattr(trainer.time, "perf_counter", clock)
  c = smoke_config(total_steps=8, log_every=2, ckpt_every=4, eval_every=4)

  def evaluate_fn(model, variables, config, **kwargs):
    clock.now += 60.0
    return {"mIoU": 50.0}

  writer, ckpt = Records(), SlowCheckpointer(clock, 30.0)
  loop = trainer.Loop(c, 0, model=None, mesh=None, ckpt=ckpt, writer=writer,
                      utilisation=trainer.Utilisation(10**9, None, 1), evaluate_fn=evaluate_fn)
  state = trainer.TrainState(step=jnp.int32(0), params={"w": jnp.zeros(2)}, opt_state=())
  caplog.set_level(py_logging.INFO)
  for step in range(1, c.total_steps + 1):
    clock.now += 0.5
    metrics = {"loss": np.float32(step), "loss_ce": np.float32(1.0), "loss_ce_0": np.float32(1),
               "grad_norm": np.float32(1.0), "lr": np.float32(1e-3), "nonfinite": np.int32(0)}
    loop.queue_loss(step, metrics)
    logs, saves = loop.logs(step), trainer.is_due(step, c.ckpt_every, c.total_steps)
    if logs or saves:
      loop.check_pending_loss()
    if logs:
      loop.log(step, metrics)
    if saves:
      loop.save(step, state, None)
    if loop.evaluates(step):
      loop.evaluate(step, state)
  assert ckpt.saved == [4, 8]
  # Step 1 is shown at once but not recorded: the records are those of log_every.
  train = [r for r in writer.records if "loss" in r]  # and the evaluations' "eval/mIoU"
  assert [r["step"] for r in train] == [2, 4, 6, 8]
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
  assert [int(l.split()[1].split("/")[0]) for l in lines if "steps/s" in l] == [1, 2, 4, 6, 8]
  speeds = [r["steps_per_s"] for r in train]
  np.testing.assert_allclose(speeds, 2.0, rtol=0, atol=1e-9)  # max abs difference 0 measured
  assert all("| 2 steps/s ETA" in l for l in lines if "steps/s" in l)
  assert lines[0] == "step 1/8 | loss 1 (ce 1.00) | lr 0.001 | 2 steps/s ETA 0m03s"
  # The window's mean loss still holds step 1's loss (the first line records nothing).
  assert [r["loss_avg"] for r in train] == [1.5, 3.5, 5.5, 7.5]


def test_train_shows_step_1_and_a_slow_evaluation_keeps_the_speed(tmp_path, monkeypatch,
                                                                   caplog):
  # The real loop: evaluations of 1.5 s and saves of 1 s more every 2 steps. Counted in, each
  # window after the first would read below 2 / 2.5 = 0.8 steps/s.
  original_save = trainer.checkpoint.Checkpointer.save

  def slow_save(self, *args, **kwargs):
    time.sleep(1.0)
    return original_save(self, *args, **kwargs)

  def slow_evaluate(model, variables, config, **kwargs):
    time.sleep(1.5)
    return {"mIoU": 1.0}

  monkeypatch.setattr(trainer.checkpoint.Checkpointer, "save", slow_save)
  c = smoke_config(total_steps=6, log_every=2, ckpt_every=2, eval_every=2)
  c.eval.best_metric = ""
  caplog.set_level(py_logging.INFO)
  trainer.train(c, str(tmp_path), evaluate_fn=slow_evaluate)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
  speeds = [r["steps_per_s"] for r in records if "loss" in r]
  # The records still hold every scalar the line leaves out.
  assert {"loss_ce_0", "loss_mask_0", "loss_dice_0", "loss_avg", "grad_norm", "images_per_s",
          "tflops"} <= set([r for r in records if "loss" in r][-1])
  assert min(speeds[1:]) > 1.0, speeds  # measured 22-30 (0.72 with them counted in)
  steps = [m.split()[1] for m in (r.getMessage() for r in caplog.records)
           if m.startswith("step ") and "steps/s" in m]
  assert steps == ["1/6", "2/6", "4/6", "6/6"]
