"""EoMT-L panoptic segmentation on ADE20K at 640x640: 50.6 PQ (the EoMT release's DINOv2 model
zoo, fine-tuned from its COCO panoptic model), the recipe of its
configs/dinov2/ade20k/panoptic/eomt_large_640.yaml.

  python train.py --config configs/eomt_vit_l_ade20k_panoptic.py \
      --workdir runs/eomt_l_ade20k_panoptic --config.dataset.root=/data/ADEChallengeData2016
  python train.py --config configs/eomt_vit_l_ade20k_panoptic.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

The argument `smoke` gives common.smoke's variant (the same recipe, a tiny model). Starts from
weights/dinov2_vitl14_reg4_pretrain.pth of the DINOv2 release (README, "Pretrained
weights"), as the release's yaml does: the 14x14 patch kernel is resampled to 16x16 and the 37x37
position grid resized to 40x40 on load. The model zoo's number comes from fine-tuning its COCO
panoptic model with the class head re-initialised (`--model.load_ckpt_class_head False`);
a bundle of configs/eomt_vit_l_coco_panoptic.py cannot start this config (its class head has 133
classes).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}: expected '' or 'smoke'")
  c = common.run_config()
  crop = 640  # the release's img_size

  # ADE20K panoptic: 150 classes, 100 things and 50 stuff (Mask2Former Sec. 4, the release's
  # stuff_classes); ADEChallengeData2016 with Mask2Former's panoptic json or the release's
  # semantic + instance pngs (segvit_jax/data/ade20k_panoptic.py). At most 255 segments per
  # training image: the most a segment-index map allows beside ignore_index 255 (the release has
  # no cap; Mask2Former's json is checked against it before training starts).
  c.dataset.update(name="ade20k_panoptic", root="data/ADEChallengeData2016", num_classes=150,
                   reduce_zero_label=False, num_workers=8, max_segments=255)

  # Train augmentation (EoMT App. A.2, "Augmentation."; the release's ADE20KPanoptic defaults):
  # colour jitter, horizontal flip, scale jitter of the crop size by a factor in [0.1, 2.0], pad,
  # random crop.
  c.augment.update(pipeline="eomt", crop_size=(crop, crop), flip_prob=0.5,
                   scale_jitter=(0.1, 2.0), color_jitter=True, jitter_brightness=32 / 255,
                   jitter_contrast=0.5, jitter_saturation=0.5, jitter_hue=18 / 360)
  # ImageNet pixel statistics (DINOv2's, the release's config).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: DINOv2-L with 4 registers run at patch 16 (EoMT Sec. 4.1, "Models and training."; App.
  # A.1 "Pre-trained models."), 200 queries in the last 4 blocks (the release's yaml:
  # num_q), masked attention annealed block by block with power 0.9 (Sec. 3.3 "Mask
  # annealing.", Sec. 4.1), mixed precision (Sec. 4.1). Drop path 0: the release's config.
  c.model = common.model_config(dict(
      name="eomt", num_classes=150, num_queries=200, num_blocks=4, dtype="bfloat16",
      backbone=dict(variant="dinov2-L/14-reg4", patch_size=16, posemb_grid=(40, 40),
                    posemb_resize="bicubic_antialias", drop_path=0.0),
      # The release's windows as its yaml states them (those of its ADE20K semantic config,
      # sixths of 6 x 6520 steps, not of this run's).
      mask_annealing=dict(enabled=True, start_steps=(6520, 13040, 19560, 26080),
                          end_steps=(13040, 19560, 26080, 32600), power=0.9)))
  c.model_init = "weights/dinov2_vitl14_reg4_pretrain.pth"
  c.model_init_format = "dinov2"

  # Loss: Mask2Former's, every thing instance and stuff region a target: class cross-entropy (no-
  # object weight 0.1) and BCE + dice on 12544 importance-sampled points, weights 2 / 5 / 5, on
  # every intermediate prediction and the final one (EoMT App. A.2 "Loss function.", Eq. (2);
  # Mask2Former Sec. 3.3 and Sec. 4.1 "Loss weights."); oversample ratio 3, importance ratio 0.75:
  # the release's MaskClassificationLoss.
  c.loss = ml_collections.ConfigDict(dict(
      name="mask2former_panoptic", num_queries=200, num_points=12544, oversample_ratio=3.0,
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
  # The release's 31 epochs (max_epochs) of the 20,210 training images at batch 16:
  # 31 x ceil(20210 / 16) = 31 x 1264.
  c.total_steps = 39_184
  c.batch_size = 16  # the release's config

  # Test (EoMT App. A.3, "Image processing."): the longer side resized to the input size,
  # zero-padded to the square input; panoptic post-processing with queries kept above score 0.8
  # and segments kept if 0.8 of their own mask survives (the release's
  # MaskClassificationPanoptic), plus mask AP of the things from the top 100 (query, class)
  # detections (Mask2Former's instance inference, Sec. 4.1 "Post-processing.").
  c.eval.update(task="panoptic", resize="long_side", scale=(crop, crop), mode="spread",
                crop_size=(crop, crop), stride=(crop, crop), average="scores",
                object_mask_threshold=0.8, overlap_threshold=0.8, top_k=100, instance_ap=True,
                best_metric="PQ")
  return common.smoke(c) if arg == "smoke" else c
