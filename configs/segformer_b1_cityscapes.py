"""SegFormer-B1 on Cityscapes at 1024x1024: 78.5 / 80.0 mIoU single / multi-scale
(SegFormer Table 1a).

  python train.py --config configs/segformer_b1_cityscapes.py \
      --workdir runs/segformer_b1_cityscapes --config.dataset.root=/data/cityscapes
  python train.py --config configs/segformer_b1_cityscapes.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

The argument `smoke` gives common.smoke's variant (the same recipe, a tiny model). Starts from
the ImageNet MiT-B1 encoder of the release, weights/mit_b1.pth (README, "Pretrained
weights").
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}: expected '' or 'smoke'")
  c = common.run_config()
  crop = 1024  # SegFormer Sec. 4.1, "Implementation details:"

  # Cityscapes: 19 classes, 2048x1024 images (SegFormer Sec. 4.1, "Datasets:").
  c.dataset.update(name="cityscapes", root="data/cityscapes", num_classes=19,
                   reduce_zero_label=False, num_workers=8)

  # Train augmentation: resize by a ratio in [0.5, 2.0], random crop, flip (SegFormer Sec. 4.1);
  # keep-ratio base scale (2048, crop), the crop retried until no class covers > 75% of it,
  # mmseg's photometric distortion (the release's config).
  c.augment.update(
      pipeline="segvit", crop_size=(crop, crop), scale=(2048, crop), ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75, flip_prob=0.5, photometric=True, photometric_brightness=32,
      photometric_contrast=(0.5, 1.5), photometric_saturation=(0.5, 1.5), photometric_hue=18)
  # ImageNet pixel statistics (the release's config).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: the MiT-B1 encoder (SegFormer Sec. 3.1, Table 6) and the all-MLP decoder of width 256
  # (Sec. 3.2; the width: Sec. 4.2, Table 1b); drop path 0.1 and LayerNorm eps 1e-6 of the release's
  # weights: the release's config.
  c.model = common.model_config(dict(
      name="segformer", num_classes=19, dtype="float32",
      backbone=dict(variant="B1", drop_path=0.1, norm_eps=1e-6),
      head=dict(width=256, dropout=0.1)))
  c.model_init = "weights/mit_b1.pth"
  c.model_init_format = "segformer-official"

  # Loss: per-pixel cross-entropy, no OHEM, auxiliary loss or class balancing (SegFormer Sec.
  # 4.1), averaged over all pixels as mmseg 0.x (avg_non_ignore=False).
  c.loss = ml_collections.ConfigDict(dict(name="pixel_ce", ce_weight=1.0, avg_non_ignore=False))

  # Optimiser: AdamW lr 6e-5, poly power 1 (SegFormer Sec. 4.1); weight decay 0.01, none on the
  # backbone's norms, decoder lr x10, 1500 linear warm-up iterations, no clipping (the release's
  # config).
  c.optim.update(lr=6e-5, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                 no_decay=(r"^backbone/.*norm",), clip_norm=0.0, schedule="warmup_poly",
                 warmup_steps=1500, warmup_ratio=1e-6, poly_power=1.0, min_lr=0.0)
  c.optim.lr_mults = {"head": 10.0}
  c.total_steps = 160_000  # SegFormer Sec. 4.1
  c.batch_size = 8  # SegFormer Sec. 4.1

  # Test: sliding 1024 x 1024 windows (SegFormer Sec. 4.1) every 768 pixels (the release's
  # config) on the images at their (2048, 1024) size, window softmax scores averaged.
  c.eval.update(task="semantic", resize="keep_ratio", scale=(2048, crop), size_divisor=32,
                min_size=0, mode="slide", crop_size=(crop, crop), stride=(768, 768),
                average="softmax")
  return common.smoke(c) if arg == "smoke" else c
