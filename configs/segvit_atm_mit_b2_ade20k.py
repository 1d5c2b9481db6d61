"""SegViT's ATM head on a SegFormer MiT-B2 encoder, ADE20K at 512x512 (spec segformer.md, "ATM on
MiT"; the SegViT paper shows ATM on hierarchical backbones: Swin-T 47.1 mIoU).

  python train.py --config configs/segvit_atm_mit_b2_ade20k.py --workdir runs/atm_mit_b2_ade \
      --config.dataset.root=/data/ADEChallengeData2016

The head reads MiT stages 4, 3 and 2 (deepest first; each stage's masks summed on the 1/8
grid), width 256, 8 heads, 3 layers per stage. SegFormer's ADE20K recipe and test protocol
(AdamW 6e-5, decoder x10, 160k iterations, whole-image test), SegViT's ATM loss. Starts from
weights/mit_b2.pth.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_mit_config("B2")
