"""SegFormer through the trainer: per-pixel cross-entropy goes down on the synthetic data, the
decoder's BatchNorm statistics are trained state (updated by training steps, checkpointed,
restored bit-exactly on resume, carried into bundles) and fixed in evaluation."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from segvit_jax import bundle, checkpoint, trainer
from tests.support import read_metrics, smoke_config


def segformer_smoke(**overrides):
  c = smoke_config(**overrides)
  c.model = dict(name="segformer", num_classes=6, dtype="float32",
                 backbone=dict(variant="B0", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 2), drop_path=0.0),
                 head=dict(width=16, dropout=0.0))
  c.loss = dict(name="pixel_ce", ce_weight=1.0, avg_non_ignore=False)
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  return c


def batch_stats(workdir, step):
  _, got, state = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), step,
                                            with_model_state=True)
  assert got == step
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}


def test_segformer_trains_and_its_batch_norm_statistics_are_state(tmp_path):
  c = segformer_smoke(total_steps=20, log_every=5, ckpt_every=10, **{
      "optim.lr": 3e-3, "optim.warmup_steps": 0, "dataset.num_train": 8, "batch_size": 8,
      "augment.photometric": False, "augment.flip_prob": 0.0,
      "augment.ratio_range": (1.0, 1.0)})
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.train(c, straight)
  losses = [m["loss"] for m in read_metrics(straight)]
  assert losses[-1] < 0.8 * losses[0], losses  # measured: 1.55 -> 1.14
  assert set(read_metrics(straight)[0]) >= {"loss", "loss_ce", "grad_norm", "lr"}
  at10, at20 = batch_stats(straight, 10), batch_stats(straight, 20)
  assert at10 and set(at10) == set(at20)
  assert any(k.endswith("['mean']") for k in at10), sorted(at10)
  assert all(not np.array_equal(at10[k], at20[k]) for k in at10)  # training moved them
  # A resumed run restores the statistics with the parameters: bit-exact at step 20.
  trainer.train(c, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
  trainer.train(c, resumed)
  again = batch_stats(resumed, 20)
  for k in at20:
    np.testing.assert_array_equal(again[k], at20[k], err_msg=k)
  # Evaluation reads them and leaves them alone: a workdir loads with its statistics, and the
  # scores of one image do not change from call to call.
  model = checkpoint.load_model(straight)
  stats = model.variables["batch_stats"]
  image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
  first, second = model.predict(image), model.predict(image)
  np.testing.assert_array_equal(first, second)
  flat = {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path({"batch_stats": stats})}
  for k, v in flat.items():
    np.testing.assert_array_equal(v, at20[k], err_msg=k)
  # ... and a bundle written from it carries them (state/).
  path = bundle.save_bundle(str(tmp_path / "bundle"), model.variables["params"],
                            model.config.model, mean=c.mean, std=c.std,
                            class_names=[str(i) for i in range(6)],
                            model_state={"batch_stats": stats})
  np.testing.assert_array_equal(bundle.load_bundle(path).predict(image), first)
  # export_bundle writes them too.
  exported = str(tmp_path / "exported")
  subprocess.run([sys.executable, "-m", "segvit_jax.export_bundle", "--workdir", straight,
                  "--output", exported], check=True, capture_output=True, timeout=300,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  np.testing.assert_array_equal(bundle.load_bundle(exported).predict(image), first)
