"""EoMT-L instance segmentation on COCO at 640x640: 45.2 AP (EoMT Table 6; the release's DINOv2
model zoo, model_zoo/dinov2.md, mAP by pycocotools; its
configs/dinov2/coco/instance/eomt_large_640.yaml).

  python train.py --config configs/eomt_vit_l_coco_instance.py \
      --workdir runs/eomt_l_coco_instance --config.dataset.root=/data/coco
  python train.py --config configs/eomt_vit_l_coco_instance.py:smoke \
      --workdir /tmp/smoke --config.dataset.root=FABRICATED_COPY

The argument `smoke` gives common.smoke's variant (the same recipe, a tiny model). Starts from
weights/dinov2_vitl14_reg4_pretrain.pth of the DINOv2 release (README, "Pretrained
weights"): the 14x14 patch kernel is resampled to 16x16 and the 37x37 position grid resized to
40x40 on load.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "smoke"):
    raise ValueError(f"unknown config argument {arg!r}: expected '' or 'smoke'")
  c = common.run_config()
  crop = 640  # EoMT Sec. 4.1 and Table 6: the input size

  # COCO instances: the 80 thing classes (the release's COCOInstance, num_classes 80), at most
  # 100 instances per training image (crowd dropped; training checks the json against it before
  # it starts). Instances overlap: each training label stacks 4 segment-index layers
  # (transforms.segment_map; 6.6 MB per 640 x 640 crop).
  c.dataset.update(name="coco_instance", root="data/coco", num_classes=80,
                   reduce_zero_label=False, num_workers=8, max_segments=100, mask_layers=4)

  # Train augmentation (EoMT App. A.2, "Augmentation."; the release's COCOInstance defaults):
  # horizontal flip, scale jitter of the crop size by a factor in [0.1, 2.0], pad, random crop;
  # no colour jitter on COCO.
  c.augment.update(pipeline="eomt", crop_size=(crop, crop), flip_prob=0.5,
                   scale_jitter=(0.1, 2.0), color_jitter=False, jitter_brightness=32 / 255,
                   jitter_contrast=0.5, jitter_saturation=0.5, jitter_hue=18 / 360)
  # ImageNet pixel statistics (DINOv2's, the release's config).
  c.mean, c.std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

  # Model: DINOv2-L with 4 registers run at patch 16 (EoMT Sec. 4.1, "Models and training."; App.
  # A.1 "Pre-trained models."), 200 queries in the last 4 blocks (the release's config), masked
  # attention annealed block by block with power 0.9 (Sec. 3.3 "Mask annealing."), mixed
  # precision (Sec. 4.1). Drop path 0: the release's config.
  c.model = common.model_config(dict(
      name="eomt", num_classes=80, num_queries=200, num_blocks=4, dtype="bfloat16",
      backbone=dict(variant="dinov2-L/14-reg4", patch_size=16, posemb_grid=(40, 40),
                    posemb_resize="bicubic_antialias", drop_path=0.0),
      # The release's ViT-L windows (its config), block i annealed over the i + 1-th sixth of the
      # run.
      mask_annealing=dict(enabled=True, start_steps=(14782, 29564, 44346, 59128),
                          end_steps=(29564, 44346, 59128, 73910), power=0.9)))
  c.model_init = "weights/dinov2_vitl14_reg4_pretrain.pth"
  c.model_init_format = "dinov2"

  # Loss: Mask2Former's, every (non-crowd) instance a target: class cross-entropy (no-object
  # weight 0.1) and BCE + dice on 12544 importance-sampled points, weights 2 / 5 / 5, on every
  # intermediate prediction and the final one (EoMT App. A.2 "Loss function.", Eq. (2);
  # Mask2Former Sec. 3.3 and Sec. 4.1 "Loss weights."); oversample ratio 3, importance ratio
  # 0.75: the release's MaskClassificationInstance defaults.
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
  # 12 epochs of the 118,287 train2017 images (the release's max_epochs 12): 12 x 7,391 = 6 x
  # 14,782, the run the release's ViT-L annealing windows split in sixths.
  c.total_steps = 88_692
  c.batch_size = 16  # the release's config

  # Test (EoMT App. A.3, "Image processing."): the longer side resized to the input size,
  # zero-padded to the square input; COCO mask AP (pycocotools) of the top 100 (query, class)
  # detections (the release's eval_top_k_instances; Mask2Former's instance inference, Sec. 4.1
  # "Post-processing."); the thresholds are the release's and unused by instance inference.
  c.eval.update(task="instance", resize="long_side", scale=(crop, crop), mode="spread",
                crop_size=(crop, crop), stride=(crop, crop), average="scores",
                object_mask_threshold=0.8, overlap_threshold=0.8, top_k=100, instance_ap=True,
                best_metric="AP")
  return common.smoke(c) if arg == "smoke" else c
