"""Training end to end on the synthetic data: the loss goes down, resuming is bit-exact,
a non-finite loss stops the run and leaves the last good checkpoint intact, the logged
throughput (TFLOP/s, MFU) is the analytic FLOP count over the step time. (The best
evaluation's parameters, kept in WORKDIR/best/: tests/test_checkpoint.py.)"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from segvit_jax import flops, trainer
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
    assert "tflops" in m and "mfu" not in m  # no known peak for a CPU


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


def test_throughput_is_the_analytic_count_over_the_step_time(tmp_path, monkeypatch):
  # One training step of the smoke config: 3 x (forward) x 2 FLOPs per multiply-add x batch.
  c = smoke_config(total_steps=4, log_every=2, ckpt_every=4)
  step_flops = flops.train_step_flops(c)
  h, w = c.augment.crop_size
  assert step_flops == 6 * flops.count_model(c, h, w)["total"] * c.batch_size > 0
  # A patched peak for this CPU: the MFU is achieved / (peak x devices).
  peak = 1e-4  # TFLOP/s per device
  monkeypatch.setitem(flops.PEAK_TFLOPS, "cpu", {"float32": peak, "bfloat16": 2 * peak})
  assert flops.peak_tflops(jax.devices()[0].device_kind, "float32") == peak
  trainer.train(c, str(tmp_path))
  logged = read_metrics(tmp_path)
  assert [m["step"] for m in logged] == [2, 4]
  for m in logged:
    assert m["tflops"] == pytest.approx(step_flops * m["steps_per_s"] / 1e12, rel=1e-12)
    assert m["images_per_s"] == pytest.approx(m["steps_per_s"] * c.batch_size, rel=1e-12)
    assert m["mfu"] == pytest.approx(m["tflops"] / (peak * jax.device_count()), rel=1e-12)


def test_evaluations_during_training_reach_tensorboard(tmp_path):
  # Each evaluation during training keeps its results and pictures in WORKDIR/eval/step_N/ and
  # writes the headline numbers, the per-class IoU and the pictures to TensorBoard.
  from segvit_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  c = smoke_config(total_steps=2, ckpt_every=2, eval_every=2, **{"eval.num_pictures": 2})
  trainer.train(c, str(tmp_path), evaluate_fn=evaluate)
  step_dir = tmp_path / "eval" / "step_2"
  assert sorted(os.listdir(step_dir / "pictures")) == ["synthetic_val_000000.jpg",
                                                     "synthetic_val_000001.jpg"]
  assert (step_dir / "confusion.png").exists() and (step_dir / "eval_results.json").exists()
  records = read_metrics(tmp_path)
  names = [row["name"] for row in json.loads((step_dir / "eval_results.json").read_text())[
      "per_class"]]
  assert any(r.get("eval/mIoU") is not None for r in records)
  assert any(f"eval_class/IoU/{names[0]}" in r for r in records)
  events = b"".join(p.read_bytes() for p in (tmp_path / "tb").iterdir())
  for tag in (b"eval/mIoU", f"eval_class/IoU/{names[0]}".encode(), b"eval/confusion",
              b"eval_pictures/synthetic_val_000000", b"eval_pictures/synthetic_val_000001"):
    assert tag in events, tag


def test_per_class_scalars_leave_out_absent_classes():
  rows = [{"name": "wall", "IoU": 71.5, "Acc": float("nan")},  # no ground-truth pixel
          {"name": "person", "isthing": True, "PQ": 40.0, "AP": None}]  # no AP computed
  assert trainer.per_class_scalars({"per_class": rows}) == {
      "eval_class/IoU/wall": 71.5, "eval_class/PQ/person": 40.0}
  assert trainer.per_class_scalars({"mIoU": 1.0}) == {}
