"""Checkpoint plumbing: the best evaluation's parameters kept in WORKDIR/best/ (across resumes
and crashes: the atomic directory swap), the data-iterator process count of a checkpoint, and
`load_model` of a bundle or a workdir."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

import segvit_jax
from segvit_jax import bundle, checkpoint, trainer
from tests.support import read_metrics, smoke_config


# --- The best evaluation's parameters, kept in WORKDIR/best/ ---


def scripted_evaluate(values):
  """A stand-in for `segvit_jax.evaluation.evaluate` returning `values` as mIoU, one per call."""
  values = list(values)

  def evaluate_fn(model, variables, config, **kwargs):
    del model, variables, config, kwargs
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
  assert checkpoint.is_improvement(10.0, None)
  assert checkpoint.is_improvement(30.0, 10.0)
  assert not checkpoint.is_improvement(10.0, 10.0)  # strictly greater
  assert not checkpoint.is_improvement(9.9, 10.0)
  assert not checkpoint.is_improvement(float("nan"), None)  # NaN never wins
  assert not checkpoint.is_improvement(float("nan"), 10.0)
  assert checkpoint.is_improvement(-5.0, None)


def test_best_kept_across_resume(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  workdir = str(tmp_path)
  c = smoke_config(total_steps=6, ckpt_every=2, eval_every=2, keep_ckpts=10)
  trainer.train(c, workdir, evaluate_fn=scripted_evaluate([10.0, 30.0, 20.0]))
  assert logged_evals(workdir) == {2: 10.0, 4: 30.0, 6: 20.0}
  assert read_best_json(workdir) == {"step": 4, "metric": "mIoU", "value": 30.0}
  best = checkpoint.load_model(os.path.join(workdir, "best"))
  assert best.config.step == 4 and best.config.best.value == 30.0
  assert list(best.config.class_names) == checkpoint.load_model(workdir).config.class_names
  at_4 = checkpoint.load_model(workdir, step=4).variables["params"]
  assert_same_params(best.variables["params"], at_4)
  at_6 = checkpoint.load_model(workdir, step=6).variables["params"]
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
  keeper = checkpoint.BestKeeper(workdir, "mIoU", **keeper_kwargs())
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
  keeper = checkpoint.BestKeeper(workdir, "mIoU", **keeper_kwargs())
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
  assert checkpoint.BestKeeper(workdir, "mIoU", **keeper_kwargs()).best["step"] == 3
  assert read_best_json(workdir)["step"] == 3
  # Another metric's record is not compared with.
  assert checkpoint.BestKeeper(workdir, "mAcc", **keeper_kwargs()).best is None


def test_replace_dir_swaps_and_recover_dir_undoes_a_crash(tmp_path):
  dst = str(tmp_path / "d")
  for name, content in (("d", "old"), ("d.tmp", "new")):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "f").write_text(content)
  checkpoint.replace_dir(dst + ".tmp", dst)
  assert sorted(os.listdir(tmp_path)) == ["d"] and (tmp_path / "d" / "f").read_text() == "new"
  # Killed between the two renames: dst missing, the old one aside, a half-written tmp.
  os.replace(dst, dst + ".old")
  os.makedirs(dst + ".tmp")
  checkpoint.recover_dir(dst)
  assert sorted(os.listdir(tmp_path)) == ["d"] and (tmp_path / "d" / "f").read_text() == "new"
  checkpoint.write_json(str(tmp_path / "r.json"), {"step": 3})
  assert json.loads((tmp_path / "r.json").read_text()) == {"step": 3}
  assert sorted(os.listdir(tmp_path)) == ["d", "r.json"]  # no r.json.tmp left


def test_saved_process_count(tmp_path):
  root = str(tmp_path)
  assert checkpoint.saved_process_count(root, 4) is None  # no iterator state
  os.makedirs(tmp_path / "4" / "data")
  for i in range(2):
    (tmp_path / "4" / "data" / f"process_{i}-of-2.json").write_text("{}")
  assert checkpoint.saved_process_count(root, 4) == 2
  (tmp_path / "4" / "data" / "process_0-of-1.json").write_text("{}")
  with pytest.raises(ValueError, match=r"mixes iterator states of \[1, 2\] processes"):
    checkpoint.saved_process_count(root, 4)


def test_load_model_names_what_it_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected a model bundle .* or a training workdir"):
    checkpoint.load_model(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
  with pytest.raises(ValueError, match="neither a bundle nor a training config"):
    checkpoint.load_model(str(tmp_path))
  assert segvit_jax.load_model is checkpoint.load_model


def test_the_package_exports_its_names_on_first_use():
  """`segvit_jax`'s names are imported lazily (its __init__): each resolves to the module's own
  object, `__all__` lists them all, and an unknown name is an AttributeError."""
  from segvit_jax import bundle  # pylint: disable=g-import-not-at-top
  assert sorted(segvit_jax.__all__) == sorted(segvit_jax._EXPORTS)  # pylint: disable=protected-access
  for name in segvit_jax.__all__:
    module = bundle if name != "load_model" else checkpoint
    assert getattr(segvit_jax, name) is getattr(module, name), name
    assert name in dir(segvit_jax)
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    segvit_jax.nope  # pylint: disable=pointless-statement
