"""SegViT ViT-B/16 on ADE20K at 512x512 (spec segvit.md: 51.3 mIoU single-scale).

  python train.py --config configs/segvit_vit_b16_ade20k.py --workdir runs/segvit_b16_ade \
      --config.dataset.root=/data/ADEChallengeData2016 \
      --config.model_init=/weights/augreg_b16_bundle

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.01, poly power 1 with 1500 warm-up
iterations, clip 35, global batch 16, 160k iterations; slide test 512 / 341.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_ade20k_config("B/16", crop=512, stride=341)
