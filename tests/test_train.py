"""Training end to end on the synthetic data: the loss goes down, resuming is bit-exact,
a non-finite loss stops the run and leaves the last good checkpoint intact, the best
evaluation's parameters are kept in WORKDIR/best/ (across resumes and crashes)."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from segvit_jax import bundle, trainer
from tests.support import flat_params, read_metrics, smoke_config


def test_loss_goes_down(tmp_path):
  # Fixed batch of synthetic images, learning rate high enough to see progress in 30 steps.
  c = smoke_config(total_steps=30, log_every=5, ckpt_every=30, **{
      "optim.lr": 2e-3, "optim.warmup_steps": 0, "dataset.num_train": 8, "batch_size": 8,
      "augment.photometric": False, "augment.flip_prob": 0.0,
      "augment.ratio_range": (1.0, 1.0)})
  trainer.train(c, str(tmp_path))
  losses = [m["loss"] for m in read_metrics(tmp_path)]
  assert len(losses) == 6
  assert losses[-1] < 0.85 * losses[0], losses  # measured: 8.88 -> 7.10
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  for m in read_metrics(tmp_path):
    assert {"step", "loss", "lr", "grad_norm", "images_per_s", "loss_ce", "loss_mask",
            "loss_dice", "loss_ce_0"} <= set(m)


def test_resume_is_bit_exact(tmp_path):
  c = smoke_config(total_steps=6, ckpt_every=3)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train(c, straight)
  trainer.train(c, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # "crash" after step 3's save
  trainer.train(c, resumed)
  a, b = flat_params(straight, 6), flat_params(resumed, 6)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The resumed run logged steps 4..6 again with the same losses.
  logged = {m["step"]: m["loss"] for m in read_metrics(straight)}
  relogged = [m for m in read_metrics(resumed) if m["step"] > 3][-2:]
  assert [m["loss"] for m in relogged] == [logged[m["step"]] for m in relogged]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
  c = smoke_config(total_steps=3, ckpt_every=3)
  trainer.train(c, str(tmp_path))
  good = flat_params(tmp_path, 3)
  bad = smoke_config(total_steps=6, ckpt_every=1, std=(0.0, 0.0, 0.0))  # inf / nan pixels
  with pytest.raises(trainer.NonFiniteLossError, match=r"non-finite loss \(nan\) at step 4.*"
                     r"last good checkpoint \(3\)"):
    trainer.train(bad, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [3]
  after = flat_params(tmp_path, 3)
  for k in good:
    np.testing.assert_array_equal(good[k], after[k])


# --- The best evaluation's parameters, kept in WORKDIR/best/ ---


def scripted_evaluate(values):
  """A stand-in for `segvit_jax.evaluation.evaluate` returning `values` as mIoU, one per call."""
  values = list(values)

  def evaluate_fn(model, variables, config):
    del model, variables, config
    v = values.pop(0)
    return {"mIoU": v, "mAcc": v + 1.0, "aAcc": v + 2.0, "per_class": {}}

  return evaluate_fn


def logged_evals(workdir):
  return {m["step"]: m["eval/mIoU"] for m in read_metrics(workdir) if "eval/mIoU" in m}


def read_best_json(workdir):
  with open(os.path.join(workdir, "best.json")) as f:
    return json.load(f)


def assert_same_params(a, b):
  flat = lambda p: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(p)}
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_is_improvement():
  assert trainer.is_improvement(10.0, None)
  assert trainer.is_improvement(30.0, 10.0)
  assert not trainer.is_improvement(10.0, 10.0)  # strictly greater
  assert not trainer.is_improvement(9.9, 10.0)
  assert not trainer.is_improvement(float("nan"), None)  # NaN never wins
  assert not trainer.is_improvement(float("nan"), 10.0)
  assert trainer.is_improvement(-5.0, None)


def test_best_kept_across_resume(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  workdir = str(tmp_path)
  c = smoke_config(total_steps=6, ckpt_every=2, eval_every=2, keep_ckpts=10)
  trainer.train(c, workdir, evaluate_fn=scripted_evaluate([10.0, 30.0, 20.0]))
  assert logged_evals(workdir) == {2: 10.0, 4: 30.0, 6: 20.0}
  assert read_best_json(workdir) == {"step": 4, "metric": "mIoU", "value": 30.0}
  best = bundle.load_model(os.path.join(workdir, "best"))
  assert best.config.step == 4 and best.config.best.value == 30.0
  assert list(best.config.class_names) == bundle.load_model(workdir).config.class_names
  at_4 = bundle.load_model(workdir, step=4).variables["params"]
  assert_same_params(best.variables["params"], at_4)
  at_6 = bundle.load_model(workdir, step=6).variables["params"]
  assert not all(np.array_equal(a, b)  # steps 5 and 6 moved the parameters
                 for a, b in zip(jax.tree.leaves(at_4), jax.tree.leaves(at_6)))
  messages = [r.getMessage() for r in caplog.records]
  assert f"new best mIoU 10.00 at step 2 (was none): wrote {workdir}/best" in messages
  assert f"new best mIoU 30.00 at step 4 (was 10.00 at step 2): wrote {workdir}/best" in messages
  assert "mIoU 20.00 at step 6: best stays 30.00 at step 4" in messages
  assert sorted(os.listdir(workdir)) == [  # no best.tmp / best.old left behind
      "best", "best.json", "checkpoints", "classes.txt", "config.json", "metrics.jsonl", "tb"]

  # Resumed with more steps: 25 at step 8 would beat a fresh run's empty record; the record read
  # back from best.json (30 at step 4) keeps best/.
  c = smoke_config(total_steps=8, ckpt_every=2, eval_every=2, keep_ckpts=10)
  trainer.train(c, workdir, evaluate_fn=scripted_evaluate([25.0]))
  assert logged_evals(workdir) == {2: 10.0, 4: 30.0, 6: 20.0, 8: 25.0}
  assert read_best_json(workdir) == {"step": 4, "metric": "mIoU", "value": 30.0}
  assert_same_params(bundle.load_params(os.path.join(workdir, "best")), at_4)


def keeper_kwargs():
  return dict(model_cfg={"name": "tiny"}, mean=(0.0,) * 3, std=(1.0,) * 3,
              class_names=["a", "b"], source="test")


def test_best_swap_crash_keeps_previous_best(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  best_dir = os.path.join(workdir, "best")
  keeper = trainer.BestKeeper(workdir, "mIoU", **keeper_kwargs())
  assert keeper.update(1, {"mIoU": 5.0}, lambda: ({"w": np.full(3, 1.0)}, {}))

  # The swap fails (os.replace raises): best/ and best.json still describe step 1.
  real_replace = os.replace

  def failing_replace(src, dst):
    if src.endswith("best.tmp"):
      raise OSError("simulated crash while swapping in best/")
    real_replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="simulated crash"):
    keeper.update(2, {"mIoU": 7.0}, lambda: ({"w": np.full(3, 2.0)}, {}))
  monkeypatch.undo()
  np.testing.assert_array_equal(bundle.load_params(best_dir)["w"], np.full(3, 1.0))
  assert read_best_json(workdir)["step"] == 1

  # A process killed between the two renames: best/ aside in best.old/, best.tmp/ half written.
  os.replace(best_dir, best_dir + ".old")
  shutil.rmtree(best_dir + ".tmp")  # what the failed swap above left
  os.makedirs(best_dir + ".tmp/params")
  keeper = trainer.BestKeeper(workdir, "mIoU", **keeper_kwargs())
  assert keeper.best == {"step": 1, "metric": "mIoU", "value": 5.0}
  assert sorted(os.listdir(workdir)) == ["best", "best.json"]
  np.testing.assert_array_equal(bundle.load_params(best_dir)["w"], np.full(3, 1.0))
  assert not keeper.update(3, {"mIoU": float("nan")}, lambda: pytest.fail("gathered params"))
  assert keeper.update(3, {"mIoU": 6.0}, lambda: ({"w": np.full(3, 3.0)}, {}))
  np.testing.assert_array_equal(bundle.load_params(best_dir)["w"], np.full(3, 3.0))
  assert read_best_json(workdir) == {"step": 3, "metric": "mIoU", "value": 6.0}

  # Killed after the swap, before best.json: the bundle's own record wins on restart.
  with open(os.path.join(workdir, "best.json"), "w") as f:
    json.dump({"step": 1, "metric": "mIoU", "value": 5.0}, f)
  assert trainer.BestKeeper(workdir, "mIoU", **keeper_kwargs()).best["step"] == 3
  assert read_best_json(workdir)["step"] == 3
  # Another metric's record is not compared with.
  assert trainer.BestKeeper(workdir, "mAcc", **keeper_kwargs()).best is None
