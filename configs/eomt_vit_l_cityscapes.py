"""EoMT-L semantic segmentation on Cityscapes at 1024x1024 (spec eomt.md: 84.2 mIoU).

  python train.py --config configs/eomt_vit_l_cityscapes.py --workdir runs/eomt_l_cityscapes \
      --config.dataset.root=/data/cityscapes

DINOv2-L with 4 registers at patch 16 (weights/dinov2_vitl14_reg4_pretrain.pth, the patch
kernel resampled 14 -> 16 and the position grid resized on load), 100 queries in the last
blocks, masked attention annealed block by block (config.model.mask_annealing), Mask2Former
loss; AdamW 1e-4, weight decay 0.05, clip 0.01, layer-wise lr decay 0.8, two-stage warm-up,
poly 0.9; test: shorter side to 1024, evenly spread 1024 x 1024 windows.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.eomt_config("L", "cityscapes")
