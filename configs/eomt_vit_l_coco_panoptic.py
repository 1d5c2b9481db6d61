"""EoMT-L panoptic segmentation on COCO at 640x640 (spec eomt.md: 56.0 PQ).

  python train.py --config configs/eomt_vit_l_coco_panoptic.py \
      --workdir runs/eomt_l_coco_panoptic --config.dataset.root=/data/coco

DINOv2-L with 4 registers at patch 16 (weights/dinov2_vitl14_reg4_pretrain.pth, the patch kernel
resampled 14 -> 16 and the position grid resized to 40x40 on load), 200 queries in the last 4
blocks, 133 classes (80 things, 53 stuff); 12 epochs of train2017 at batch 16 (88,692 steps),
the release's ViT-L annealing windows (starts 14782 / 29564 / 44346 / 59128, ends 29564 / 44346
/ 59128 / 73910); Mask2Former loss on every segment (crowd dropped); flip, large-scale jitter
0.1-2.0, pad, crop, no colour jitter; AdamW 1e-4, weight decay 0.05, clip 0.01, layer-wise lr
decay 0.8, two-stage warm-up, poly 0.9; test: longer side to 640, zero-padded square, panoptic
post-processing (config.eval.task).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.eomt_panoptic_config("L", 640)
