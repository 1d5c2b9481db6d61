"""EoMT-S panoptic segmentation on COCO at 640x640 (spec eomt.md: 44.7 PQ; 46.7 at the 2x schedule).

  python train.py --config configs/eomt_vit_s_coco_panoptic.py \
      --workdir runs/eomt_s_coco_panoptic --config.dataset.root=/data/coco

DINOv2-S with 4 registers at patch 16 (weights/dinov2_vits14_reg4_pretrain.pth, the patch kernel
resampled 14 -> 16 and the position grid resized to 40x40 on load), 200 queries in the last 3
blocks, 133 classes (80 things, 53 stuff); 12 epochs of train2017 at batch 16 (88,692 steps),
annealing windows by the release's rule (common.annealing_windows: the run in L2 + 2 = 5 parts);
Mask2Former loss on every segment (crowd dropped); flip, large-scale jitter 0.1-2.0, pad, crop,
no colour jitter; AdamW 1e-4, weight decay 0.05, clip 0.01, layer-wise lr decay 0.8, two-stage
warm-up, poly 0.9; test: longer side to 640, zero-padded square, panoptic post-processing
(config.eval.task).
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.eomt_panoptic_config("S", 640)
