"""EoMT-L semantic segmentation on ADE20K at 512x512 (spec eomt.md: 58.4 mIoU).

  python train.py --config configs/eomt_vit_l_ade20k.py --workdir runs/eomt_l_ade20k \
      --config.dataset.root=/data/ADEChallengeData2016

DINOv2-L with 4 registers at patch 16 (weights/dinov2_vitl14_reg4_pretrain.pth, the patch
kernel resampled 14 -> 16 and the position grid resized on load), 100 queries in the last
blocks, masked attention annealed block by block (config.model.mask_annealing), Mask2Former
loss; AdamW 1e-4, weight decay 0.05, clip 0.01, layer-wise lr decay 0.8, two-stage warm-up,
poly 0.9; test: shorter side to 512, evenly spread 512 x 512 windows.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.eomt_config("L", "ade20k")
