"""EoMT through the trainer on the synthetic data: masked attention annealed by the step
(probabilities logged), Hungarian-matched Mask2Former loss on the final and every
intermediate prediction, the two-stage warm-up with layer-wise lr decay; the loss goes down,
evaluation runs the plain model (no masks, no intermediate predictions). The same on a tiny
DINOv3 ViT (RoPE with its training-time coordinate rescale, the release's DINOv3 recipe: the
query blocks without layer decay, the first block annealed from step 0)."""

import numpy as np

from segvit_jax import checkpoint, trainer
from segvit_jax.evaluation import evaluate
from segvit_jax.models import eomt
from tests.support import read_metrics, smoke_config


def eomt_smoke(**overrides):
  c = smoke_config(**overrides)
  # demo smoke data (32 px synthetic, 6 classes); a 4-block DINOv2-style ViT at patch 8 with
  # registers and LayerScale, queries in the last 2 blocks.
  c.model = dict(
      name="eomt", num_classes=6, num_queries=8, num_blocks=2, dtype="float32",
      backbone=dict(variant="dinov2-S/14-reg4", width=32, depth=4, num_heads=2, mlp_dim=64,
                    patch_size=8, posemb_grid=(4, 4), posemb_resize="bicubic_antialias"),
      mask_annealing=dict(enabled=True, start_steps=(8, 16), end_steps=(16, 24), power=0.9))
  c.loss = dict(name="mask2former", num_queries=8, num_points=256, oversample_ratio=3.0,
                importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0,
                mask_weight=5.0, dice_weight=5.0, mask_normalizer="matched_targets")
  c.optim.update(schedule="two_stage", weight_decay=0.05, no_decay=(), clip_norm=1.0,
                 warmup_steps=2, backbone_warmup_steps=2, poly_power=0.9, layer_decay=0.8)
  c.optim.lr_mults = {}
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  c.eval.update(mode="spread", resize="short_side", scale=(32, 32), crop_size=(32, 32),
                average="scores")
  return c


def test_small_eomt_trains_with_annealed_masked_attention(tmp_path):
  c = eomt_smoke(total_steps=40, log_every=8, ckpt_every=40, **{
      "optim.lr": 3e-3, "dataset.num_train": 8, "batch_size": 8,
      "augment.photometric": False, "augment.flip_prob": 0.0,
      "augment.ratio_range": (1.0, 1.0)})
  trainer.train(c, str(tmp_path))
  metrics = read_metrics(tmp_path)
  losses = [m["loss"] for m in metrics]
  assert losses[-1] < 0.8 * losses[0], losses  # measured: 26.1 -> 17.3
  # Final and both intermediate predictions are supervised.
  assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_dice_1"} <= set(metrics[0])
  # Masking probabilities follow the windows (block 0 over steps 8..16, block 1 over 16..24),
  # logged with the metrics of the batch at 0-based step t = logged step - 1.
  for m in metrics:
    want = eomt.mask_annealing(m["step"] - 1, (8, 16), (16, 24), 0.9)
    np.testing.assert_allclose((m["mask_probs_0"], m["mask_probs_1"]), want, rtol=1e-6)
  assert (metrics[0]["mask_probs_0"], metrics[-1]["mask_probs_1"]) == (1.0, 0.0)
  # Evaluation: the plain model on the held-out synthetic split.
  model = checkpoint.load_model(str(tmp_path))
  out = model.model.apply(model.variables, np.zeros((1, 32, 32, 3), np.float32))
  assert out["aux_outputs"] == []
  results = evaluate(model.model, model.variables, c)
  assert 0.0 <= results["mIoU"] <= 100.0


def test_small_eomt_dinov3_trains(tmp_path):
  c = eomt_smoke(total_steps=24, log_every=4, ckpt_every=24, **{
      "optim.lr": 3e-3, "dataset.num_train": 8, "batch_size": 8,
      "augment.photometric": False, "augment.flip_prob": 0.0,
      "augment.ratio_range": (1.0, 1.0)})
  # 4 DINOv3 blocks of width 32 at patch 8 (2 heads of 16: RoPE needs head_dim % 4 == 0),
  # 4 registers, no position table; RoPE rescale 2.0 in training (the family default).
  c.model.backbone = dict(variant="dinov3-S/16", width=32, depth=4, num_heads=2, mlp_dim=64,
                          patch_size=8)
  c.model.mask_annealing.update(start_steps=(0, 12), end_steps=(6, 18))
  c.optim.layer_decay_skip_last = 2  # the query blocks at the full lr
  trainer.train(c, str(tmp_path))
  metrics = read_metrics(tmp_path)
  losses = [m["loss"] for m in metrics]
  assert losses[-1] < 0.85 * losses[0], losses  # measured: 29.5 -> 22.2 (0.75)
  for m in metrics:
    want = eomt.mask_annealing(m["step"] - 1, (0, 12), (6, 18), 0.9)
    np.testing.assert_allclose((m["mask_probs_0"], m["mask_probs_1"]), want, rtol=1e-6)
  model = checkpoint.load_model(str(tmp_path))
  backbone = model.variables["params"]["backbone"]
  assert "pos_embedding" not in backbone and backbone["registers"].shape[-2:] == (4, 32)
  # The plain model at a non-square size (RoPE computed for the 4 x 6 grid).
  out = model.model.apply(model.variables, np.zeros((1, 32, 48, 3), np.float32))
  assert out["aux_outputs"] == [] and out["mask_logits"].shape == (1, 8, 8, 12)
