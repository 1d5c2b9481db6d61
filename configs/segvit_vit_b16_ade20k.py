"""SegViT ViT-B/16 on ADE20K at 512x512 (spec segvit.md: 51.3 mIoU single-scale).

  python train.py --config configs/segvit_vit_b16_ade20k.py --workdir runs/segvit_b16_ade \
      --config.dataset.root=/data/ADEChallengeData2016

Starts from the AugReg B_16 i21k->in1k 384-px .npz in weights/ (common.AUGREG_FILES;
README, "Pretrained weights"); the 24x24 position grid is resized bicubically on load.

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.01, poly power 1 with 1500 warm-up
iterations, clip 35, global batch 16, 160k iterations; slide test 512 / 341.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_config("B/16", "ade20k")
