"""SegViT ViT-L/16 on ADE20K at 640x640 (spec segvit.md: 54.6 / 55.2 mIoU ss / ms,
637.9 GFLOPs).

  python train.py --config configs/segvit_vit_l16_ade20k.py --workdir runs/segvit_l16_ade \
      --config.dataset.root=/data/ADEChallengeData2016

Starts from the AugReg L_16 i21k->in1k 384-px .npz in weights/ (common.AUGREG_FILES;
README, "Pretrained weights"); the 24x24 position grid is resized bicubically on load.

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.01, poly power 1 with 1500 warm-up
iterations, clip 35, global batch 16, 160k iterations; slide test 640 / 608.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_config("L/16", "ade20k")
