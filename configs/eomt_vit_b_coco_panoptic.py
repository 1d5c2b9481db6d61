"""EoMT-B panoptic segmentation on COCO at 640x640: 50.6 PQ (EoMT Table 3); with the argument
`2x`, the release's 2x schedule (its configs/dinov2/coco/panoptic/eomt_base_640_2x.yaml): 51.6 PQ
(its model zoo, model_zoo/dinov2.md).

  python train.py --config configs/eomt_vit_b_coco_panoptic.py --workdir runs/eomt_b_coco_panoptic \
      --config.dataset.root=/data/coco
  python train.py --config configs/eomt_vit_b_coco_panoptic.py:2x \
      --workdir runs/eomt_b_coco_panoptic_2x --config.dataset.root=/data/coco
  python train.py --config configs/eomt_vit_b_coco_panoptic.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

The argument `smoke` (also `2x,smoke`) gives common.smoke's variant (the same recipe, a tiny
model). Starts from weights/dinov2_vitb14_reg4_pretrain.pth of the DINOv2 release (README,
"Pretrained weights"): the 14x14 patch kernel is resampled to 16x16 and the 37x37 position grid
resized to 40x40 on load.
"""

import ml_collections

from configs import common

# The release's annealing windows (configs/dinov2/coco/panoptic/eomt_base_640.yaml and
# eomt_base_640_2x.yaml) by the number of epochs.
STARTS = {12: (14782, 36955, 59128), 24: (29564, 73910, 118256)}
ENDS = {12: (29564, 51737, 73910), 24: (59128, 103474, 147820)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  parts = [p for p in arg.split(",") if p]
  if any(p not in ("2x", "smoke") for p in parts):
    raise ValueError(f"unknown config argument {arg!r}: expected '', '2x', 'smoke' or "
                     "'2x,smoke'")
  epochs = 24 if "2x" in parts else 12  # EoMT Sec. 4.1; the 2x yaml: max_epochs 24
  c = common.run_config()
  crop = 640  # EoMT Sec. 4.1 and Tables 3-5: the input size

  # COCO panoptic: 133 classes, 80 things and 53 stuff (EoMT Sec. 4.1, "Datasets."; Mask2Former
  # Table 1); at most 100 segments per training image (crowd dropped; training checks the json
  # against it before it starts).
  c.dataset.update(name="coco_panoptic", root="data/coco", num_classes=133,
                   reduce_zero_label=False, num_workers=8, max_segments=100)

  # Train augmentation (EoMT App. A.2, "Augmentation."): horizontal flip, scale jitter of the crop
  # size by a factor in [0.1, 2.0], pad, random crop; no colour jitter on COCO.
  c.augment.update(pipeline="eomt", crop_size=(crop, crop), flip_prob=0.5,
                   scale_jitter=(0.1, 2.0), color_jitter=False, jitter_brightness=32 / 255,
                   jitter_contrast=0.5, jitter_saturation=0.5, jitter_hue=18 / 360)
  # ImageNet pixel statistics (DINOv2's, the release's config).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: DINOv2-B with 4 registers run at patch 16 (EoMT Sec. 4.1, "Models and training."; App.
  # A.1 "Pre-trained models."), 200 queries in the last 3 blocks (App. A.1 "Queries.", Table D),
  # masked attention annealed block by block with power 0.9 (Sec. 3.3 "Mask annealing.", Sec. 4.1),
  # mixed precision (Sec. 4.1). Drop path 0: the release's config.
  c.model = common.model_config(dict(
      name="eomt", num_classes=133, num_queries=200, num_blocks=3, dtype="bfloat16",
      backbone=dict(variant="dinov2-B/14-reg4", patch_size=16, posemb_grid=(40, 40),
                    posemb_resize="bicubic_antialias", drop_path=0.0),
      # The release's windows for this size (its eomt_base_640[_2x].yaml): a sixth of the run
      # each, starting at 1, 2.5 and 4 sixths.
      mask_annealing=dict(enabled=True, start_steps=STARTS[epochs], end_steps=ENDS[epochs],
                          power=0.9)))
  c.model_init = "weights/dinov2_vitb14_reg4_pretrain.pth"
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
  # 12 (2x: 24) epochs of the 118,287 train2017 images (EoMT Sec. 4.1): 12 x 7,391 = 6 x 14,782,
  # the run the release's annealing windows split in sixths (2x: 6 x 29,564).
  c.total_steps = 7_391 * epochs
  c.batch_size = 16  # the release's config

  # Test (EoMT App. A.3, "Image processing."): the longer side resized to the input size,
  # zero-padded to the square input; panoptic post-processing with queries kept above score 0.8
  # and segments kept if 0.8 of their own mask survives (the release's config), plus COCO mask
  # AP of the things from the top 100 (query, class) detections (Mask2Former's instance
  # inference, Sec. 4.1 "Post-processing.").
  c.eval.update(task="panoptic", resize="long_side", scale=(crop, crop), mode="spread",
                crop_size=(crop, crop), stride=(crop, crop), average="scores",
                object_mask_threshold=0.8, overlap_threshold=0.8, top_k=100, instance_ap=True,
                best_metric="PQ")
  return common.smoke(c) if "smoke" in parts else c
