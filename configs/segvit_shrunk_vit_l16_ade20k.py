"""SegViT-Shrunk ViT-L/16 on ADE20K at 640x640 (spec segvit.md: 53.9 / 55.1 mIoU ss / ms,
373.5 GFLOPs).

  python train.py --config configs/segvit_shrunk_vit_l16_ade20k.py --workdir runs/shrunk_l16_ade \
      --config.dataset.root=/data/ADEChallengeData2016

Query down-sampling at block 8 (blocks 9-23 on the 1/32 grid), query up-sampling from blocks 7
and 23, single-stage ATM head. Starts from the AugReg L_16 i21k->in1k 384-px .npz in weights/.

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.01, poly power 1 with 1500 warm-up
iterations, clip 35, global batch 16, 160k iterations; slide test 640 / 608.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_config("L/16", "ade20k", shrunk=True)
