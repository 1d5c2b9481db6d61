"""EoMT-L on DINOv3 semantic segmentation on ADE20K at 512x512: 59.5 mIoU (the EoMT release's
DINOv3 model zoo, model_zoo/dinov3.md; its configs/dinov3/ade20k/semantic/eomt_large_512.yaml).

  python train.py --config configs/eomt_dinov3_vit_l_ade20k.py \
      --workdir runs/eomt_dinov3_l_ade20k --config.dataset.root=/data/ADEChallengeData2016
  python train.py --config configs/eomt_dinov3_vit_l_ade20k.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

The argument `smoke` gives common.smoke's variant (the same recipe, a tiny model). Starts from
weights/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth of the DINOv3 release (README, "Pretrained
weights"; the release's config names the same weights as facebook/dinov3-vitl16-pretrain-lvd1689m):
patch 16 and rotary position embeddings, so nothing is resampled on load.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}: expected '' or 'smoke'")
  c = common.run_config()
  crop = 512  # the release's ADE20KSemantic img_size

  # ADE20K: 150 classes (EoMT Sec. 4.1, "Datasets."), label 0 ("other") ignored (mmseg's
  # ADE20KDataset, reduce_zero_label).
  c.dataset.update(name="ade20k", root="data/ADEChallengeData2016", num_classes=150,
                   reduce_zero_label=True, num_workers=8)

  # Train augmentation (EoMT App. A.2, "Augmentation."; the release's ADE20KSemantic defaults):
  # colour jitter, horizontal flip, scale jitter of the crop size by a factor in [0.5, 2.0], pad,
  # random crop; the jitter factors: the release's Transforms.
  c.augment.update(pipeline="eomt", crop_size=(crop, crop), flip_prob=0.5,
                   scale_jitter=(0.5, 2.0), color_jitter=True, jitter_brightness=32 / 255,
                   jitter_contrast=0.5, jitter_saturation=0.5, jitter_hue=18 / 360)
  # ImageNet pixel statistics (the release's ViT, for DINOv2 and DINOv3 alike).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: DINOv3 ViT-L/16 (4 registers, LayerScale, RoPE with the training-time coordinate
  # rescale 2.0 of its transformers config, which the release trains with), 100 queries in the
  # last 4 blocks (its config; the release's EoMT default num_blocks 4), masked attention
  # annealed block by block with power 0.9 (EoMT Sec. 3.3 "Mask annealing."), mixed precision
  # (the release's 16-mixed). Drop path 0: transformers' DINOv3 default, which the release keeps.
  c.model = common.model_config(dict(
      name="eomt", num_classes=150, num_queries=100, num_blocks=4, dtype="bfloat16",
      backbone=dict(variant="dinov3-L/16", drop_path=0.0),
      # The release's windows (its config): the first query block annealed over the first 3000
      # steps, the others over consecutive 3260-step windows from step 6520.
      mask_annealing=dict(enabled=True, start_steps=(0, 6520, 9780, 13040),
                          end_steps=(3000, 9780, 13040, 16300), power=0.9)))
  c.model_init = "weights/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
  c.model_init_format = "dinov3"

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

  # Optimiser (the release's config and LightningModule): AdamW lr 2e-4, weight decay 0.05 on
  # every parameter, clip 0.01; no layer-wise lr decay (`llrd: 1.0`; its `lr_mult: 0.1` changes
  # nothing: configure_optimizers applies lr_mult in an elif branch under the same condition as
  # the llrd branch before it, so every parameter trains at 2e-4); the new parameters warm up
  # over 2000 steps with the ViT at 0, then the ViT over 3000 (`warmup_steps: [2000, 3000]`);
  # poly 0.9.
  c.optim.update(lr=2e-4, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8, no_decay=(),
                 clip_norm=0.01, schedule="two_stage", warmup_steps=2000,
                 backbone_warmup_steps=3000, poly_power=0.9, layer_decay=None,
                 layer_decay_skip_last=0)
  c.optim.lr_mults = {}
  # 16 epochs (max_epochs 16) of ADE20K's 20,210 training images in batches of 16, the last
  # partial batch dropped: 16 x 1,263, the steps the release's trainer counts.
  c.total_steps = 20_208
  c.batch_size = 16  # the release's config

  # Test (EoMT App. A.3, "Image processing."): the shorter side resized to the crop, the longer
  # cut into ceil(long / crop) square windows with the overlap spread evenly, window scores
  # (mask probabilities x class probabilities) averaged.
  c.eval.update(task="semantic", resize="short_side", scale=(crop, crop), min_size=0,
                mode="spread", crop_size=(crop, crop), stride=(crop, crop), average="scores")
  return common.smoke(c) if arg == "smoke" else c
