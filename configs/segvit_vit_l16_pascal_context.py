"""SegViT ViT-L/16 on PASCAL-Context at 480x480 (spec segvit.md: 64.1 / 65.3 mIoU59 ss / ms,
321.6 GFLOPs).

  python train.py --config configs/segvit_vit_l16_pascal_context.py \
      --workdir runs/l16_context --config.dataset.root=/data/VOCdevkit/VOC2010
  python train.py --config configs/segvit_vit_l16_pascal_context.py:59 ...

60 classes by default (background is a class; evaluation reports mIoU60 and mIoU59, the
paper's number, from the one model); the argument 59 trains without background (ignored).

Recipe: AdamW lr 2e-5 (decoder x10), weight decay 0.03, poly power 1 with 1500 warm-up
iterations, clip 35, global batch 16, 80k iterations; train base scale (520, 520) as the
release; test: short side max(520 x ratio, 480) (mmseg Resize(min_size=480)), slide 480 / 320.
"""

import ml_collections

from configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "60", "59"):
    raise ValueError(f"unknown PASCAL-Context config argument {arg!r}: expected '', '60' or '59'")
  return common.segvit_config("L/16", "pascal_context", pascal_classes=int(arg or 60))
