"""EoMT-L semantic segmentation on Cityscapes at 1024x1024: 84.2 mIoU (EoMT Table 5).

  python train.py --config configs/eomt_vit_l_cityscapes.py --workdir runs/eomt_l_cityscapes \
      --config.dataset.root=/data/cityscapes
  python train.py --config configs/eomt_vit_l_cityscapes.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

The argument `smoke` gives common.smoke's variant (the same recipe, a tiny model). Starts from
weights/dinov2_vitl14_reg4_pretrain.pth of the DINOv2 release (README, "Pretrained
weights"): the 14x14 patch kernel is resampled to 16x16 and the 37x37 position grid resized to
64x64 on load.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}: expected '' or 'smoke'")
  c = common.run_config()
  crop = 1024  # EoMT Sec. 4.1 and Tables 3-5: the input size

  # Cityscapes: 19 classes (EoMT Sec. 4.1, "Datasets.").
  c.dataset.update(name="cityscapes", root="data/cityscapes", num_classes=19,
                   reduce_zero_label=False, num_workers=8)

  # Train augmentation (EoMT App. A.2, "Augmentation."): colour jitter, horizontal flip, scale
  # jitter of the crop size by a factor in [0.5, 2.0], pad, random crop; the jitter factors: the
  # release's Transforms.
  c.augment.update(pipeline="eomt", crop_size=(crop, crop), flip_prob=0.5,
                   scale_jitter=(0.5, 2.0), color_jitter=True, jitter_brightness=32 / 255,
                   jitter_contrast=0.5, jitter_saturation=0.5, jitter_hue=18 / 360)
  # ImageNet pixel statistics (DINOv2's, the release's config).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: DINOv2-L with 4 registers run at patch 16 (EoMT Sec. 4.1, "Models and training."; App.
  # A.1 "Pre-trained models."), 100 queries in the last 4 blocks (App. A.1 "Queries.", Table D),
  # masked attention annealed block by block with power 0.9 (Sec. 3.3 "Mask annealing.", Sec. 4.1),
  # mixed precision (Sec. 4.1). Drop path 0: the release's config.
  c.model = common.model_config(dict(
      name="eomt", num_classes=19, num_queries=100, num_blocks=4, dtype="bfloat16",
      backbone=dict(variant="dinov2-L/14-reg4", patch_size=16, posemb_grid=(64, 64),
                    posemb_resize="bicubic_antialias", drop_path=0.0),
      # The release's ViT-L windows (its config), block i annealed over the i + 1-th sixth of the
      # run.
      mask_annealing=dict(enabled=True, start_steps=(3317, 6634, 9951, 13268),
                          end_steps=(6634, 9951, 13268, 16585), power=0.9)))
  c.model_init = "weights/dinov2_vitl14_reg4_pretrain.pth"
  c.model_init_format = "dinov2"

  # Loss: Mask2Former's, one target per class present (EoMT Sec. 2, "Image segmentation."): class
  # cross-entropy (no-object weight 0.1) and BCE + dice on 12544 importance-sampled points, weights
  # 2 / 5 / 5, on every intermediate prediction and the final one (EoMT App. A.2 "Loss function.",
  # Eq. (2); Mask2Former Sec. 3.3 and Sec. 4.1 "Loss weights."); oversample ratio 3, importance
  # ratio 0.75: the release's MaskClassificationLoss.
  c.loss = ml_collections.ConfigDict(dict(
      name="mask2former", num_queries=100, num_points=12544, oversample_ratio=3.0,
      importance_ratio=0.75, no_object_weight=0.1, class_weight=2.0, mask_weight=5.0,
      dice_weight=5.0,
      # BCE and dice divided by the number of matched targets (at most num_queries per
      # image), not of all targets: the release's MaskClassificationLoss.loss_masks.
      mask_normalizer="matched_targets"))

  # Optimiser: AdamW lr 1e-4, layer-wise lr decay 0.8, poly power 0.9 (EoMT Sec. 4.1); the new
  # parameters warm up over 500 steps with the ViT at 0, then the ViT over 1000 (App. A.2
  # "Learning rate warm-up."); weight decay 0.05 on every parameter, clip 0.01 (the release's
  # config).
  c.optim.update(lr=1e-4, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, no_decay=(),
                 clip_norm=0.01, schedule="two_stage", warmup_steps=500,
                 backbone_warmup_steps=1000, poly_power=0.9, layer_decay=0.8)
  c.optim.lr_mults = {}
  # 107 epochs (EoMT Sec. 4.1) as the release counts them: 6 x 3317, the run its ViT-L annealing
  # windows split in sixths.
  c.total_steps = 19_902
  c.batch_size = 16  # the release's config

  # Test (EoMT App. A.3, "Image processing."): the shorter side resized to the crop, the longer
  # cut into ceil(long / crop) square windows with the overlap spread evenly, window scores
  # (mask probabilities x class probabilities) averaged.
  c.eval.update(task="semantic", resize="short_side", scale=(crop, crop), min_size=0,
                mode="spread", crop_size=(crop, crop), stride=(crop, crop), average="scores")
  return common.smoke(c) if arg == "smoke" else c
