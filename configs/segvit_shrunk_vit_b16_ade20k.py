"""SegViT-Shrunk ViT-B/16 on ADE20K at 512x512 (the paper's ablation: QD+QU 50.0 mIoU, 97.1 GFLOPs).

  python train.py --config configs/segvit_shrunk_vit_b16_ade20k.py --workdir runs/shrunk_b16_ade \
      --config.dataset.root=/data/ADEChallengeData2016

Query down-sampling at block 6 (blocks 7-11 on the 1/32 grid), query up-sampling from blocks 5
and 11, single-stage ATM head (width 384, 12 heads). Starts from the AugReg B_16 .npz in weights/.

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.01, poly power 1 with 1500 warm-up
iterations, clip 35, global batch 16, 160k iterations; slide test 512 / 341.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_config("B/16", "ade20k", shrunk=True)
