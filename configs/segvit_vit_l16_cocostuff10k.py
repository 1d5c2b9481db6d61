"""SegViT ViT-L/16 on COCO-Stuff-10K at 512x512 (spec segvit.md: 49.9 / 50.3 mIoU ss / ms,
383.9 GFLOPs).

  python train.py --config configs/segvit_vit_l16_cocostuff10k.py --workdir runs/segvit_l16_coco \
      --config.dataset.root=/data/coco_stuff10k

171 classes (labels written by `python -m segvit_jax.data.coco_stuff`). Starts from the AugReg
L_16 i21k->in1k 384-px .npz in weights/.

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.02, poly power 2 with 1500 warm-up
iterations, clip 35, global batch 16, 80k iterations; test: short side 512 (mmseg
Resize(min_size=512)), slide 512 / 341.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  return common.segvit_config("L/16", "coco_stuff10k")
